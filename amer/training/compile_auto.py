"""``--compile auto`` (the default): compile the blocks only when the run is long enough to pay the warm-up back.

The first four training steps run eager; the median of steps 2 to 4 is the eager step time (the first also pays
one-off costs: allocator growth, kernel choices). Then::

    compile  iff  steps_left * eager_step_s * (1 - 1 / speedup)  >  warmup_s

``warmup_s`` (the first compiled step's extra time: tracing and code generation, far less with a warm cache) and
``speedup`` (eager step / compiled step) come from the last measurement of the same workload on this machine,
kept in ``compile-timings.json`` beside the compile cache (:func:`cache_dir`). The key is everything that decides
them: the model config, batch shape, gradient accumulation, dtype, the machine (CPU model or GPU name), activation
checkpointing, packing, STP, the thread count and the torch version. A workload seen for the first time is estimated
with :data:`FIRST_GUESS` (measured on the 2-core CPU of the documentation) and then measured: every ``auto`` run
that compiles records what it saw, so the next decision is made from a measurement. Only runs that compile measure:
a workload once measured not to pay stays eager until its entry is removed (delete the file to start afresh).
The warm-up of the evaluation graphs (no gradients, built at the first evaluation) is not in the figure.

The compile cache (inductor's FX graph cache and AOT autograd's cache) lives in one directory per user that
survives reboots (``$AMER_CACHE_DIR``, else ``$XDG_CACHE_HOME/amer``, else ``~/.cache/amer``; an explicit
``TORCHINDUCTOR_CACHE_DIR`` wins), so a second run, or another process, of the same model loads the compiled code
instead of building it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from amer.fileio import write_json
from amer.fileread import json_loads, read_regular

__all__ = ["FIRST_GUESS", "Estimate", "Decision", "cache_dir", "use_cache_dir", "machine_name", "workload_key",
           "estimate", "decide", "record", "Timer"]

log = logging.getLogger(__name__)

TIMINGS = "compile-timings.json"


class Estimate(NamedTuple):
    warmup_s: float  # extra time of the first compiled step
    speedup: float  # eager step time / compiled step time
    measured: bool  # from a past run of this workload (False: FIRST_GUESS)


# A workload never measured here: inductor on the 2-core CPU built the small preset's block graphs in 70-129 s cold
# (up to 30 s per graph) for 1.08-1.14x; a guess that errs towards eager, since an unpaid warm-up costs more than a
# missed speedup.
FIRST_GUESS_PER_GRAPH_S = 25.0
FIRST_GUESS_SPEEDUP = 1.15
FIRST_GUESS = Estimate(FIRST_GUESS_PER_GRAPH_S, FIRST_GUESS_SPEEDUP, False)


class Decision(NamedTuple):
    compile: bool
    saved_s: float  # what compiling would save over the steps left, at the estimated speedup
    estimate: Estimate

    def describe(self, steps_left: int, eager_step_s: float) -> str:
        e = self.estimate
        src = "measured on an earlier run" if e.measured else "first guess, no earlier run of this workload"
        verdict = "on" if self.compile else "off (use --compile on to force it)"
        return (f"compile auto: {verdict}: {steps_left} steps x {eager_step_s * 1e3:.0f} ms x "
                f"{1 - 1 / e.speedup:.0%} saved = {self.saved_s:.0f} s against a {e.warmup_s:.0f} s warm-up "
                f"({e.speedup:.2f}x, {src})")


def cache_dir() -> Path:
    """amer's cache directory (created on use): ``$AMER_CACHE_DIR``, ``$XDG_CACHE_HOME/amer`` or ``~/.cache/amer``."""
    if os.environ.get("AMER_CACHE_DIR"):
        return Path(os.environ["AMER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "amer"


def use_cache_dir() -> Path:
    """Point torch's compile caches at amer's cache directory (unless the user set ``TORCHINDUCTOR_CACHE_DIR``) and
    return the directory in use. Inductor reads the variable whenever it looks a cache entry up, so this applies at
    once; it also writes its default there on first use, which is not the user's choice and is replaced."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def machine_name(device: torch.device) -> str:
    """The device as timings depend on it: the GPU's name, or the CPU model (``/proc/cpuinfo``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{device.type} {model or platform.processor() or platform.machine()}"


def workload_key(model_cfg: dict[str, Any], **shape: Any) -> str:
    """What decides warm-up and speedup, hashed: the model config, the step's shape and settings, torch's version."""
    what = {"model": model_cfg, **shape, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read() -> dict[str, Any]:
    path = cache_dir() / TIMINGS
    try:
        data = json_loads(read_regular(path, ValueError))
    except (OSError, ValueError):  # absent, unreadable or damaged: measurements are a cache, start again
        return {}
    return data if isinstance(data, dict) else {}


def estimate(key: str, n_graphs: int) -> Estimate:
    """The last measurement of workload ``key``, else the first guess for ``n_graphs`` distinct block graphs."""
    got = _read().get(key)
    try:
        warmup, speedup = float(got["warmup_s"]), float(got["speedup"])
    except (TypeError, KeyError, ValueError):
        warmup = speedup = math.nan
    if math.isfinite(warmup) and warmup >= 0 and math.isfinite(speedup) and speedup > 0:
        return Estimate(warmup, speedup, True)
    return Estimate(FIRST_GUESS_PER_GRAPH_S * max(1, n_graphs), FIRST_GUESS_SPEEDUP, False)  # absent or damaged


def decide(steps_left: int, eager_step_s: float, est: Estimate) -> Decision:
    saved = steps_left * eager_step_s * (1 - 1 / est.speedup) if est.speedup > 0 else 0.0
    return Decision(saved > est.warmup_s, saved, est)


def record(key: str, warmup_s: float, speedup: float) -> None:
    """Keep this workload's measurement for the next decision (best effort: a read-only cache only loses it)."""
    data = _read()
    data[key] = {"warmup_s": round(max(0.0, warmup_s), 3), "speedup": round(speedup, 4)}
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_json(cache_dir() / TIMINGS, data)
    except (OSError, ValueError) as e:  # ValueError: amer refuses to write through a link, for one
        log.debug("compile timings not kept: %s", e)


@dataclass
class Timer:
    """The auto decision's measurements over the first steps of a run (see the module docstring)."""

    key: str
    eager_step_s: float = 0.0
    first_compiled_s: float | None = None  # the first compiled step, warm-up included
    compiled_steps: list[float] | None = None
    steady_needed: int = 5  # compiled steps timed before the speedup is recorded

    def compiled_step(self, seconds: float) -> tuple[float, float] | None:
        """Count one compiled step; once enough are timed, record and return (warm-up s, speedup), else None."""
        if self.first_compiled_s is None:
            self.first_compiled_s, self.compiled_steps = seconds, []
            return None
        assert self.compiled_steps is not None
        self.compiled_steps.append(seconds)
        if len(self.compiled_steps) != self.steady_needed:
            return None
        steady = statistics.median(self.compiled_steps)
        warmup, speedup = self.first_compiled_s - steady, self.eager_step_s / steady
        record(self.key, warmup, speedup)
        return warmup, speedup
