"""The ONE place that imports optional kernel packages (mamba-ssm, causal-conv1d, megablocks, triton) and
picks a backend for every op that has a fast path.

One switch: ``AMER_KERNELS=auto`` (default) or ``AMER_KERNELS=reference`` in the environment, or the context
manager :func:`use` (``with kernels.use("reference"): ...``), which wins over the environment. ``reference``
forces the pure-torch paths of :mod:`amer.ops` on every device; ``auto`` takes a kernel wherever it applies:

============================  ===========================================  ========================================
op                            kernel                                       where
============================  ===========================================  ========================================
``ssd_scan``                  mamba-ssm ``mamba_chunk_scan_combined``       CUDA; CPU under ``TRITON_INTERPRET=1``
``ssd_update``                mamba-ssm ``selective_state_update``          same (decoding)
``gated_rmsnorm``             mamba-ssm ``layernorm_gated.rmsnorm_fn``      same, eager (compiled graphs fuse the
                                                                           reference themselves)
``conv1d`` / ``conv1d_update``  causal-conv1d ``causal_conv1d_fn`` / ``_update``  CUDA (its kernels are CUDA-only)
``moe_experts``               ``torch._grouped_mm`` (static shapes, no host  CPU and CUDA, fp32 / bf16 / fp16;
                              sync; compiles); megablocks where torch has   megablocks: CUDA with torch < 2.8 (it
                              no ``_grouped_mm``                            pins torch 2.7 and installs nowhere else)
``attention``                 SDPA flash / memory-efficient; packed         CUDA; CPU keeps the reference paths
                              documents through ``flex_attention`` with a
                              document block mask
============================  ===========================================  ========================================

mamba-ssm's SSD kernels are Triton; its package ``__init__`` also imports the CUDA selective-scan extension of
Mamba-1, which an install without CUDA build (``MAMBA_SKIP_CUDA_BUILD=TRUE``) lacks. When that import fails,
the package is registered without running its ``__init__`` and the Triton submodules are imported directly.
bf16 is wrong under the Triton interpreter, so on CPU only fp32 takes the kernels.

One log: the first time an op picks a backend for a given reason, ``logging.getLogger(__name__)`` says so at
INFO (the kernel, or ``reference`` and why: forced, package missing, wrong device, unsupported option);
:func:`choices` returns the latest pick per op, for reports.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from amer.errors import ConfigError

__all__ = ["MODES", "attention_backend", "available", "choices", "conv1d", "conv1d_update", "gated_rmsnorm",
           "grouped_mm", "grouped_mm_unavailable", "interpreter", "log_choice", "mamba_module", "megablocks", "mode",
           "ssd_scan", "ssd_update", "use"]

log = logging.getLogger(__name__)

MODES = ("auto", "reference")
_forced: list[str] = []  # the stack of use() modes; the innermost wins
_logged: set[tuple[str, str, str]] = set()
_latest: dict[str, str] = {}


def _check_mode(value: str, source: str) -> str:
    if value not in MODES:
        raise ConfigError(f"{source} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def mode() -> str:
    """``auto`` or ``reference``: the innermost :func:`use`, else ``AMER_KERNELS``, else ``auto``."""
    if _forced:
        return _forced[-1]
    return _check_mode(os.environ.get("AMER_KERNELS", "auto") or "auto", "AMER_KERNELS")


@contextlib.contextmanager
def use(value: str) -> Iterator[None]:
    """Force ``reference`` (pure torch everywhere) or ``auto`` inside the block, whatever the environment says."""
    _forced.append(_check_mode(value, "kernels.use()"))
    try:
        yield
    finally:
        _forced.pop()


def interpreter() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``, read by triton when it decorates a kernel, so it must be
    set before the kernel package is first imported): Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def log_choice(op: str, backend: str, reason: str = "") -> None:
    """Log ``op -> backend (reason)`` the first time it is chosen for that reason. Eager only: under torch.compile a
    logging call would split the graph, and the eager warm-up or an earlier call has logged it already."""
    if torch.compiler.is_compiling():
        return
    text = backend + (f" ({reason})" if reason else "")
    _latest[op] = text
    key = (op, backend, reason)
    if key not in _logged:
        _logged.add(key)
        log.debug("kernels: %s -> %s", op, text)  # the training loop reports choices() once, after its first step


def choices() -> dict[str, str]:
    """The latest backend each op picked in this process (``op -> "backend (reason)"``)."""
    return dict(_latest)


def _reference(op: str, reason: str) -> None:
    log_choice(op, "reference", reason)
    return None


def _forced_reason() -> str | None:
    if mode() != "reference":
        return None
    return "forced by kernels.use('reference')" if _forced else "forced by AMER_KERNELS=reference"


# ------------------------------------------------------------------------------------------- imports

_modules: dict[str, Any] = {}  # module name -> module, or None when it does not import
_import_errors: dict[str, str] = {}


def _import(module: str) -> Any | None:
    """The module, imported once. A plain dict, not ``functools.lru_cache``: torch.compile traces into the
    latter's wrapped function (and refuses ``importlib``), while a dict lookup is a constant to it. Under
    compilation a module not imported before is taken as missing; :func:`available` imports them all, and
    :func:`amer.training.compile.compile_blocks` calls it first."""
    if module in _modules:
        return _modules[module]
    if torch.compiler.is_compiling():
        return None
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # ImportError, or an extension that fails to load (wrong CUDA, CPU-only machine)
        _import_errors[module] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        mod = None
    _modules[module] = mod
    return mod


def _mamba(submodule: str) -> Any | None:
    """``mamba_ssm.<submodule>``, importing the package without its ``__init__`` when that fails (module
    docstring). None when mamba-ssm (or triton) is not installed."""
    name = f"mamba_ssm.{submodule}"
    if name in _modules or torch.compiler.is_compiling():
        return _modules.get(name)
    mod = _import(name)
    if mod is None and "mamba_ssm" not in sys.modules and "mamba_ssm" not in _modules:
        spec = importlib.util.find_spec("mamba_ssm")
        _modules["mamba_ssm"] = None  # tried once
        if spec is not None and spec.submodule_search_locations is not None:
            sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)  # the package, __init__ not run
            del _modules[name]
            mod = _import(name)
    return mod


def mamba_module(submodule: str) -> Any:
    """``mamba_ssm.<submodule>`` for the glue in :mod:`amer.ops.ssd_kernels` (after a getter chose it)."""
    mod = _mamba(submodule)
    if mod is None:
        raise RuntimeError(f"mamba_ssm.{submodule} does not import: {_import_errors.get('mamba_ssm.' + submodule)}")
    return mod


def _missing(package: str, module: str) -> str:
    why = _import_errors.get(module, "")
    return f"package missing: {package}" + (f" ({why})" if why and "No module named" not in why else "")


def available() -> dict[str, bool]:
    """Which optional kernel packages import on this machine (``torch._grouped_mm`` is part of torch >= 2.8)."""
    return {
        "mamba_ssm": _mamba("ops.triton.ssd_combined") is not None,
        "causal_conv1d": _import("causal_conv1d") is not None,
        "megablocks": _import("megablocks.ops") is not None,
        "triton": _import("triton") is not None,
        "grouped_mm": hasattr(torch, "_grouped_mm"),
    }


# ------------------------------------------------------------------------------------------- Mamba-2 (mamba-ssm)

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_where(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when a mamba-ssm Triton kernel may run on ``device`` in ``dtype``; else why not."""
    if (why := _forced_reason()) is not None:
        return why
    if device.type == "cpu" and not interpreter():
        return "wrong device: cpu (the Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
    if device.type not in ("cpu", "cuda"):
        return f"wrong device: {device.type}"
    if dtype not in _TRITON_DTYPES:
        return f"unsupported option: {dtype}"
    if device.type == "cpu" and dtype != torch.float32:
        return f"unsupported option: {dtype} under the Triton interpreter (fp32 only)"
    return None


