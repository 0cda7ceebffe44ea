"""The measuring instruments, built so that a noisy, shared machine still gives usable numbers.

* every figure is a median over ``repeats`` timed runs after warm-up runs;
* every comparison runs its variants in the same process, interleaved round by round (``A B B A A B ...``:
  the order flips each round so neither side always runs "second"), and a ratio is the median of the
  per-round ratios, so a slow spell of the machine hits both sides of a pair alike;
* peak memory is the high-water mark of live tensor bytes during one step, read from the CPU allocator's
  allocation and free events recorded by ``torch.profiler`` (``profile_memory=True``). That counts exactly
  the tensors the step holds (activations, gradients, temporaries) and nothing else: process RSS
  (``resource.getrusage``) would add the interpreter, the libraries and whatever the C allocator keeps
  cached, is a lifetime maximum (one subprocess per variant), and tracemalloc does not see torch's
  allocations at all. Parameters and optimizer state that exist before the step are not counted.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from amer.errors import ConfigError
from amer.report import text_table

__all__ = ["BenchOptions", "SuiteResult", "MB", "interleave", "paired_ratio", "median", "peak_tensor_bytes",
           "format_table", "machine_info"]

MB = 1024.0 * 1024.0


@dataclass
class BenchOptions:
    """What every suite reads: sizes come from ``quick`` (tiny, for the smoke test) or the real settings."""

    repeats: int = 10
    warmup: int = 2
    quick: bool = False
    threads: int | None = None
    seed: int = 0
    compile: bool = False  # blocks regionally compiled in every suite that builds amer models
    compile_backend: str | None = None  # compiled suite's and peers' backend (default: inductor; aot_eager with quick)

    @property
    def preset(self) -> str:
        return "tiny" if self.quick else "small"

    @property
    def batch(self) -> int:
        return 2 if self.quick else 8

    @property
    def seq_len(self) -> int:
        return 32 if self.quick else 256


@dataclass
class SuiteResult:
    """Rows of one suite (flat dicts of str/float/int) plus free-text notes (skips, formulas)."""

    suite: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "notes": self.notes}


def interleave(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions interleaved round by round.

    ``warmup`` untimed rounds first (allocator, lazily built optimizer state, first-call dispatch), then
    ``repeats`` timed rounds; the order of the functions is reversed every other round, so over a run
    each one is as often first as last. Returns ``{name: [seconds per round]}`` (rounds aligned, which is
    what :func:`paired_ratio` needs).
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[r] / den[r]``: machine noise that hits a whole round cancels."""
    return statistics.median(n / d for n, d in zip(num, den))


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """High-water mark of live CPU tensor bytes allocated while ``fn`` runs (relative to its start).

    Reads the allocator's ``[memory]`` events from ``torch.profiler`` (``profile_memory=True``): every
    allocation and free with its size, in time order. See the module docstring for why this and not RSS.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or math.isnan(v) or math.isinf(v):
            return f"{v:g}"
        mag = abs(v)
        if mag >= 1000:
            return f"{v:,.0f}"
        if mag >= 10:
            return f"{v:.1f}"
        if mag >= 1:
            return f"{v:.3f}"
        return f"{v:.4f}"
    return str(v)


def format_table(result: SuiteResult) -> str:
    """One suite as text: a title, its rows (columns: the union of the rows' keys, in first-seen order),
    then its notes."""
    cols: list[str] = []
    for row in result.rows:
        cols += [k for k in row if k not in cols]
    lines = [f"== {result.suite} =="]
    if cols:
        cells = [[_fmt(row.get(c, "")) for c in cols] for row in result.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

        # figures right-aligned (digits line up for comparison); text_table then only pads the name column
        def align(r: list[str]) -> list[str]:
            return [v if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))]

        lines.append(text_table(align(cols), [align(r) for r in cells]))
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_avg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
