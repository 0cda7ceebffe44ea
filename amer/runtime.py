"""Process and device settings: which device, which autocast, how the allocator behaves.

Kept apart from model code: these decide where and how fast a process runs, never what it computes.
"""

from __future__ import annotations

import ctypes
import sys
from typing import ContextManager

import torch

from amer.errors import ConfigError

__all__ = ["resolve_device", "autocast", "tune_malloc"]


def resolve_device(name: str) -> torch.device:
    """``name`` as a device this machine has; ``auto`` picks CUDA when present. Bad names: ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: accepted values are cpu, cuda, cuda:N, auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (accepted here: cpu, auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: accepted values are cpu, cuda, cuda:N, auto")
    return dev


def autocast(dtype: str, device: torch.device | str) -> ContextManager:
    """bfloat16 autocast for ``dtype == "bfloat16"``; for float32, autocast explicitly off (so a caller's
    outer autocast does not leak into an fp32 run)."""
    kind = torch.device(device).type
    if dtype == "bfloat16":
        return torch.autocast(device_type=kind, dtype=torch.bfloat16)
    return torch.autocast(device_type=kind, enabled=False)

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
