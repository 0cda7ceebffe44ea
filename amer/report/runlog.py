"""A training run's ``log.jsonl`` read back as series, for the curves figure and ``amer plot``.

The loop appends one JSON object per line: a training record (``ce``, ``stp``, ``stp/<tap>``,
``curv/...``, ``tokens_per_s`` ...) every log interval, a validation record (``val/loss``, ``val/bpb``, ``val/stp``)
at every evaluation, and ``{"skipped": 1, "skipped_reason": ...}`` for a step the guard refused. Reading
rules, so that a log reads as one uninterrupted run:

- a line that is not a JSON object with a numeric ``step`` (a torn last line a kill left) is ignored;
- records for the same step merge, a later value replacing an earlier one for the same key;
- a record whose step is *below* the largest step seen so far starts a restart (a resumed run whose log
  was not truncated): what the abandoned run logged after that step is dropped;
- a number that is ``null`` (a non-finite figure, see :mod:`amer.training.log`) is a gap, not a zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from amer.errors import AnalysisError
from amer.fileread import json_loads, read_regular

__all__ = ["RunLog", "read_run", "parse_log"]

LOG_NAME = "log.jsonl"


@dataclass
class RunLog:
    """One run's log as arrays: ``series(key)`` is ``(steps, values)`` over the records that carry ``key``."""

    name: str
    steps: np.ndarray  # every step with a record, ascending
    records: list[dict[str, Any]]  # merged record per step, same order
    skipped: list[int] = field(default_factory=list)  # steps the guard skipped
    stp_start: int | None = None  # the step after which the STP gate opens (None: never in this run)
    _cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        """Every numeric key in the log, in first-seen order."""
        seen: dict[str, None] = {}
        for rec in self.records:
            for k, v in rec.items():
                if k != "step" and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))):
                    seen.setdefault(k, None)
        return list(seen)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of ``key``; a ``null`` value is NaN (a gap in the line)."""
        if key not in self._cache:
            xs, ys = [], []
            for step, rec in zip(self.steps.tolist(), self.records):
                if key in rec:
                    v = rec[key]
                    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                        xs.append(step)
                        ys.append(math.nan if v is None else float(v))
            self._cache[key] = (np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
        return self._cache[key]

    def has(self, key: str) -> bool:
        return self.series(key)[0].size > 0


def parse_log(lines: list[str], name: str = "run") -> RunLog:
    """A :class:`RunLog` from the lines of a ``log.jsonl`` (see the module docstring for the rules)."""
    by_step: dict[int, dict[str, Any]] = {}
    skipped: set[int] = set()
    top = -1
    for line in lines:
        try:
            rec = json_loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            continue
        step = int(step)
        if step < top:  # a restart from an earlier checkpoint: the abandoned future is not this run's
            by_step = {s: r for s, r in by_step.items() if s <= step}
            skipped = {s for s in skipped if s <= step}
        top = step
        if rec.get("skipped"):
            skipped.add(step)
            continue
        by_step.setdefault(step, {}).update(rec)
    order = sorted(by_step)
    return RunLog(name, np.asarray(order, dtype=float), [by_step[s] for s in order], sorted(skipped))


def _stp_start(run_dir: Path, log: RunLog) -> int | None:
    """Where the STP gate opens: the run config's ``stp.start_step`` (exact: steps after it carry STP) when
    the run has STP enabled, else the first logged step with ``stp/coeff > 0`` (a log without its config)."""
    try:
        stp = json_loads((run_dir / "config.json").read_bytes()).get("stp")
    except (OSError, ValueError, AttributeError):
        stp = None
    if isinstance(stp, dict):
        start = stp.get("start_step")
        if stp.get("enabled") and isinstance(start, int) and not isinstance(start, bool):
            return start
        if stp.get("enabled") is False:
            return None
    steps, coeff = log.series("stp/coeff")
    on = steps[np.nan_to_num(coeff) > 0]
    return int(on[0]) if on.size else None


def read_run(path: str | Path, name: str | None = None, *, allow_empty: bool = False) -> RunLog:
    """Read a run directory (or its ``log.jsonl`` directly). Raises :class:`AnalysisError` naming the problem
    when the path is missing, has no ``log.jsonl`` or (unless ``allow_empty``) the log has no record."""
    p = Path(path)
    if not p.exists():
        raise AnalysisError(f"run {str(path)!r} does not exist; give a run directory holding {LOG_NAME}")
    log_path = p / LOG_NAME if p.is_dir() else p
    run_dir = log_path.parent
    if not log_path.exists():
        raise AnalysisError(f"{str(path)!r} holds no {LOG_NAME}; give a run directory written by amer train "
                            f"(or its {LOG_NAME})")
    raw = read_regular(log_path, lambda why: AnalysisError(f"{log_path} {why}; give a run directory written by "
                                                           f"amer train (or its {LOG_NAME})"))
    text = raw.decode("utf-8", errors="replace")
    log = parse_log(text.splitlines(), name or (run_dir.name if p.is_dir() or p.name == LOG_NAME else p.stem))
    if not log.records and not log.skipped and not allow_empty:
        raise AnalysisError(f"{log_path} has no training records yet (a JSON line per log step); nothing to plot")
    log.stp_start = _stp_start(run_dir, log)
    return log
