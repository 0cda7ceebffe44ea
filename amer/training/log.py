"""What a run shows and keeps: JSONL lines plus TensorBoard scalars with the same names, and the progress
bar (or plain lines when there is no terminal)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from amer.fileio import append_bytes, atomic_write_bytes
from amer.fileread import json_loads

__all__ = ["RunLogger", "Progress"]

log = logging.getLogger(__name__)


class RunLogger:
    """JSONL lines plus TensorBoard scalars with the same names."""

    def __init__(self, run_dir: Path, tensorboard: bool, *, resume_step: int | None = None) -> None:
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if resume_step is not None and self.path.exists():
            _truncate_log(self.path, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(run_dir), purge_step=purge)
            except ImportError:  # tensorboard not installed: JSONL only, said once
                log.warning("note: tensorboard is not installed; writing log.jsonl only (pip install tensorboard)")

    def log(self, step: int, record: dict[str, Any]) -> None:
        line = json.dumps({"step": step, **{k: _json_value(v) for k, v in record.items()}}, allow_nan=False) + "\n"
        append_bytes(self.path, line.encode("utf-8"))  # a kill leaves at most a torn last line, dropped on resume
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _json_value(v: Any) -> Any:
    """NaN and infinity are not JSON: a figure that has no finite value is logged as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _log_step(line: str) -> float | None:
    """The step of a line amer wrote, or None for a line it cannot read (kept: it is not amer's to drop)."""
    try:
        rec = json_loads(line)
    except ValueError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return float(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def _truncate_log(path: Path, resume_step: int) -> None:
    """Drop the lines of steps after ``resume_step``, which the resumed run will redo (so every step appears once
    and the log reads as one uninterrupted run), and a torn last line a kill left. Every other line stays. The
    new log replaces the old in one rename: a kill during the rewrite leaves the old log whole."""
    raw = path.read_bytes()
    lines = raw.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):  # a kill mid-append: never a complete record
        lines.pop()
    steps = [_log_step(line.decode("utf-8", "replace")) for line in lines]
    kept = [line for line, step in zip(lines, steps) if step is None or step <= resume_step]
    new = b"".join(kept)
    if new != raw:
        atomic_write_bytes(path, new)


class Progress:
    """A tqdm bar on a terminal; plain log lines when piped (nohup, CI); nothing when quiet. Messages go to
    the ``amer`` loggers, whose handler (:mod:`amer.logs`) writes them above the bar."""

    def __init__(self, total: int, initial: int, *, enabled: bool, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        if enabled and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None)
            if self.bar.disable:
                self.bar = None

    def say(self, msg: str, level: int = logging.INFO) -> None:
        if not self.quiet:
            log.log(level, msg)

    def show(self, postfix: dict[str, str], line: Callable[[], str]) -> None:
        """Figures of a log step: on the bar, or as one plain line."""
        if self.bar is not None:
            self.bar.set_postfix(**postfix)
        elif not self.quiet:
            log.info(line())

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
