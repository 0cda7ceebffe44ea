"""``amer bench SUITE... [--repeats N] [--quick] [--threads N] [--malloc tuned|system] [--compile] [--out FILE]``.

One table per suite on stdout, and the same rows as JSON with ``--out FILE`` (suites: :mod:`amer.bench`).

On a machine shared with other busy processes, use ``--threads 1``: with one OpenMP thread per core
and the cores oversubscribed, every parallel op waits for a descheduled sibling thread and a training
step measured 2-20x slower and erratic, while a single thread stays steady and ratios stay sound. The
header prints the load average and warns when it exceeds the core count.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from amer.bench import SUITES, BenchOptions, format_table, machine_info, run_suite, select_suites
from amer.cli.base import ArgParser
from amer.config import ConfigError
from amer.configio import number_arg, path_arg
from amer.report import write_json
from amer.runtime import tune_malloc

__all__ = ["command", "build_parser"]

log = logging.getLogger(__name__)


def build_parser() -> ArgParser:
    p = ArgParser(prog="amer bench", description="Benchmarks of amer (tables on stdout, JSON with --out).")
    p.add_argument("suite", nargs="+", help=f"one or more of: {', '.join(SUITES)}, all")
    p.add_argument("--repeats", type=number_arg(True, ge=1), default=None,
                   help="timed rounds per figure (median reported; default 10, "
                   "3 with --quick)")
    p.add_argument("--warmup", type=number_arg(True, ge=0), default=None,
                   help="untimed rounds first (default 2, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): checks that everything runs")
    p.add_argument("--threads", type=number_arg(True, ge=1, le=4096), default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=number_arg(True, ge=0), default=0)
    p.add_argument("--malloc", choices=("system", "tuned"), default="tuned",
                   help="'tuned' (default, as `amer train` and `amer experiment` run) keeps freed large blocks "
                   "mapped (glibc mallopt; see amer.runtime.tune_malloc); 'system' leaves glibc's defaults")
    p.add_argument("--compile", action="store_true",
                   help="compile the blocks of every amer model the suites build (regional torch.compile, fullgraph; "
                   "dropless MoE blocks without grouped GEMM stay eager); the compiled suite compares both itself")
    p.add_argument("--out", default=None, type=path_arg, help="also write the results as JSON to this file")
    return p


def command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    names = select_suites(args.suite)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.out is not None:  # refuse before minutes of benchmarking, not after
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise ConfigError(f"--out {args.out}: directory {out_dir} does not exist")
        if os.path.isdir(args.out):
            raise ConfigError(f"--out {args.out} is a directory; give a file name such as bench.json")
    if args.malloc == "tuned" and not tune_malloc():
        log.warning("note: --malloc tuned needs glibc (mallopt); running with the system allocator")
        args.malloc = "system"
    opts = BenchOptions(repeats=repeats, warmup=warmup, quick=args.quick, threads=args.threads, seed=args.seed,
                        compile=args.compile)
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        _run(names, opts, args.out, args.malloc)
    finally:  # also called in-process (tests, amer.cli): leave the thread count as found
        torch.set_num_threads(threads_before)
    return 0


def _run(names: list[str], opts: BenchOptions, out: str | None, malloc: str) -> None:
    info = machine_info()
    print(f"amer bench on {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads), "
          + (f"{info['gpu']}, " if info.get("gpu") else "")
          + f"torch {info['torch']}, {info['date']}; median of {opts.repeats} after {opts.warmup} warm-up; "
          f"malloc {malloc}; load average {info['load_avg']}" + ("; blocks compiled" if opts.compile else "")
          + (" [quick]" if opts.quick else ""), flush=True)
    load = info["load_avg"]
    if load is not None and info["cores"] and load > info["cores"] - 0.5 and torch.get_num_threads() > 1:
        print(f"warning: the machine is busy (load average {load} on {info['cores']} cores); with "
              f"{torch.get_num_threads()} threads per op, timings stall on threads that are not scheduled. "
              "--threads 1 measures robustly on a shared machine", flush=True)
    results: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        res = run_suite(name, opts)
        print(format_table(res), flush=True)
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
        results[name] = res.as_dict()
    if out is not None:
        payload = {"machine": info, "options": {"repeats": opts.repeats, "warmup": opts.warmup, "quick": opts.quick,
                                                "threads": opts.threads, "seed": opts.seed, "malloc": malloc,
                                                "compile": opts.compile},
                   "suites": results}
        try:
            write_json(out, payload, compact_lists=False)
        except OSError as e:
            raise ConfigError(f"--out {out}: {e.strerror}") from None
