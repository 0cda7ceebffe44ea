"""Stopping a run when asked: Ctrl-C (SIGINT), a scheduler's preemption (SIGTERM), a closed terminal (SIGHUP).

``amer train`` installs :class:`StopOnSignal` around a run (signal handlers belong to whoever owns the process:
a library caller of :func:`amer.training.train` keeps its own). The first signal only records the request;
the loop reads it (:func:`agreed`) before each step, so the step in progress finishes, a checkpoint of it is
written, and the command exits with 128 + the signal's number (130, 143, 129), as a shell reports a process a
signal ended. A preempted run loses no step. Under torchrun every rank asks every other before each step
(one all-reduce of one number), so all stop after the same step whichever of them the signal reached.

A second signal more than a second after the first stops at once, as Ctrl-C always did: the last complete
checkpoint stays (every write is atomic, :mod:`amer.fileio`). One within a second is the same request
delivered twice (torchrun forwards the signal it got to workers that a terminal or ``scancel`` signalled too).
``--stop-budget S`` bounds the whole: a checkpoint not written S seconds after the signal is abandoned the
same way, before a scheduler's ``SIGKILL`` can come.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import torch

__all__ = ["STOP_SIGNALS", "StopOnSignal", "requested", "agreed", "signal_name"]

log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
REPEAT_S = 1.0  # a second signal sooner than this is the first one delivered twice

_requested: int | None = None  # the first stop signal of the run in progress (None: carry on)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _requested


def agreed(layout: Any) -> int | None:
    """The stop request every rank acts on before the same step: this process's, or under torchrun any rank's
    (all-reduced, so every rank gets the same answer at the same step)."""
    if not getattr(layout, "distributed", False):
        return _requested
    import torch.distributed as dist

    device = layout.device if layout.device.type == "cuda" else torch.device("cpu")  # NCCL reduces on the GPU
    flag = torch.tensor([_requested or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


class StopOnSignal:
    """``with StopOnSignal(budget):`` turns SIGINT, SIGTERM and SIGHUP into a request to stop after the current
    step (see the module). ``budget`` > 0 seconds: past it, stop at once. Outside the main thread (where no
    handler can be installed) it does nothing."""

    def __init__(self, budget: float = 0.0) -> None:
        self.budget = budget
        self.signum: int | None = None
        self._at = 0.0
        self._forced = False
        self._timer: threading.Timer | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        global _requested
        _requested = None
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        global _requested
        if self._timer is not None:
            self._timer.cancel()
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        _requested = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        global _requested
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._at, _requested = signum, now, signum
            again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
            limit = f"; at most {self.budget:g} s" if self.budget > 0 else ""
            log.warning(f"{signal_name(signum)}: stopping after the step in progress, with a checkpoint of it "
                        f"({again} stops at once, keeping the last complete checkpoint{limit})")
            if self.budget > 0:
                self._timer = threading.Timer(self.budget, self._expire)
                self._timer.daemon = True
                self._timer.start()
            return
        if self._forced or now - self._at >= REPEAT_S:
            raise KeyboardInterrupt

    def _expire(self) -> None:
        """The budget is spent: interrupt the main thread with a real signal (a blocking write wakes up too)."""
        self._forced = True
        log.warning(f"the {self.budget:g} s stop budget is spent: stopping at once")
        signal.pthread_kill(threading.main_thread().ident, self.signum or signal.SIGINT)
