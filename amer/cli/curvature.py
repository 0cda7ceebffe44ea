"""``amer curvature``: token and depth curvature of a trained checkpoint, an imported pretrained folder (or a
transformers folder amer can import) or a fresh model, per block family and at every block boundary, with the
decomposition, baselines, entropy correlation and anisotropy checks, optionally against a second model;
writes the report files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amer.analysis.compare import compare
from amer.analysis.curvature import Options, check_strides, evaluate
from amer.checkpoint import find_checkpoint, load_checkpoint
from amer.cli.base import ArgParser, run
from amer.config import ModelConfig, to_dict
from amer.configio import number_arg, path_arg
from amer.data import ByteTokenizer, DataConfig, build_datasets, load_tokenizer
from amer.errors import AnalysisError, ConfigError
from amer.fileread import json_loads
from amer.model import HybridLM
from amer.pattern import Pattern, load_preset, preset_names
from amer.report.curvature import UNITS, format_summary, write_report
from amer.runtime import resolve_device
from amer.tap import resolve_selector, tap_names

__all__ = ["build_parser", "command", "main"]


def build_parser() -> ArgParser:
    p = ArgParser(prog="amer curvature", description=(
        "Token and depth curvature of every tap, per block family and at every block boundary, in 1 - cos and "
        "degrees, with the normal/tangential decomposition, shuffled/noise/walk baselines, the correlation with "
        "next-token entropy and anisotropy checks; bootstrap CIs over held-out sequences. Writes curvature.json, "
        "curvature.md and curvature.png."))
    src = p.add_argument_group("model (one of)")
    src.add_argument("--checkpoint", metavar="PATH", type=path_arg,
                     help="checkpoint directory, a run directory (its latest step), a pretrained folder (amer import "
                     "/ amer export) or a transformers folder amer can import")
    src.add_argument("--pattern", metavar="P", help="a freshly initialised model (seeded): a preset name (its dims) "
                     "or a pattern string such as AEMR")
    src.add_argument("--preset", metavar="NAME", help="with a pattern string: take the dimensions from this preset")
    p.add_argument("--compare", metavar="PATH2", type=path_arg,
                   help="a second checkpoint or folder of the same pattern, shown side by side with the difference "
                   "(first minus second) and its CI")
    p.add_argument("--data", type=path_arg,
                   help="'kjv', 'stdlib', a text/JSONL file or a directory (default: the checkpoint's "
                   "training data, else kjv); its validation split is measured")
    p.add_argument("--batches", type=number_arg(True, ge=1), default=8, help="validation batches (default 8)")
    p.add_argument("--batch-size", type=number_arg(True, ge=1), default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=number_arg(True, ge=3),
                   help="tokens per sequence, >= 3 (default: the checkpoint's or preset's, else 256)")
    p.add_argument("--packing", choices=("documents", "none"),
                   help="'documents' keeps every block inside each packed document, 'none' runs across them "
                        "(default: the checkpoint's training setting, else documents)")
    p.add_argument("--strides", default="1", help="token strides, comma-separated, e.g. '1,4' (default 1)")
    p.add_argument("--seed", type=number_arg(True, ge=0), default=0,
                   help="seeds the fresh model, the STP spans and the bootstrap")
    p.add_argument("--n-bootstrap", type=number_arg(True, ge=1), default=1000,
                   help="bootstrap replicates (default 1000)")
    p.add_argument("--stp-spans", type=number_arg(True, ge=1),
                   help="STP triples per sequence (default: the checkpoint's, else 4)")
    p.add_argument("--units", choices=list(UNITS), default="both",
                   help="units of the curvature figures in curvature.md, the PNG and the terminal: 'angle' (mean "
                        "angle in degrees, as in the literature), 'one-minus-cos' (the STP loss's unit) or 'both' "
                        "(default); curvature.json always holds both")
    p.add_argument("--dpi", type=number_arg(True, ge=30, le=600), default=120,
                   help="resolution of curvature.png (default 120)")
    checks = p.add_argument_group("checks (all on by default; each off makes the report cheaper)")
    checks.add_argument("--no-baselines", action="store_true",
                        help="skip the shuffled-text (a second forward pass), noise and random-walk baselines")
    checks.add_argument("--no-anisotropy", action="store_true",
                        help="skip pairwise cosines and centred/whitened curvature (one D x D covariance per tap)")
    checks.add_argument("--no-entropy", action="store_true", help="skip the correlation with next-token entropy")
    checks.add_argument("--entropy-window", type=number_arg(True, ge=1), default=8,
                        help="bends averaged into the contextual curvature at a position (default 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, xla (torch_xla) or auto (default cpu)")
    p.add_argument("--out", metavar="DIR", type=path_arg,
                   help="output directory (default <run>/curvature, or curvature_out/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _parse_strides(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--strides must be comma-separated integers >= 1 such as '1,4', got {text!r}") from None
    if not values:
        raise ConfigError(f"--strides must name at least one stride, e.g. '1' or '1,4', got {text!r}")
    return check_strides(values)


def _is_transformers_folder(path: Path) -> bool:
    """A folder written by transformers' ``save_pretrained`` (its config names the model class), not amer's."""
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.is_file() or (path / "meta.json").exists():
        return False
    try:
        data = json_loads(cfg.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "architectures" in data and data.get("model_type") != "amer"


def _load_checkpoint(path: str, device: torch.device) -> tuple[nn.Module, ModelConfig, dict[str, Any], Path]:
    """(model, model config, the run's training config, checkpoint directory)."""
    if _is_transformers_folder(Path(path)):  # converted in memory, exactly as amer import would
        from amer.interop import from_transformers

        model, cfg = from_transformers(path)
        return model.to(device), cfg, {}, Path(path)
    ckpt = find_checkpoint(path)
    model, cfg = load_checkpoint(ckpt, device=device)
    meta_file = ckpt / "meta.json"  # a pretrained folder (amer import, amer export) has no training config
    meta = json_loads(meta_file.read_text()) if meta_file.is_file() else {}  # load_checkpoint has validated it
    return model, cfg, meta.get("config", {}), ckpt


def _stp_selected(stp: Mapping[str, Any] | None, pattern: Pattern) -> list[str]:
    """The taps the run's (or preset's) STP loss was applied to, marked in the report."""
    if not stp or not stp.get("enabled") or not stp.get("layers"):
        return []
    names = tap_names(pattern)
    return [names[p] for p in resolve_selector(stp["layers"], pattern)]


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Everything up to the measurement: models, data, config. Bad input raises an AmerError before
    anything is written."""
    if not args.checkpoint and not args.pattern:
        raise ConfigError("give --checkpoint PATH (a trained run) or --pattern P (a fresh model: a preset name "
                          "such as tiny, or a pattern string such as AEMR)")
    if args.checkpoint and args.pattern:
        raise ConfigError("give either --checkpoint or --pattern, not both (use --compare for a second model)")
    if args.preset and not args.pattern:
        raise ConfigError("--preset only applies with --pattern (a checkpoint brings its own dimensions)")
    strides = _parse_strides(args.strides)
    device = resolve_device(args.device)

    train_cfg: dict[str, Any] = {}
    if args.checkpoint:
        model, cfg, train_cfg, ckpt = _load_checkpoint(args.checkpoint, device)
        label, stp = str(ckpt), train_cfg.get("stp")
        default_out = ckpt.parent / "curvature"
    else:
        if args.pattern in preset_names():
            if args.preset:
                raise ConfigError(f"--pattern {args.pattern} is already a preset; drop --preset")
            preset = load_preset(args.pattern)
            cfg = ModelConfig.from_preset(args.pattern)
            train_cfg, stp = dict(preset.get("train", {})), preset.get("stp")
        elif args.preset:
            cfg = ModelConfig.from_preset(args.preset, pattern=args.pattern)
            stp = None
        else:
            cfg, stp = ModelConfig(pattern=args.pattern), None
        torch.manual_seed(args.seed)
        model = HybridLM(cfg).to(device)
        label, ckpt = f"fresh {args.pattern} (seed {args.seed})", None
        default_out = Path("curvature_out")
    model_b = label_b = None
    if args.compare:
        model_b, cfg_b, _, ckpt_b = _load_checkpoint(args.compare, device)
        if cfg_b.parsed.letters.replace("|", "") != cfg.parsed.letters.replace("|", ""):
            raise AnalysisError(
                f"--compare {ckpt_b} has pattern {cfg_b.parsed.letters!r} but the first model has "
                f"{cfg.parsed.letters!r}; compare two checkpoints of one pattern (e.g. STP on vs off)")
        label_b = str(ckpt_b)

    seq_len = args.seq_len or int(train_cfg.get("seq_len") or 256)
    if seq_len < 2 * strides[-1] + 1:
        raise ConfigError(f"--seq-len {seq_len} is too short for stride {strides[-1]}: needs >= {2 * strides[-1] + 1}")
    for m in (model, model_b):
        if m is not None and seq_len > m.cfg.max_seq_len:
            raise ConfigError(f"--seq-len {seq_len} exceeds the model's max_seq_len {m.cfg.max_seq_len}")
    # a checkpoint is measured with its own tokenizer (tokenizer.json; bytes when it has none), a fresh model with bytes
    tok = load_tokenizer(ckpt) if ckpt is not None else ByteTokenizer()
    if model_b is not None and load_tokenizer(ckpt_b).to_json() != tok.to_json():
        raise AnalysisError(f"--compare {ckpt_b} uses another tokenizer than {label}: their held-out sequences "
                            f"differ, so their curvatures are not comparable")
    for m in (model, model_b):
        if m is not None and m.cfg.vocab_size < tok.vocab_size:
            raise AnalysisError(f"the model's vocab_size {m.cfg.vocab_size} is below its tokenizer's "
                                f"{tok.vocab_size}")
    source = args.data or train_cfg.get("data") or "kjv"
    val_fraction = float(train_cfg.get("val_fraction") or 0.05)  # a run without validation: hold out 5% now
    data_seed = int(train_cfg.get("seed", 0))  # the run's seed fixes which documents it held out
    splits = build_datasets(DataConfig(source=str(source), seq_len=seq_len, val_fraction=val_fraction,
                                       seed=data_seed), tok)
    batches = list(splits.val.val_batches(args.batch_size, args.batches))
    n_seq = sum(int(b["tokens"].shape[0]) for b in batches)
    if n_seq < 2:
        raise AnalysisError(f"data '{source}': the validation split holds {n_seq} sequence of {seq_len} tokens; "
                            f"bootstrap intervals need at least 2; lower --seq-len or add data")
    n_spans = args.stp_spans or int((train_cfg.get("stp") or stp or {}).get("n_spans") or 4)
    config = {
        "checkpoint": str(ckpt) if ckpt else None,
        "pattern_arg": args.pattern,
        "compare": label_b,
        "model": to_dict(cfg),
        "stp_selected": _stp_selected(stp, cfg.parsed),
        "data": str(source),
        "tokenizer": tok.spec,
        "split": "validation",
        "val_fraction": val_fraction,
        "data_seed": data_seed,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "batches": len(batches),
        "n_sequences": n_seq,
        "strides": strides,
        "seed": args.seed,
        "n_bootstrap": args.n_bootstrap,
        "stp_n_spans": n_spans,
        "packing": args.packing or str(train_cfg.get("packing") or "documents"),
        "device": str(args.device),
        "units": args.units,
        "options": {"baselines": not args.no_baselines, "anisotropy": not args.no_anisotropy,
                    "entropy": not args.no_entropy, "entropy_window": args.entropy_window},
    }
    return {"config": config, "model": model, "label": label, "model_b": model_b, "label_b": label_b,
            "batches": batches, "out": Path(args.out) if args.out else default_out}


def _measure(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Path]]:
    """The report (config, result, and with --compare the second result and the comparison) and its files."""
    prep = _prepare(args)
    cfg = prep["config"]
    kw = dict(strides=cfg["strides"], n_bootstrap=cfg["n_bootstrap"], seed=cfg["seed"],
              stp_n_spans=cfg["stp_n_spans"], progress=not args.no_progress, documents=cfg["packing"] == "documents",
              options=Options(**cfg["options"]))
    result = evaluate(prep["model"], prep["batches"], **kw)
    result["label"] = prep["label"]
    report: dict[str, Any] = {"config": cfg, "result": result}
    if prep["model_b"] is not None:
        result_b = evaluate(prep["model_b"], prep["batches"], **kw)
        result_b["label"] = prep["label_b"]
        report["result_b"] = result_b
        report["comparison"] = compare(result, result_b)
    return report, write_report(report, prep["out"], dpi=args.dpi)


def command(argv: list[str]) -> int:
    """Measure, write the report, print the summary. Bad input raises an AmerError (one line, exit 2)."""
    args = build_parser().parse_args(argv)
    try:
        report, paths = _measure(args)
    except OSError as e:  # an unreadable input or unwritable --out: one line, not a traceback
        raise AnalysisError(f"{e.strerror or e}: {e.filename}") from None
    print(format_summary(report))
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``amer curvature`` as a console entry point."""
    return run(command, list(sys.argv[1:] if argv is None else argv))
