"""``amer experiment nlrx``: flags, their defaults (full grid and ``--quick``), validation into
:class:`~amer.experiments.nlrx.grid.Settings`, the duration estimate, and the command itself."""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from amer.cli.base import ArgParser, run
from amer.configio import INT_MAX, number_arg
from amer.errors import ExperimentError
from amer.experiments.nlrx.data import ENV_DIR, TEST_FILE, TRAIN_FILE, default_data_dir
from amer.experiments.nlrx.grid import TAPS, Settings, build_grid, model_config
from amer.experiments.nlrx.report import summarize, write_report
from amer.experiments.nlrx.runner import arm_path, check_stale, cores, estimate, finished_arms, run_grid
from amer.runtime import tune_malloc

__all__ = ["ENV_DIR", "FULL_DEFAULTS", "QUICK_DEFAULTS", "default_data_dir", "build_parser", "settings_from_args",
           "estimate", "command", "main"]

MAX_SEEDS = 1000  # --seeds N: each seed is a whole grid of arms
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


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExperimentError(f"{flag} {text!r}: expected comma-separated numbers like 0,0.02") from None
    if not vals or any(v < 0 or not math.isfinite(v) for v in vals):
        raise ExperimentError(f"{flag} {text!r}: expected one or more finite numbers >= 0")
    return sorted(dict.fromkeys(vals))


def _fractions(text: str) -> list[str]:
    out = []
    for x in text.split(","):
        x = x.strip()
        try:
            f = Fraction(x)
        except (ValueError, ZeroDivisionError):
            raise ExperimentError(f"--fractions: {x!r} is not a fraction; expected e.g. 1,1/4,1/16") from None
        if not 0 < f <= 1:
            raise ExperimentError(f"--fractions: {x!r} must be in (0, 1]")
        out.append(str(f))
    if not out:
        raise ExperimentError("--fractions: expected e.g. 1,1/4,1/16")
    return sorted(dict.fromkeys(out), key=lambda f: -Fraction(f))


def _seeds(text: str) -> list[int]:
    try:
        if "," not in text:
            n = int(text)
            if not 1 <= n <= MAX_SEEDS:  # a count: every seed is a full set of arms
                raise ValueError
            return list(range(n))
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExperimentError(f"--seeds {text!r}: expected a count from 1 to {MAX_SEEDS} like 3, or a list like "
                              "0,1,2") from None
    if not seeds or any(not 0 <= s <= INT_MAX for s in seeds):
        raise ExperimentError(f"--seeds {text!r}: expected seeds from 0 to 2^63-1")
    return sorted(dict.fromkeys(seeds))


def _models(text: str, d_model: int) -> list[tuple[str, str]]:
    out = []
    for item in text.split(","):
        name, sep, pattern = item.partition("=")
        name, pattern = name.strip(), pattern.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9-]+", name) or not pattern:
            raise ExperimentError(f"--models item {item!r}: expected NAME=PATTERN with NAME of letters, digits, '-' "
                                  "(e.g. hybrid=AMER)")
        model_config(pattern, d_model)  # a bad pattern or width fails here, before any training
        out.append((name, pattern))
    if len({n for n, _ in out}) != len(out):
        raise ExperimentError(f"--models {text!r}: model names must be distinct")
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


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
    lambdas_small = None if small.strip() == "all" else _floats(small, "--lambdas-small")
    workers = args.workers if args.workers is not None else cores()
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
        data_dir=str(data_dir), out=pick("out"), models=_models(pick("models"), args.d_model),
        lambdas=_floats(pick("lambdas"), "--lambdas"), lambdas_small=lambdas_small, taps=taps,
        fractions=_fractions(pick("fractions")),
        seeds=_seeds(pick("seeds")), d_model=args.d_model, steps=steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=warm, n_spans=args.n_spans, train_rows=pick("train_rows"), test_rows=pick("test_rows"),
        system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens, decode_batch=args.decode_batch,
        threads=args.threads, workers=workers, data_sha={f: _sha(data_dir / f) for f in (TRAIN_FILE, TEST_FILE)},
    )


def command(argv: list[str]) -> int:
    """``amer experiment nlrx``; errors propagate as :class:`~amer.errors.AmerError` (one line, exit 2)."""
    try:
        return _command(build_parser().parse_args(argv), argv)
    except KeyboardInterrupt:
        print("interrupted: finished arms are kept; run the same command again to continue", file=sys.stderr)
        return 130


def _command(args: argparse.Namespace, argv: list[str]) -> int:
    s = settings_from_args(args)
    tune_malloc()
    if s.threads:
        torch.set_num_threads(s.threads)
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
