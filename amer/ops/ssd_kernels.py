"""mamba-ssm's Triton kernels behind amer's SSD interface (:mod:`amer.ops.ssd`), picked by :mod:`amer.ops.kernels`.

The chunked scan is wrapped as two custom ops, ``amer::ssd_scan_fwd`` and ``amer::ssd_scan_bwd``, with shape
functions and an autograd formula that calls mamba-ssm's own backward. mamba-ssm exposes the scan as an
``autograd.Function`` whose forward launches Triton kernels from Python (grid lambdas, autotuning, a CUDA
device context); a custom op is opaque to ``torch.compile``, so a compiled M block keeps the kernels instead of
tracing into them (a graph break, which ``fullgraph=True`` turns into an error).

Semantics are amer's (:func:`amer.ops.ssd.ssd_scan_torch`): ``dt`` already positive, no ``D``, no gate (both are
applied outside), ``seq_idx`` (b, T) int32 cuts the state at document starts, the initial state belongs to the
row's first document. The final state comes back in fp32 (the states passed between chunks are kept in the dtype
of ``C``, as mamba-ssm does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from amer.ops import kernels

__all__ = ["ssd_scan_kernel", "ssd_step_kernel", "gated_rmsnorm_kernel"]

_SSD = "ops.triton.ssd_combined"


@torch.library.custom_op("amer::ssd_scan_fwd", mutates_args=())
def _scan_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
              initial_state: Optional[Tensor], seq_idx: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    out, _, _, _, _, final = kernels.mamba_module(_SSD)._mamba_chunk_scan_combined_fwd(
        x, dt, A, B, C, chunk_size, initial_states=initial_state, seq_idx=seq_idx)
    return out, final


@_scan_fwd.register_fake
def _(x, dt, A, B, C, chunk_size, initial_state, seq_idx):
    b, _, H, P = x.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(b, H, P, C.shape[-1], dtype=torch.float32))


@torch.library.custom_op("amer::ssd_scan_bwd", mutates_args=())
def _scan_bwd(dout: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
              out: Tensor, chunk_size: int, initial_state: Optional[Tensor],
              seq_idx: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, ddt, dA, dB, dC, _, _, _, dinit = kernels.mamba_module(_SSD)._mamba_chunk_scan_combined_bwd(
        dout.contiguous(), x, dt, A, B, C, out, chunk_size, initial_states=initial_state,
        dfinal_states=None if dfinal is None else dfinal.contiguous(), seq_idx=seq_idx)
    # the fake below promises the inputs' dtypes; no initial state: an empty placeholder (no Optional outputs)
    dinit = x.new_empty(0) if dinit is None else dinit.to(initial_state.dtype)
    return dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dinit


@_scan_bwd.register_fake
def _(dout, dfinal, x, dt, A, B, C, out, chunk_size, initial_state, seq_idx):
    dinit = x.new_empty(0) if initial_state is None else torch.empty_like(initial_state)
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), dinit)


def _setup(ctx, inputs, output) -> None:
    x, dt, A, B, C, chunk_size, initial_state, seq_idx = inputs
    ctx.chunk_size = chunk_size
    ctx.has_init = initial_state is not None
    ctx.save_for_backward(x, dt, A, B, C, output[0], initial_state, seq_idx)


def _backward(ctx, dout: Tensor, dfinal: Tensor | None):
    x, dt, A, B, C, out, initial_state, seq_idx = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dinit = _scan_bwd(dout, dfinal, x, dt, A, B, C, out, ctx.chunk_size, initial_state,
                                           seq_idx)
    return dx, ddt, dA, dB, dC, None, dinit if ctx.has_init else None, None


_scan_fwd.register_autograd(_backward, setup_context=_setup)


def ssd_scan_kernel(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                    initial_state: Tensor | None, seq_idx: Tensor | None) -> tuple[Tensor, Tensor]:
    """``mamba_chunk_scan_combined`` with amer's arguments: returns y (b, T, H, P) in x's dtype and the final
    state (b, H, P, N) in fp32."""
    acc = torch.promote_types(x.dtype, torch.float32)
    if seq_idx is not None:
        # numbered from 0 in every row: the kernels compare a chunk's positions with the number of the position
        # before it, which is taken as 0 for the first chunk, so only document 0 sees the initial state
        seq_idx = (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()
    y, final = _scan_fwd(x, dt, A, B, C, chunk_size, initial_state, seq_idx)
    return y, final.to(acc)


def ssd_step_kernel(fn: Callable, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                    state: Tensor) -> tuple[Tensor, Tensor]:
    """One decoding step with ``selective_state_update``: x (b, H, P), dt (b, H) positive, A (H,), B/C (b, G, N),
    state (b, H, P, N). The kernel updates the state in place; amer's caches are values, so it works on a copy.
    The per-head scalars are expanded with stride 0, which the kernel reads as one value per head; ``D`` (zero
    here: amer adds the skip outside) and ``dt_bias`` (zero: ``dt`` is final) must be tensors for its launch."""
    b, H, P = x.shape
    N = B.shape[-1]
    new_state = state.to(torch.promote_types(state.dtype, torch.float32), copy=True)
    A_h = A.to(torch.float32)[:, None, None].expand(H, P, N)
    dt_h = dt.to(torch.float32)[:, :, None].expand(b, H, P)
    zero = dt_h.new_zeros(()).expand(H, P)  # dt_bias and D: the launch reads their strides, so both are passed
    y = fn(new_state, x, dt_h, A_h, B.to(x.dtype), C.to(x.dtype), D=zero, dt_bias=zero, dt_softplus=False)
    return y, new_state


def gated_rmsnorm_kernel(fn: Callable, y: Tensor, z: Tensor, weight: Tensor, eps: float, groups: int) -> Tensor:
    """``rmsnorm(y * silu(z)) * weight`` per group of ``y.shape[-1] / groups`` channels (mamba-ssm's gated norm,
    ``norm_before_gate=False``)."""
    return fn(y, weight, None, z=z, eps=eps, group_size=y.shape[-1] // groups, norm_before_gate=False)
