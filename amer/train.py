"""The training loop: one readable pass from config to checkpoints (nanoGPT style).

``python train.py`` (or ``amer train``) trains the ``small`` preset on the bundled King James Bible,
with STP switched on by its gate part-way through. Config resolution: the preset's ``[train]``,
``[model]`` and ``[stp]`` tables, then ``--config run.toml``, then command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Literal

import torch

from amer.checkpoint import (CheckpointError, list_checkpoints, read_checkpoint, restore_model, restore_optimizer,
                             save_checkpoint)
from amer.config import ConfigError, TrainConfig, from_dict, load_toml, suggest, to_dict
from amer.curvature import training_metrics
from amer.data import BatchIterator, ByteTokenizer, DataConfig, DataError, build_datasets
from amer.model import HybridLM
from amer.objective import STPPolicy, cross_entropy
from amer.pattern import PatternError, load_preset
from amer.runtime import tune_malloc

__all__ = ["main", "train", "resolve_config", "build_parser", "TrainingError"]


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); the message says why."""


# ----------------------------------------------------------------------------------------------
# configuration: flags are generated from the dataclasses so --help documents every option


def _flag_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any, dataclasses.Field]]:
    """(flag, dotted key, type, field) for every scalar field, recursing into nested configs."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _flag_fields(tp, f"{prefix}{f.name}.")
            continue
        key = f"{prefix}{f.name}"
        out.append(("--" + key.replace("_", "-"), key, tp, f))
    return out


def _parse_value(tp: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        inner = [a for a in args if a is not type(None)][0]
        return _parse_value(inner, name)
    if origin is dict:
        def parse_dict(s: str) -> dict[str, float]:
            try:
                return {k.strip(): float(v) for k, v in (kv.split("=") for kv in s.split(",") if kv.strip())}
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name} takes KEY=VALUE pairs like 'A=1.0,M=0.5', got {s!r}")
        return parse_dict
    if origin is tuple:
        return lambda s: tuple(float(x) for x in s.split(","))
    if origin is Literal:
        return str
    return {int: int, float: float, str: str}.get(tp, str)


# Help for the nested model/STP fields, which live in config.py without --help metadata. Every flag
# must have a sentence here or in its field's metadata: a test checks that --help documents them all.
NESTED_HELP: dict[str, str] = {
    "stp.enabled": "turn the STP auxiliary loss on (the taps are chosen by --stp.layers)",
    "stp.weight": "STP coefficient once the gate and ramp are passed (total = ce + moe_aux + weight * stp)",
    "stp.start_step": "gate: the STP coefficient is 0 for optimizer steps before this one",
    "stp.ramp_steps": "linear ramp of the STP coefficient from the gate to --stp.weight over this many steps",
    "stp.n_spans": "(s, r, t) triples sampled per sequence per step for the STP loss",
    "stp.layers": "taps regularised by STP: comma-separated selectors, e.g. 'A-1,M-1,E-1,R-1', 'final', "
                  "'L7', 'M1:3'; a selector that selects nothing is an error",
    "stp.family_weights": "relative STP weight per family, e.g. 'A=1.0,M=0.5' (others 1.0; keys A M E R final embed)",
    "model.pattern": "block pattern (same as --pattern): A attention, M Mamba-2, E MoE, R RG-LRU; '(AE)*2M', 'AEMR@12'",
    "model.d_model": "residual stream width",
    "model.vocab_size": "embedding rows (>= 260 for the byte tokenizer)",
    "model.max_seq_len": "longest sequence the model accepts (--seq-len must not exceed it)",
    "model.tie_embeddings": "share the input embedding and the LM head weights",
    "model.norm_eps": "RMSNorm epsilon",
    "model.init_std": "std of the normal weight init (residual output projections scaled by 1/sqrt(2 layers))",
    "model.attention.n_heads": "attention query heads",
    "model.attention.n_kv_heads": "attention key/value heads (grouped-query attention; divides n-heads)",
    "model.attention.head_dim": "attention head width (default d-model / n-heads; must be even for RoPE)",
    "model.attention.rope_theta": "RoPE base frequency",
    "model.attention.qk_norm": "RMS-normalise queries and keys before the dot product",
    "model.mamba.d_state": "Mamba-2 SSM state size per head",
    "model.mamba.d_conv": "Mamba-2 depthwise causal convolution width",
    "model.mamba.expand": "Mamba-2 inner width as a multiple of d-model",
    "model.mamba.head_dim": "Mamba-2 head width (divides expand * d-model)",
    "model.mamba.n_groups": "Mamba-2 B/C groups (divides the number of heads)",
    "model.mamba.chunk_size": "Mamba-2 SSD chunk length for the training scan",
    "model.mamba.dt_min": "Mamba-2 smallest initial time step",
    "model.mamba.dt_max": "Mamba-2 largest initial time step",
    "model.mamba.dt_init_floor": "Mamba-2 floor on the initial time step",
    "model.mamba.a_init_range": "Mamba-2 range of the initial decay rates A, as 'lo,hi'",
    "model.moe.n_experts": "MoE experts per E block",
    "model.moe.top_k": "MoE experts each token is routed to",
    "model.moe.d_ff": "MoE expert hidden width (default 2 * d-model)",
    "model.moe.shared_expert": "add an always-on shared expert to every E block",
    "model.moe.d_ff_shared": "shared expert hidden width (default d-ff)",
    "model.moe.dispatch": "MoE dispatch: dropless (sort + grouped matmul) or capacity (static shapes, may drop)",
    "model.moe.capacity_factor": "MoE capacity per expert as a multiple of the fair share (capacity dispatch)",
    "model.moe.aux_loss_coef": "MoE load-balancing loss weight",
    "model.moe.z_loss_coef": "MoE router z-loss weight",
    "model.recurrent.lru_width": "RG-LRU recurrence width (default d-model)",
    "model.recurrent.n_heads": "RG-LRU block-diagonal gate heads",
    "model.recurrent.d_conv": "RG-LRU causal convolution width",
    "model.recurrent.c": "RG-LRU decay sharpness c in a = sigmoid(Lambda)^(c * r)",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``amer train`` parser, one flag per config field (``--stp.start-step``...), so --help is complete.

    No defaults are set here (``SUPPRESS``): a flag the user did not give must not override the preset
    or the TOML file. Abbreviations are off: ``--step`` is an error with a suggestion, not a silent
    ``--steps`` that a later flag could make ambiguous.
    """
    from amer.cli import OneLineParser

    p = OneLineParser(
        prog="amer train",
        allow_abbrev=False,
        description="Train a hybrid A/M/E/R language model with per-family Semantic Tube Prediction. "
                    "Defaults come from the preset (patterns/<preset>.toml); --config TOML overrides it; "
                    "flags override both.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="TOML file with train keys at top level and [model] / [stp] tables")
    p.add_argument("--stop-at", type=int, help="stop after this step and checkpoint (the LR schedule still "
                   "targets --steps); continue later with --resume")
    for flag, key, tp, f in _flag_fields(TrainConfig):
        help_text = f.metadata.get("help") or NESTED_HELP.get(key, key.replace("_", " "))
        if tp is bool or typing.get_args(tp) == (bool,):
            p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kw: dict[str, Any] = {"dest": key, "type": _parse_value(tp, flag), "help": help_text,
                              "metavar": key.rsplit(".", 1)[-1].upper()}
        if typing.get_origin(tp) is Literal:
            kw["choices"] = list(typing.get_args(tp))
            del kw["metavar"]  # argparse then shows {a,b}: the accepted values
        p.add_argument(flag, **kw)
    return p


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept ``--stp.start_step`` as well as ``--stp.start-step``."""
    out = []
    for a in argv:
        if a.startswith("--"):
            name, eq, val = a.partition("=")
            a = name.replace("_", "-") + eq + val
        out.append(a)
    return out


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "family_weights" else v
    return out


def resolve_config(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """(TrainConfig, extras) from the command line. Raises ConfigError/PatternError on bad input."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(_normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    if unknown:
        flags = [a for a in parser._option_string_actions if a.startswith("--")]
        bad = unknown[0].split("=")[0]
        if not bad.startswith("-"):
            raise ConfigError(f"unexpected argument {bad!r}: amer train takes only --options (see --help)")
        raise ConfigError(f"unknown option {bad}{suggest(bad, flags)} (see --help)")
    given = vars(args)
    extras = {"stop_at": given.pop("stop_at", None), "config": given.pop("config", None)}
    cli: dict[str, Any] = {}
    for key, value in given.items():
        _set(cli, key, value)

    file_cfg: dict[str, Any] = {}
    if extras["config"]:
        file_cfg = load_toml(extras["config"])
    if given.get("resume"):
        base = _config_from_checkpoint(given["resume"])
        merged = _merge(_merge(base, file_cfg), cli)
    else:
        preset_name = cli.get("preset", file_cfg.get("preset", "small"))
        preset = load_preset(preset_name)
        base = {**preset.get("train", {}), "preset": preset_name, "model": preset["model"], "stp": preset.get("stp", {})}
        merged = _merge(_merge(base, file_cfg), cli)
        if merged.get("pattern"):
            merged["model"] = {**merged["model"], "pattern": merged["pattern"]}
    cfg = from_dict(TrainConfig, merged)
    if extras["stop_at"] is not None and not 1 <= extras["stop_at"] <= cfg.steps:
        raise ConfigError(f"--stop-at must be between 1 and --steps ({cfg.steps}), got {extras['stop_at']}")
    return cfg, extras


def _config_from_checkpoint(path: str) -> dict[str, Any]:
    _, _, meta = read_checkpoint(path, with_optimizer=False)
    cfg = dict(meta["config"])
    cfg["resume"] = path
    return cfg


# ----------------------------------------------------------------------------------------------
# the loop


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def _fused_adamw_ok(model: HybridLM) -> bool:
    """The fused AdamW kernel (one pass over each parameter instead of ~10 elementwise ops; 5.2 vs 16.3 ms
    a step for the small preset on CPU) runs on CPU and CUDA for floating-point parameters."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())


def make_optimizer(model: HybridLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm gains, biases, embeddings, SSM/LRU scalars exempt)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.dim() < 2 or "embed" in name or getattr(p, "_no_weight_decay", False)
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=_fused_adamw_ok(model))


def resolve_device(name: str) -> torch.device:
    """``name`` as a device this machine has; ``auto`` picks CUDA when present. Bad names: ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: accepted values are cpu, cuda, cuda:N, auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (accepted here: cpu, auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: accepted values are cpu, cuda, cuda:N, auto")
    return dev


@torch.no_grad()
def evaluate(model: HybridLM, policy: STPPolicy, val, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Held-out cross-entropy (and held-out STP loss on the selected taps, with fixed spans)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device).manual_seed(1234)
    ce_sum, stp_sum, n = 0.0, 0.0, 0
    for batch in val.val_batches(cfg.batch_size, cfg.eval_batches):
        tokens, targets = batch["tokens"].to(device), batch["targets"].to(device)
        with _autocast(cfg, device):
            out = model(tokens, taps=policy.selector if policy.enabled else False)
        ce_sum += float(cross_entropy(out.logits, targets))
        if policy.enabled:
            stp_sum += float(policy.stp_loss(out.taps, mask=batch["doc_ids"].to(device), generator=gen)[0])
        n += 1
    model.train(was_training)
    res = {"val/loss": ce_sum / max(n, 1)}
    if policy.enabled:
        res["val/stp"] = stp_sum / max(n, 1)
    return res


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


class RunLogger:
    """JSONL lines plus TensorBoard scalars with the same names."""

    def __init__(self, run_dir: Path, tensorboard: bool, *, resume_step: int | None = None) -> None:
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if resume_step is not None and self.path.exists():
            # A run that died after its last checkpoint logged steps that the resumed run will redo:
            # drop them so every step appears once and the log reads as one uninterrupted run.
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if line.strip() and _log_step(line) <= resume_step]
            self.path.write_text("".join(kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(run_dir), purge_step=purge)
            except ImportError:  # tensorboard not installed: JSONL only, said once
                print("note: tensorboard is not installed; writing log.jsonl only (pip install tensorboard)")

    def log(self, step: int, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _log_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line from a killed run: drop it


def _rng_pack(state: torch.Tensor) -> str:
    """A generator state (uint8 tensor, ~5 kB for CPU Mersenne Twister) as hex: a list of ints made
    meta.json 100 kB and a noticeable part of every checkpoint write."""
    return state.cpu().numpy().tobytes().hex()


def _rng_unpack(packed: str | list[int], what: str) -> torch.Tensor:
    try:
        data = bytes.fromhex(packed) if isinstance(packed, str) else bytes(packed)
    except (ValueError, TypeError):
        raise CheckpointError(f"meta.json: rng.{what} is not a generator state") from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def train(cfg: TrainConfig, *, stop_at: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run training; returns a summary (run dir, final/best validation loss, checkpoints)."""
    say = (lambda *a: None) if quiet else print
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if not cfg.resume:  # before any slow work: a clash should fail at once
        name = cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.out_dir) / name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run directory {run_dir} already exists; pass --resume {run_dir} to continue it "
                              "or --run-name NEW for a new run (nothing is overwritten)")
    tok = ByteTokenizer()
    if cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the byte tokenizer's "
                          f"{tok.vocab_size} tokens")
    data = build_datasets(DataConfig(source=cfg.data, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                                     seed=cfg.seed), tok)
    model = HybridLM(cfg.model).to(device)
    policy = STPPolicy(cfg.stp, model.pattern)  # resolves the tap selection now: a bad one fails here
    opt = make_optimizer(model, cfg)
    batches = BatchIterator(data.train, cfg.batch_size, cfg.seed)
    stp_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    start, best_val = 0, float("inf")

    if cfg.resume:
        weights, optim, meta = read_checkpoint(cfg.resume)
        lacking = [k for k in ("step", "data_state", "rng") if k not in meta]
        if lacking:
            raise CheckpointError(f"{meta['_path']}/meta.json lacks {lacking}: not a training checkpoint, "
                                  "so the run cannot be resumed from it")
        restore_model(model, {k: v.to(device) for k, v in weights.items()}, source=meta["_path"])
        if optim is not None:
            restore_optimizer(opt, optim, meta)
        else:
            say(f"note: {meta['_path']} has no optimizer state (e.g. best/); AdamW restarts from zero moments, "
                "so the run will not match an uninterrupted one")
        start, best_val = meta["step"], meta.get("best_val", float("inf"))
        batches.load_state_dict(meta["data_state"])
        torch.set_rng_state(_rng_unpack(meta["rng"]["torch"], "torch"))
        stp_gen.set_state(_rng_unpack(meta["rng"]["stp"], "stp"))
        run_dir = Path(meta["_path"]).parent
        for stale in run_dir.glob(".tmp-*"):  # a checkpoint write killed part-way (never under a real name)
            shutil.rmtree(stale, ignore_errors=True)
        say(f"resuming {meta['_path']} at step {start}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**to_dict(cfg), "resume": None}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    logger = RunLogger(run_dir, cfg.tensorboard, resume_step=start if cfg.resume else None)

    n_params = model.num_params()
    say(f"amer: {cfg.model.pattern} ({model.pattern.letters}) {n_params / 1e6:.2f}M params | data {cfg.data}: "
        f"{data.train.n_tokens / 1e6:.2f}M train / {data.val.n_tokens / 1e6:.2f}M val tokens | "
        f"STP {'on ' + repr(cfg.stp.layers) + f' from step {cfg.stp.start_step}' if cfg.stp.enabled else 'off'}")
    say(f"run directory: {run_dir}")

    last_step = min(cfg.steps, stop_at or cfg.steps)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    bar = None
    if cfg.progress and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=last_step, initial=start, unit="step", dynamic_ncols=True, disable=None)
        if bar.disable:  # not a terminal (piped, nohup, CI): print plain log lines instead of nothing
            bar = None
    bad_steps = 0
    val = {}
    t_last, tok_since = time.perf_counter(), 0
    model.train()
    for step in range(start, last_step):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        log_now = (step + 1) % cfg.log_interval == 0 or step + 1 == last_step
        finite = True
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            tokens, targets = batch["tokens"].to(device), batch["targets"].to(device)
            doc_ids = batch["doc_ids"].to(device)
            with _autocast(cfg, device):
                out = model(tokens)  # every tap recorded, on the graph
            parts = policy.loss(out, targets, step, mask=doc_ids, generator=stp_gen)
            if not torch.isfinite(parts.total):
                finite = False
                break
            if log_now and micro == cfg.grad_accum - 1:  # read the taps now: they are released before backward
                live = policy.live_grad_norm(parts, out.taps)
                tap_metrics = training_metrics(out.taps, parts.per_tap, mask=doc_ids)
                tap_metrics.update({k: float(v) for k, v in out.stats.items() if k.count("/") == 1})
            # Drop the output (logits, taps, stats) before backward: autograd frees each saved activation
            # once its node has run, and a live tap list would pin the residual stream until the step ends.
            loss = parts.total / cfg.grad_accum
            del out
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not finite or not torch.isfinite(gnorm):
            opt.zero_grad(set_to_none=True)  # the step is not applied
            bad_steps += 1
            what = "loss" if not finite else "gradient"
            say(f"step {step + 1}: non-finite {what}; step skipped ({bad_steps}/{cfg.max_bad_steps})")
            logger.log(step + 1, {"skipped": 1, "skipped_reason": f"non-finite {what}"})
            if bad_steps >= cfg.max_bad_steps:
                if bar is not None:
                    bar.close()
                logger.close()
                good = list_checkpoints(run_dir)
                raise TrainingError(f"{bad_steps} consecutive non-finite steps at step {step + 1}: stopping; "
                                    f"lower --lr or use --dtype float32 (last good checkpoint: "
                                    f"{good[-1] if good else 'none'})")
            continue
        bad_steps = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        tok_since += tokens_per_step
        done = step + 1

        if log_now:
            now = time.perf_counter()
            tps = tok_since / max(now - t_last, 1e-9)
            t_last, tok_since = now, 0
            record = {"lr": lr, "loss": float(parts.total.detach()), "ce": float(parts.ce.detach()), "moe_aux": float(parts.aux.detach()),
                      "stp": float(parts.stp.detach()), "stp/coeff": parts.coeff, "stp/live_grad_norm": live or 0.0,
                      "grad_norm": float(gnorm), "tokens_per_s": tps, "epoch": batches.epochs_done}
            record.update(tap_metrics)
            logger.log(done, record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['ce']:.3f}", tok_s=f"{tps:,.0f}", stp=f"{parts.coeff:.3g}")
            elif not quiet:
                say(f"step {done}/{cfg.steps} loss {record['ce']:.4f} stp {record['stp']:.4f} coeff {parts.coeff:.3g} "
                    f"lr {lr:.2e} {tps:,.0f} tok/s")
        if bar is not None:
            bar.update(1)

        if done % cfg.eval_interval == 0 or done == last_step:
            val = evaluate(model, policy, data.val, cfg, device)
            logger.log(done, val)
            is_best = val["val/loss"] < best_val
            best_val = min(best_val, val["val/loss"])
            meta = {"config": resolved, "step": done, "best_val": best_val, "val": val,
                    "data_state": batches.state_dict(),
                    "rng": {"torch": _rng_pack(torch.get_rng_state()), "stp": _rng_pack(stp_gen.get_state())}}
            bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if bad:  # finite loss but an update produced inf/NaN weights: never checkpoint them
                if bar is not None:
                    bar.close()
                logger.close()
                raise TrainingError(f"step {done}: parameter {bad[0]} became non-finite; stopping without "
                                    f"writing a checkpoint; lower --lr")
            save_checkpoint(run_dir / f"step_{done:06d}", model, opt, meta)
            if is_best:
                save_checkpoint(run_dir / "best", model, None, meta)
            for old in list_checkpoints(run_dir)[:-cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            msg = f"step {done}: val loss {val['val/loss']:.4f}" + (f" val stp {val['val/stp']:.4f}" if "val/stp" in val else "")
            (bar.write if bar is not None else say)(msg)
    if bar is not None:
        bar.close()
    logger.close()
    latest = list_checkpoints(run_dir)[-1] if list_checkpoints(run_dir) else None
    say(f"done: checkpoint {latest} | best {run_dir / 'best'} (val loss {best_val:.4f}) | logs {run_dir / 'log.jsonl'} "
        f"| tensorboard --logdir {cfg.out_dir}")
    return {"run_dir": str(run_dir), "checkpoint": str(latest) if latest else None, "best_val": best_val,
            "val": val, "steps": last_step}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python train.py`` / ``amer train``. Bad input: one line, exit code 2."""
    try:
        try:
            cfg, extras = resolve_config(argv)
        except SystemExit as e:  # --help: argparse printed it; main() returns rather than exits
            return int(e.code or 0)
        tune_malloc()  # CLI runs own their process; library callers of train() keep their allocator
        train(cfg, stop_at=extras["stop_at"])
    except (ConfigError, PatternError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last written checkpoint is intact", file=sys.stderr)
        return 130
    return 0
