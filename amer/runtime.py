"""Process and device settings: which device, which autocast, how the allocator behaves.

Kept apart from model code: these decide where and how fast a process runs, never what it computes.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from contextlib import AbstractContextManager

import torch

from amer import xla
from amer.errors import ConfigError

__all__ = ["resolve_device", "autocast", "tune_malloc", "bfloat16_native", "warn_slow_bfloat16"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``name`` as a device this machine has; ``auto`` picks CUDA when present; ``xla`` is torch_xla's device
    (a TPU, or the host under PJRT_DEVICE=CPU). Bad names: ConfigError."""
    if name == "xla":
        return xla.xla_device()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: accepted values are cpu, cuda, cuda:N, xla, auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (accepted here: cpu, auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: accepted values are cpu, cuda, cuda:N, xla, auto")
    return dev


def autocast(dtype: str, device: torch.device | str) -> AbstractContextManager:
    """bfloat16 autocast for ``dtype == "bfloat16"``; for float32, autocast explicitly off (so a caller's
    outer autocast does not leak into an fp32 run)."""
    kind = torch.device(device).type
    if dtype == "bfloat16":
        return torch.autocast(device_type=kind, dtype=torch.bfloat16)
    return torch.autocast(device_type=kind, enabled=False)

# x86 (AVX512-BF16, AMX) and Arm (BF16) instructions that run bfloat16 matmuls natively
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
_BF16_CHECKED = False


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo ('flags' on x86, 'Features' on Arm); None where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def bfloat16_native() -> bool | None:
    """Whether this CPU runs bfloat16 matmuls in hardware (None: its flags cannot be read)."""
    flags = _cpu_flags()
    return None if flags is None else any(f in flags for f in _BF16_FLAGS)


def _bf16_slowdown(size: int = 256, repeats: int = 5) -> float:
    """How many times slower a bfloat16-autocast linear layer runs than a float32 one here (best of a few)."""
    x, w = torch.randn(size, size), torch.randn(size, size)

    def best(dtype: torch.dtype | None) -> float:
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    return best(torch.bfloat16) / max(best(None), 1e-9)


def warn_slow_bfloat16(dtype: str, device: torch.device, *, quiet: bool = False) -> float | None:
    """Once per process: warn (on stderr) when ``--dtype bfloat16`` on this CPU is slower than float32 because
    it lacks bfloat16 instructions, naming the measured slowdown. Returns the slowdown when it warned."""
    global _BF16_CHECKED
    if dtype != "bfloat16" or device.type != "cpu" or _BF16_CHECKED:
        return None
    _BF16_CHECKED = True
    if bfloat16_native():
        return None
    slowdown = _bf16_slowdown()
    if slowdown < 1.5:  # flags unreadable (or a CPU this list misses) but fast enough: nothing to say
        return None
    if not quiet:
        capability = torch.backends.cpu.get_cpu_capability()
        log.warning(f"warning: --dtype bfloat16 on this CPU ({capability}, no AVX512-BF16/AMX-BF16 instructions) is "
              f"emulated: a bfloat16 matmul measured {slowdown:.1f}x slower than float32 here; "
              "--dtype float32 trains faster on this machine")
    return slowdown


_TUNED = False


def tune_malloc() -> bool:
    """Make glibc keep freed large blocks in the heap instead of returning them to the OS.

    By default glibc serves large allocations (past a threshold that adapts up to 32 MB) with fresh
    ``mmap``s and trims the heap top after frees, so many of a training step's activation-sized
    tensors land on pages the kernel must fault in and zero again, every step. On CPU that costs a
    large share of every elementwise pass (a (8, 256, 192) zero-fill measured 0.66 ms instead of
    0.10 ms). Fixing the mmap threshold at its maximum and the trim threshold very high keeps those
    pages mapped: the same effect as running under jemalloc / tcmalloc, which PyTorch's CPU tuning
    guide recommends. Process-wide; returns False where it cannot be applied (not glibc).
    """
    global _TUNED
    if _TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    _TUNED = bool(mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
                  and mallopt(M_TOP_PAD, 64 * 1024 * 1024))
    return _TUNED
