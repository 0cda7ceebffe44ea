"""Command-line values every experiment reads the same way: number lists, data fractions, seeds, named
patterns, file fingerprints and the default worker count. Each parser returns a normalised, de-duplicated
value or raises :class:`~amer.errors.ExperimentError` with one line naming the flag and what it accepts."""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from amer.configio import INT_MAX
from amer.errors import ExperimentError

__all__ = ["MAX_SEEDS", "floats", "fractions", "seeds", "models", "sha", "cores"]

MAX_SEEDS = 1000  # --seeds N: each seed is a whole grid of arms


def floats(text: str, flag: str, *, positive: bool = False) -> list[float]:
    """``0,0.02`` -> ``[0.0, 0.02]``: finite, ``>= 0`` (``> 0`` with ``positive``), sorted, unique."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExperimentError(f"{flag} {text!r}: expected comma-separated numbers like 0,0.02") from None
    if not vals or any(not math.isfinite(v) or v < 0 or (positive and v == 0) for v in vals):
        raise ExperimentError(f"{flag} {text!r}: expected one or more finite numbers {'> 0' if positive else '>= 0'}")
    return sorted(dict.fromkeys(vals))


def fractions(text: str) -> list[str]:
    """``1,1/4,1/16`` -> the fractions in (0, 1] as canonical strings, largest first."""
    out = []
    for x in (x.strip() for x in text.split(",")):
        try:
            f = Fraction(x)
        except (ValueError, ZeroDivisionError):
            raise ExperimentError(f"--fractions: {x!r} is not a fraction; expected e.g. 1,1/4,1/16") from None
        if not 0 < f <= 1:
            raise ExperimentError(f"--fractions: {x!r} must be in (0, 1]")
        out.append(str(f))
    return sorted(dict.fromkeys(out), key=lambda f: -Fraction(f))


def seeds(text: str) -> list[int]:
    """A count ``N`` (seeds ``0..N-1``, at most :data:`MAX_SEEDS`) or an explicit list ``0,1,2``."""
    try:
        if "," not in text:
            n = int(text)
            if not 1 <= n <= MAX_SEEDS:
                raise ValueError
            return list(range(n))
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExperimentError(f"--seeds {text!r}: expected a count from 1 to {MAX_SEEDS} like 3, or a list like "
                              "0,1,2") from None
    if not out or len(out) > MAX_SEEDS or any(not 0 <= s <= INT_MAX for s in out):
        raise ExperimentError(f"--seeds {text!r}: expected up to {MAX_SEEDS} seeds from 0 to 2^63-1")
    return sorted(dict.fromkeys(out))


def models(text: str, check: Callable[[str], object]) -> list[tuple[str, str]]:
    """``hybrid=AMER,dense=(AE)*2`` -> ``[(name, pattern), ...]``; ``check(pattern)`` raises on a pattern the
    experiment cannot build, so a typo fails before any training."""
    out = []
    for item in text.split(","):
        name, sep, pattern = (x.strip() for x in item.partition("="))
        if not sep or not re.fullmatch(r"[A-Za-z0-9-]+", name) or not pattern:
            raise ExperimentError(f"--models item {item!r}: expected NAME=PATTERN with NAME of letters, digits, '-' "
                                  "(e.g. hybrid=AMER)")
        check(pattern)
        out.append((name, pattern))
    if len({n for n, _ in out}) != len(out):
        raise ExperimentError(f"--models {text!r}: model names must be distinct")
    return out


def sha(path: Path | str) -> str:
    """A short content fingerprint: results trained on other data are refused, not mixed in."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cores() -> int:
    """CPU cores this process may run on: the default number of worker processes."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
