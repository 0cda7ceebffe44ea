"""Module-level jobs for the worker-process tests (spawned workers import them by name)."""

from __future__ import annotations

import os
import time

from amer.errors import DataError

_BASE = 0


def set_base(base: int) -> None:
    global _BASE
    _BASE = base


def fail_init(path: str) -> None:
    raise DataError(f"cannot read {path}")


def square(x: int) -> tuple[int, int]:
    return x, _BASE + x * x


def fail_on(x: int) -> int:
    if x == 3:
        raise DataError(f"job {x} is bad")
    time.sleep(0.05 * x)
    return x


def die_on(x: int) -> int:
    if x == 1:
        os._exit(7)  # as a segfault or the OOM killer would: no answer, no exception
    return x


def pid(x: int) -> int:
    time.sleep(0.2)
    return os.getpid()
