"""``amer experiment NAME ...``: hands the rest of the command line to ``amer.cli.experiment_NAME``, the command
line of the experiment package ``amer.experiments.NAME``."""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable
from typing import Any

from amer.configio import suggest
from amer.errors import ExperimentError
from amer.experiments import EXPERIMENTS

__all__ = ["command", "usage", "run_resumable"]

log = logging.getLogger(__name__)


def run_resumable(argv: list[str], parser: argparse.ArgumentParser, settings: Callable[[argparse.Namespace], Any],
                  body: Callable[[argparse.Namespace, Any, list[str]], int]) -> int:
    """Parse ``argv``, validate it into settings, set the process up for many small models (allocator, torch
    threads) and run ``body(args, settings, argv)``. Ctrl-C exits 130 with a line saying what is kept: every
    experiment writes finished work as it goes, so the same command continues it. Bad input propagates as
    :class:`~amer.errors.AmerError` (one line, exit 2)."""
    import torch

    from amer.runtime import tune_malloc

    try:
        args = parser.parse_args(argv)
        s = settings(args)
        tune_malloc()
        if s.threads:
            torch.set_num_threads(s.threads)
        return body(args, s, argv)
    except KeyboardInterrupt:
        log.warning("interrupted: finished work is kept; run the same command again to continue")
        return 130


def _summary(name: str) -> str:
    doc = importlib.import_module(f"amer.experiments.{name.replace('-', '_')}").__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    lines = ["usage: amer experiment NAME [options]; amer experiment NAME --help", "", "experiments:"]
    lines += [f"  {name:<14} {_summary(name)}" for name in EXPERIMENTS]
    return "\n".join(lines) + "\n"


def command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in EXPERIMENTS:
        hint = suggest(name, EXPERIMENTS, cutoff=0.6)
        raise ExperimentError(f"unknown experiment '{name}'{hint} (experiments: {', '.join(EXPERIMENTS)})")
    return importlib.import_module(f"amer.cli.experiment_{name.replace('-', '_')}").command(rest)
