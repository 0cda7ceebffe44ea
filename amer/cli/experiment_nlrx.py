"""``amer experiment nlrx``: flags, their defaults (full grid and ``--quick``), validation into
:class:`~amer.experiments.nlrx.grid.Settings`, the duration estimate, and the command itself."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from amer.cli.base import ArgParser, run
from amer.cli.experiment import run_resumable
from amer.configio import number_arg
from amer.errors import ExperimentError
from amer.experiments import options
from amer.experiments.nlrx.data import ENV_DIR, TEST_FILE, TRAIN_FILE, default_data_dir
from amer.experiments.nlrx.grid import TAPS, Settings, build_grid, model_config
from amer.experiments.nlrx.report import summarize, write_report
from amer.experiments.nlrx.runner import arm_path, check_stale, estimate, finished_arms, run_grid

__all__ = ["ENV_DIR", "FULL_DEFAULTS", "QUICK_DEFAULTS", "default_data_dir", "build_parser", "settings_from_args",
           "estimate", "command", "main"]

FULL_DEFAULTS: dict[str, Any] = {
    "models": "dense=(AE)*2,hybrid=AMER", "lambdas": "0,0.005,0.01,0.02,0.04,0.08", "lambdas_small": "0,0.02",
    "taps": "final,family", "fractions": "1,1/4,1/16", "seeds": "3", "out": "checkpoints/nlrx", "steps": 1000,
    "train_rows": None, "test_rows": None,
}
QUICK_DEFAULTS: dict[str, Any] = {
    "models": "hybrid=AMER", "lambdas": "0,0.02", "lambdas_small": "all", "taps": "family", "fractions": "1",
    "seeds": "1", "out": "checkpoints/nlrx-quick", "steps": 600, "train_rows": 2000, "test_rows": 200,
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="amer experiment nlrx",
        description="Train small dense and hybrid models from scratch on NL-RX-SYNTH with and without STP, "
                    "evaluate greedy exact match, and report whether the STP paper's claims reproduce.")
    a = p.add_argument
    a("--data-dir", help=f"folder with {TRAIN_FILE} and {TEST_FILE} (llm-jepa's datasets/); default ${ENV_DIR}, "
                         "else ../shared/data/nl-rx-synth next to the repository")
    a("--out", help="results directory (arms/<arm-id>.json, results.*); default checkpoints/nlrx")
    a("--quick", action="store_true", help="one seed of NTP and one STP arm on a slice of the data (minutes)")
    a("--models", help="NAME=PATTERN list; default 'dense=(AE)*2,hybrid=AMER'")
    a("--lambdas", help="STP weights swept at the largest fraction; 0 is the NTP baseline; "
                        "default 0,0.005,0.01,0.02,0.04,0.08")
    a("--lambdas-small", help="STP weights run at the smaller fractions (default 0,0.02: NTP and the paper's best "
                              "SYNTH lambda); 'all' runs --lambdas at every fraction")
    a("--taps", help="STP tap selections: final (post-final-norm state), family (last block of each family)")
    a("--fractions", help="training-data fractions, e.g. 1,1/4,1/16 (equal compute: same steps for each)")
    a("--seeds", help="a count N (seeds 0..N-1) or a list like 0,1,2")
    a("--d-model", type=number_arg(True, ge=16), default=64, help="model width (default 64)")
    a("--steps", type=number_arg(True, ge=1),
      help="optimizer steps per arm, the same at every fraction (default 1000; --quick 600)")
    a("--batch-size", type=number_arg(True, ge=1), default=16)
    a("--lr", type=number_arg(gt=0), default=3e-3)
    a("--warmup-steps", type=number_arg(True, ge=0), default=None, help="default 5%% of --steps")
    a("--n-spans", type=number_arg(True, ge=1), default=4, help="STP triples per example in training")
    a("--train-rows", type=number_arg(True, ge=1),
      help="use only the first N training rows (default all 8000; --quick 2000)")
    a("--test-rows", type=number_arg(True, ge=1),
      help="evaluate on the first N test rows (default all 2000; --quick 200)")
    a("--system-prompt", action="store_true", help="keep the constant system turn in every example")
    a("--max-new-tokens", type=number_arg(True, ge=1), default=64,
      help="greedy decoding budget (the longest reference is 54 bytes)")
    a("--decode-batch", type=number_arg(True, ge=1), default=256)
    a("--workers", type=number_arg(True, ge=1, le=1024),
      help="arms run in parallel, one process each (default: the CPU cores available)")
    a("--threads", type=number_arg(True, ge=1, le=4096),
      help="torch threads per worker (default 1 with several workers, else torch's choice)")
    a("--dry-run", action="store_true", help="list the arms and how many are done, run nothing")
    a("--estimate", action="store_true",
      help="time a few steps and one evaluation per model; print the grid's duration")
    a("--report-only", action="store_true", help="rebuild results.* from the finished arms, run nothing")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    d = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if data_dir is None:
        raise ExperimentError(f"no NL-RX-SYNTH data: pass --data-dir DIR (a folder with {TRAIN_FILE} and {TEST_FILE}, "
                              f"e.g. llm-jepa's datasets/) or set ${ENV_DIR}")
    missing = [f for f in (TRAIN_FILE, TEST_FILE) if not (data_dir / f).is_file()]
    if missing:
        raise ExperimentError(f"data directory {data_dir} lacks {', '.join(missing)}; pass --data-dir DIR with "
                              f"{TRAIN_FILE} and {TEST_FILE} (llm-jepa's datasets/ folder)")
    small = pick("lambdas_small")
    lambdas_small = None if small.strip() == "all" else options.floats(small, "--lambdas-small")
    workers = args.workers if args.workers is not None else options.cores()
    if workers < 1:
        raise ExperimentError(f"--workers must be >= 1, got {workers}")
    taps = [t.strip() for t in pick("taps").split(",") if t.strip()]
    bad = [t for t in taps if t not in TAPS]
    if bad or not taps:
        raise ExperimentError(f"--taps {pick('taps')!r}: accepted selections are {', '.join(TAPS)}")
    steps = pick("steps")
    for name, v, lo in (("--steps", steps, 1), ("--batch-size", args.batch_size, 1), ("--d-model", args.d_model, 16),
                        ("--n-spans", args.n_spans, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                        ("--decode-batch", args.decode_batch, 1), ("--train-rows", pick("train_rows") or 1, 1),
                        ("--test-rows", pick("test_rows") or 1, 1), ("--threads", args.threads or 1, 1)):
        if v < lo:
            raise ExperimentError(f"{name} must be >= {lo}, got {v}")
    if not args.lr > 0:
        raise ExperimentError(f"--lr must be > 0, got {args.lr}")
    warm = args.warmup_steps if args.warmup_steps is not None else max(1, steps // 20)
    if warm < 0:
        raise ExperimentError(f"--warmup-steps must be >= 0, got {warm}")
    return Settings(
        data_dir=str(data_dir), out=pick("out"),
        models=options.models(pick("models"), lambda p: model_config(p, args.d_model)),
        lambdas=options.floats(pick("lambdas"), "--lambdas"), lambdas_small=lambdas_small, taps=taps,
        fractions=options.fractions(pick("fractions")),
        seeds=options.seeds(pick("seeds")), d_model=args.d_model, steps=steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=warm, n_spans=args.n_spans, train_rows=pick("train_rows"), test_rows=pick("test_rows"),
        system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens, decode_batch=args.decode_batch,
        threads=args.threads, workers=workers, data_sha={f: options.sha(data_dir / f) for f in (TRAIN_FILE, TEST_FILE)},
    )


def command(argv: list[str]) -> int:
    """``amer experiment nlrx``; errors propagate as :class:`~amer.errors.AmerError` (one line, exit 2)."""
    return run_resumable(argv, build_parser(), settings_from_args, _command)


def _command(args: argparse.Namespace, s: Settings, argv: list[str]) -> int:
    if args.dry_run:
        grid = build_grid(s)
        done = finished_arms(s)
        for a in grid:
            print(f"{'done' if a.id in done else 'todo'}  {a.id}")
        print(f"{len(grid)} arms, {sum(a.id in done for a in grid)} done")
        return 0
    if args.estimate:
        estimate(s)
        return 0
    out = Path(s.out)
    if args.report_only:
        records = [check_stale(arm_path(s, a), s) for a in build_grid(s) if arm_path(s, a).is_file()]
        if not records:
            raise ExperimentError(f"no finished arms of this grid under {out / 'arms'}")
    else:
        records = run_grid(s)
    summary = summarize(records, s)
    # the command that produces these results (a --report-only rebuild reports what the run did)
    line = "amer experiment nlrx " + " ".join(a for a in argv if a != "--report-only")
    for p in write_report(summary, out, command=line.strip()):
        print(f"wrote {p}")
    print(summary["statement"])
    return 0


def main(argv: list[str] | None = None) -> int:
    """``amer experiment nlrx`` in-process: bad input prints one line and returns 2."""
    return run(command, list(sys.argv[1:] if argv is None else argv))
