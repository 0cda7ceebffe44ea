"""What a run shows and keeps: JSONL lines plus TensorBoard scalars with the same names, and the progress
bar (or plain lines when there is no terminal)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

__all__ = ["RunLogger", "Progress"]


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


class Progress:
    """A tqdm bar on a terminal; plain log lines when piped (nohup, CI); nothing when quiet."""

    def __init__(self, total: int, initial: int, *, enabled: bool, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        if enabled and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None)
            if self.bar.disable:
                self.bar = None

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        elif not self.quiet:
            print(msg)

    def show(self, postfix: dict[str, str], line: Callable[[], str]) -> None:
        """Figures of a log step: on the bar, or as one plain line."""
        if self.bar is not None:
            self.bar.set_postfix(**postfix)
        elif not self.quiet:
            print(line())

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