def _mamba_fn(op: str, device: torch.device, dtype: torch.dtype, submodule: str, name: str) -> Callable | None:
    if (why := _triton_where(op, device, dtype)) is not None:
        return _reference(op, why)
    mod = _mamba(submodule)
    if mod is None:
        return _reference(op, _missing("mamba_ssm", f"mamba_ssm.{submodule}"))
    log_choice(op, f"mamba_ssm.{name}", "Triton interpreter" if device.type == "cpu" else "")
    return getattr(mod, name)


def ssd_scan(device: torch.device, dtype: torch.dtype) -> Any | None:
    """mamba-ssm's ``ops.triton.ssd_combined`` module (chunked SSD forward and backward) or None."""
    if _mamba_fn("ssd_scan", device, dtype, "ops.triton.ssd_combined", "mamba_chunk_scan_combined") is None:
        return None
    return _mamba("ops.triton.ssd_combined")


def ssd_update(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """mamba-ssm's ``selective_state_update`` (one decoding step, updates the state in place) or None."""
    return _mamba_fn("ssd_update", device, dtype, "ops.triton.selective_state_update", "selective_state_update")


def gated_rmsnorm(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """mamba-ssm's ``rmsnorm_fn`` (RMSNorm of ``x * silu(z)``, per group) or None. Eager only: inside a compiled
    graph the reference is fused by the compiler and the kernel's autograd function would break the graph."""
    if torch.compiler.is_compiling():
        return None
    return _mamba_fn("gated_rmsnorm", device, dtype, "ops.triton.layernorm_gated", "rmsnorm_fn")


# ------------------------------------------------------------------------------------------- causal-conv1d

def _conv_where(device: torch.device, dtype: torch.dtype, width: int, channels: int) -> str | None:
    if (why := _forced_reason()) is not None:
        return why
    if device.type != "cuda":
        return f"wrong device: {device.type} (causal-conv1d's kernels are CUDA-only)"
    if dtype not in _TRITON_DTYPES:
        return f"unsupported option: {dtype}"
    if not 2 <= width <= 4:
        return f"unsupported option: width {width} (the kernel takes 2 to 4)"
    if channels % 8:
        return f"unsupported option: {channels} channels (the channel-last kernel needs a multiple of 8)"
    return None


def _causal_conv(op: str, fn: str, device: torch.device, dtype: torch.dtype, width: int,
                 channels: int) -> Callable | None:
    """causal-conv1d's function ``fn`` for ``op``, or None with the reason logged: both entry points come from one
    package under one set of conditions, so one path decides for both."""
    if (why := _conv_where(device, dtype, width, channels)) is not None:
        return _reference(op, why)
    mod = _import("causal_conv1d")
    if mod is None:
        return _reference(op, _missing("causal_conv1d", "causal_conv1d"))
    log_choice(op, f"causal_conv1d.{fn}")
    return getattr(mod, fn)


def conv1d(device: torch.device, dtype: torch.dtype, width: int, channels: int) -> Callable | None:
    """causal-conv1d's ``causal_conv1d_fn`` (training and prefill; ``seq_idx``, initial states) or None."""
    return _causal_conv("conv1d", "causal_conv1d_fn", device, dtype, width, channels)


def conv1d_update(device: torch.device, dtype: torch.dtype, width: int, channels: int) -> Callable | None:
    """causal-conv1d's ``causal_conv1d_update`` (one decoding step, updates the state in place) or None."""
    return _causal_conv("conv1d_update", "causal_conv1d_update", device, dtype, width, channels)


# ------------------------------------------------------------------------------------------- MoE experts

def grouped_mm_unavailable(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...] = ()) -> str | None:
    """None when :func:`grouped_mm` would pick ``torch._grouped_mm``; else why not (nothing is logged)."""
    if (why := _forced_reason()) is not None:
        return why
    if not hasattr(torch, "_grouped_mm"):
        return f"package missing: torch._grouped_mm (torch {torch.__version__} < 2.8)"
    if device.type not in ("cpu", "cuda"):
        return f"wrong device: {device.type}"
    if dtype not in _TRITON_DTYPES:
        return f"unsupported option: {dtype}"
    align = 16 // dtype.itemsize
    if any(w % align for w in widths):
        return f"unsupported option: widths {widths} not multiples of {align} (rows 16-byte aligned)"
    return None


def grouped_mm(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...] = ()) -> Callable | None:
    """amer's grouped-GEMM SwiGLU experts over ``torch._grouped_mm`` (:func:`amer.ops.grouped.grouped_swiglu`) or
    None. ``widths``: the matrix widths, whose rows the op wants 16-byte aligned (on CPU as on CUDA)."""
    if (why := grouped_mm_unavailable(device, dtype, widths)) is not None:
        return _reference("moe_experts", why)
    from amer.ops.grouped import grouped_swiglu as fn  # torch only; imported late to keep this module light

    log_choice("moe_experts", "torch._grouped_mm")
    return fn


