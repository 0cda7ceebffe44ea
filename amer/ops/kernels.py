"""The ONE place that imports optional CUDA packages (mamba-ssm, megablocks).

Each getter returns the fast function only when its package imports and the tensor lives on CUDA;
otherwise ``None`` and the caller runs its pure-torch reference. The choice is logged once per op,
so a run's log says which path it took (a silently slow or silently different path is a bug).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ssd_kernel", "megablocks_kernel", "available", "log_choice"]

log = logging.getLogger("amer.kernels")
_logged: set[str] = set()


@functools.cache
def _try_import(module: str) -> Any | None:
    try:
        return importlib.import_module(module)
    except Exception:  # ImportError, or a CUDA extension failing to load on a CPU machine
        return None


def available() -> dict[str, bool]:
    """Which optional kernel packages import on this machine."""
    return {
        "mamba_ssm": _try_import("mamba_ssm.ops.triton.ssd_combined") is not None,
        "megablocks": _try_import("megablocks") is not None,
    }


def log_choice(op: str, backend: str) -> None:
    """Log ``op -> backend`` the first time it is chosen (eagerly: under torch.compile a logging call
    would split the graph, and the eager warm-up or a previous call has logged it already)."""
    if torch.compiler.is_compiling():
        return
    key = f"{op}:{backend}"
    if key not in _logged:
        _logged.add(key)
        log.debug("amer kernels: %s uses %s", op, backend)


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def ssd_kernel(device: torch.device) -> Callable | None:
    """mamba_ssm's fused chunked SSD scan (``mamba_chunk_scan_combined``) or None."""
    mod = _try_import("mamba_ssm.ops.triton.ssd_combined") if _on_cuda(device) else None
    fn = getattr(mod, "mamba_chunk_scan_combined", None) if mod else None
    log_choice("ssd_scan", "mamba_ssm" if fn else "torch reference (chunked matmul)")
    return fn


def megablocks_kernel(device: torch.device) -> Any | None:
    """megablocks' grouped-GEMM ops module or None."""
    mod = _try_import("megablocks.ops") if _on_cuda(device) else None
    log_choice("moe_grouped_gemm", "megablocks" if mod else "torch reference (sorted dispatch)")
    return mod
