"""The kernel lane: mamba-ssm's Triton kernels on CPU under Triton's interpreter, against amer's pure-torch
references (see ``.ci/kernels``, which builds the environment and sets ``TRITON_INTERPRET=1``).

These tests are collected only when the caller set ``TRITON_INTERPRET=1`` and triton and mamba-ssm import:
elsewhere they are not collected at all (the main suite never runs the interpreter, which makes every M block
of every other test hundreds of times slower).

Test-only patches, applied here and never in the library, because the kernels were written for a CUDA device:

1. ``torch.cuda.device(None)``, which the kernels enter around every launch with the tensor's device index
   (None on CPU), raises on a CPU build of torch; here it is a no-op context.
2. ``@triton.autotune`` with several configs benchmarks them on a GPU driver; here only the first config is kept.
3. The backward asks ``torch.cuda.get_device_properties(device).multi_processor_count`` to size its grid; a CPU
   device gets a fixed count.
4. causal-conv1d's package imports its CUDA extension, which a CPU build lacks; a stand-in module that refuses
   every call lets its pure-torch ``*_ref`` functions import.

(mamba-ssm's package ``__init__`` imports its CUDA selective-scan extension; amer's gateway imports the Triton
submodules without it, in the library, since a GPU install without that extension needs the same.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

import torch


def _lane_enabled() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import importlib.util

    return importlib.util.find_spec("mamba_ssm") is not None


def _patch() -> None:
    import triton

    real_device = torch.cuda.device

    def device(index):  # patch 1
        if index is None or (isinstance(index, torch.device) and index.type == "cpu"):
            return contextlib.nullcontext()
        return real_device(index)

    torch.cuda.device = device

    real_autotune = triton.autotune

    def autotune(configs, key, *args, **kwargs):  # patch 2
        return real_autotune(configs[:1], key, *args, **kwargs)

    triton.autotune = autotune

    real_props = torch.cuda.get_device_properties

    def get_device_properties(device=None):  # patch 3
        if isinstance(device, torch.device) and device.type == "cpu":
            return types.SimpleNamespace(multi_processor_count=4)
        return real_props(device)

    torch.cuda.get_device_properties = get_device_properties

    if "causal_conv1d_cuda" not in sys.modules:  # patch 4
        stand_in = types.ModuleType("causal_conv1d_cuda")

        def refuse(*args, **kwargs):
            raise RuntimeError("causal_conv1d_cuda is a test stand-in: the CUDA kernels do not run on CPU")

        for name in ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update"):
            setattr(stand_in, name, refuse)
        sys.modules["causal_conv1d_cuda"] = stand_in


if _lane_enabled():
    _patch()
    collect_ignore_glob: list[str] = []
else:
    collect_ignore_glob = ["test_*.py"]
