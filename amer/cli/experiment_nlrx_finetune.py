"""``amer experiment nlrx-finetune``: flags, their defaults (the full experiment and ``--quick``), validation into
:class:`~amer.experiments.nlrx_finetune.grid.Settings`, and the command itself."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from amer.checkpoint import load_checkpoint, read_meta
from amer.cli.base import ArgParser, run
from amer.cli.experiment import run_resumable
from amer.configio import number_arg
from amer.data import load_tokenizer
from amer.errors import ExperimentError
from amer.experiments import options
from amer.experiments.nlrx.data import ENV_DIR, TEST_FILE, TRAIN_FILE, default_data_dir
from amer.experiments.nlrx.grid import model_config
from amer.experiments.nlrx_finetune.data import NTP_TARGETS
from amer.experiments.nlrx_finetune.estimate import estimate
from amer.experiments.nlrx_finetune.grid import INITS, Settings, build_grid, pick_arms
from amer.experiments.nlrx_finetune.report import summarize, write_report
from amer.experiments.nlrx_finetune.runner import arm_path, read_all, run_all

__all__ = ["FULL", "QUICK", "build_parser", "settings_from_args", "command", "main"]

FULL: dict[str, Any] = {
    "models": "hybrid=AMER,dense=(AE)*2", "lambdas": "0,0.005,0.02,0.04", "fractions": "1,1/4,1/16", "seeds": "3",
    "out": "checkpoints/nlrx-finetune", "d_model": 128, "pretrain_epochs": 1.0, "pretrain_seq_len": 256,
    "pretrain_batch": 16, "pretrain_max_bytes": None, "pretrain_every": 200, "pretrain_warmup": 100,
    "lrs": "1e-4,3e-4,1e-3", "epochs": 4.0, "train_rows": None, "test_rows": None,
}
QUICK: dict[str, Any] = {
    "models": "hybrid=AMER", "lambdas": "0,0.02", "fractions": "1,1/4", "seeds": "2",
    "out": "checkpoints/nlrx-finetune-quick", "d_model": 32, "pretrain_epochs": 1.0, "pretrain_seq_len": 128,
    "pretrain_batch": 8, "pretrain_max_bytes": 12_000, "pretrain_every": 10, "pretrain_warmup": 5,
    "lrs": "1e-3,3e-3", "epochs": 2.0, "train_rows": 128, "test_rows": 48,
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="amer experiment nlrx-finetune",
                  description="Pretrain small hybrid and dense models on the bundled corpora, fine-tune them on "
                              "NL-RX with and without the span form of STP (and from scratch as the control), and "
                              "report whether the STP paper's data-efficiency claim reproduces.")
    a = p.add_argument
    a("--data-dir", help=f"folder with {TRAIN_FILE} and {TEST_FILE}; default ${ENV_DIR}, else "
                         "../shared/data/nl-rx-synth next to the repository")
    a("--train-file", help=f"training chat JSONL (default DATA_DIR/{TRAIN_FILE}); any file of the same chat format")
    a("--test-file", help=f"test chat JSONL (default DATA_DIR/{TEST_FILE})")
    a("--out", help="results directory (pretrain/, arms/, gate.json, results.*); default checkpoints/nlrx-finetune")
    a("--quick", action="store_true", help="a tiny pretraining and grid on a slice of the data (about 1-2 minutes)")
    a("--init", help="fine-tune this checkpoint, run directory or pretrained folder instead of pretraining "
                     "(weights and model config come from it)")
    a("--inits", help="which grids to run: pretrained,scratch (default both; scratch is the control)")
    a("--models", help="NAME=PATTERN list; default 'hybrid=AMER,dense=(AE)*2' (ignored with --init)")
    a("--d-model", type=number_arg(True, ge=16), help="model width (default 128; --quick 32)")
    a("--pretrain-epochs", type=number_arg(gt=0), help="epochs over kjv + stdlib (default 1)")
    a("--pretrain-max-bytes", type=number_arg(True, ge=1), help="bytes kept per corpus (default all)")
    a("--pretrain-lr", type=number_arg(gt=0), default=3e-3, help="pretraining peak lr (cosine, default 3e-3)")
    a("--lrs", help="fine-tuning lr candidates, picked with NTP on one seed (default 1e-4,3e-4,1e-3)")
    a("--lr", type=number_arg(gt=0), help="a fixed fine-tuning lr (skips the pick)")
    a("--lambdas", help="span-form STP weights; 0 is the NTP baseline (default 0,0.005,0.02,0.04)")
    a("--triple-lambda", type=number_arg(ge=0), default=0.02, help="lambda of the triple-form bridge arm (0: none)")
    a("--fractions", help="training-data fractions (default 1,1/4,1/16)")
    a("--seeds", help="a count N (seeds 0..N-1) or a list like 0,1,2 (default 3)")
    a("--epochs", type=number_arg(gt=0), help="fine-tuning epochs of each arm's subset (default 4, as the paper)")
    a("--batch-size", type=number_arg(True, ge=1), default=16)
    a("--weight-decay", type=number_arg(ge=0), default=0.0)
    a("--ntp-targets", choices=NTP_TARGETS, default="all",
      help="next-token CE on every token (all, as the released code) or on the answer only (assistant)")
    a("--n-spans", type=number_arg(True, ge=1), default=1, help="span-form patches per example per step")
    a("--gate-margin", type=number_arg(ge=0), default=0.1,
      help="how far below the from-scratch level the pretrained held-out span STP must be (default 0.1)")
    a("--train-rows", type=number_arg(True, ge=1), help="use only the first N training rows")
    a("--test-rows", type=number_arg(True, ge=1), help="evaluate on the first N test rows")
    a("--system-prompt", action="store_true", help="keep the system turn in every example")
    a("--workers", type=number_arg(True, ge=1, le=1024), help="processes (default: the CPU cores available)")
    a("--threads", type=number_arg(True, ge=1, le=4096), help="torch threads per worker (default 1 with workers)")
    a("--dry-run", action="store_true", help="list the arms and which are done, run nothing")
    a("--estimate", action="store_true", help="time a few steps of each kind; print how long the rest should take")
    a("--report-only", action="store_true", help="rebuild results.* from what is finished, run nothing")
    return p


def _data_files(args: argparse.Namespace) -> tuple[Path, Path, str]:
    d = Path(args.data_dir) if args.data_dir else default_data_dir()
    if (args.train_file is None or args.test_file is None) and d is None:
        raise ExperimentError(f"no NL-RX-SYNTH data: pass --data-dir DIR (with {TRAIN_FILE} and {TEST_FILE}), "
                              f"--train-file and --test-file, or set ${ENV_DIR}")
    train = Path(args.train_file) if args.train_file else d / TRAIN_FILE  # type: ignore[operator]
    test = Path(args.test_file) if args.test_file else d / TEST_FILE  # type: ignore[operator]
    for f in (train, test):
        if not f.is_file():
            raise ExperimentError(f"data file {f} not found; pass --data-dir, or --train-file and --test-file "
                                  f"(chat JSONL), or set ${ENV_DIR}")
    synth = train.name == TRAIN_FILE and test.name == TEST_FILE
    return train, test, "NL-RX-SYNTH" if synth else f"{train.name} / {test.name}"


def settings_from_args(args: argparse.Namespace) -> Settings:
    d = QUICK if args.quick else FULL
    pick = lambda name: getattr(args, name, None) if getattr(args, name, None) is not None else d[name]  # noqa: E731
    train, test, name = _data_files(args)
    d_model = pick("d_model")
    if d_model % 16:
        raise ExperimentError(f"--d-model must be a multiple of 16, got {d_model}")
    inits = [x.strip() for x in (args.inits or ",".join(INITS)).split(",") if x.strip()]
    if not inits or any(x not in INITS for x in inits):
        raise ExperimentError(f"--inits {args.inits!r}: accepted are {', '.join(INITS)}")
    init_sha = None
    if args.init:
        meta = read_meta(args.init)  # a missing or foreign path is a one-line CheckpointError
        _, cfg = load_checkpoint(args.init)
        spec = load_tokenizer(meta["_path"]).spec
        if spec != "byte":  # the chat data and its answer spans are laid out in bytes here
            raise ExperimentError(f"--init {args.init}: this experiment fine-tunes byte-level models, and that "
                                  f"checkpoint's tokenizer is {spec!r}")
        models = [("init", cfg.pattern)]
        init_sha = options.sha(Path(meta["_path"]) / "model.safetensors")
        d_model = cfg.d_model
    else:
        models = options.models(pick("models"), lambda p: model_config(p, d_model))
    return Settings(
        train_file=str(train), test_file=str(test), data_name=name, out=pick("out"), models=models,
        lambdas=options.floats(pick("lambdas"), "--lambdas"), fractions=options.fractions(pick("fractions")),
        seeds=options.seeds(pick("seeds")), triple_lambda=args.triple_lambda or None,
        inits=[i for i in INITS if i in inits],
        init=args.init, d_model=d_model, pretrain_epochs=float(pick("pretrain_epochs")),
        pretrain_seq_len=d["pretrain_seq_len"], pretrain_batch=d["pretrain_batch"], pretrain_lr=args.pretrain_lr,
        pretrain_warmup=d["pretrain_warmup"], pretrain_max_bytes=pick("pretrain_max_bytes"),
        pretrain_every=d["pretrain_every"], lrs=options.floats(pick("lrs"), "--lrs", positive=True), lr=args.lr,
        epochs=float(pick("epochs")), batch_size=args.batch_size, weight_decay=args.weight_decay,
        ntp_targets=args.ntp_targets, n_spans=args.n_spans, gate_margin=args.gate_margin,
        train_rows=pick("train_rows"), test_rows=pick("test_rows"), system_prompt=args.system_prompt,
        threads=args.threads, workers=args.workers or options.cores(), init_sha=init_sha,
        data_sha={"train": options.sha(train), "test": options.sha(test)},
    )


def command(argv: list[str]) -> int:
    """``amer experiment nlrx-finetune``; errors propagate as :class:`~amer.errors.AmerError` (one line, exit 2)."""
    return run_resumable(argv, build_parser(), settings_from_args, _command)


def _command(args: argparse.Namespace, s: Settings, argv: list[str]) -> int:
    if args.dry_run:
        arms = pick_arms(s) + build_grid(s, {(i, m): s.lr or s.lrs[0] for i in s.inits for m, _ in s.models})
        for a in dict.fromkeys(arms):
            print(f"{'done' if arm_path(s, a).is_file() else 'todo'}  {a.id}")
        print(f"{len(set(arms))} arms (grid listed at lr {s.lr or s.lrs[0]:g}; the pick decides the real one)")
        return 0
    if args.estimate:
        estimate(s)
        return 0
    res = read_all(s) if args.report_only else run_all(s)
    summary = summarize(res, s)
    if args.quick:  # a width-32 model on a slice of the data: the mechanics run, the verdict means nothing
        summary["statement"] = ("--quick (a smoke run of every stage on a slice of the data; no evidence either "
                                "way): " + summary["statement"])
    line = "amer experiment nlrx-finetune " + " ".join(a for a in argv if a != "--report-only")
    for p in write_report(summary, Path(s.out), command=line.strip()):
        print(f"wrote {p}")
    print(summary["statement"])
    return 0


def main(argv: list[str] | None = None) -> int:
    """``amer experiment nlrx-finetune`` in-process: bad input prints one line and returns 2."""
    return run(command, list(sys.argv[1:] if argv is None else argv))