def megablocks(device: torch.device) -> Any | None:
    """megablocks' ops module on CUDA where torch has no ``_grouped_mm`` (megablocks pins torch 2.7), or None."""
    if _forced_reason() is not None or device.type != "cuda" or hasattr(torch, "_grouped_mm"):
        return None
    mod = _import("megablocks.ops")
    if mod is not None:
        log_choice("moe_experts", "megablocks")
    return mod


# ------------------------------------------------------------------------------------------- attention

def attention_backend(device: torch.device, *, documents: bool) -> str:
    """``"reference"`` (the CPU paths of :mod:`amer.blocks.attention`), ``"sdpa"`` (CUDA: flash or memory-efficient
    kernels first) or ``"flex"`` (CUDA, packed documents: ``flex_attention`` with a document block mask)."""
    op = "attention_documents" if documents else "attention"
    if (why := _forced_reason()) is not None:
        log_choice(op, "reference", why)
        return "reference"
    if device.type != "cuda":
        log_choice(op, "reference", f"{device.type}: the measured CPU paths")
        return "reference"
    if documents:
        if _import("torch.nn.attention.flex_attention") is None:
            log_choice(op, "reference", _missing("flex_attention", "torch.nn.attention.flex_attention"))
            return "reference"
        log_choice(op, "flex_attention", "document block mask")
        return "flex"
    log_choice(op, "sdpa", "flash, then memory-efficient, then cuDNN, then math")
    return "sdpa"
