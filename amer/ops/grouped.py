"""Grouped GEMM over ``torch._grouped_mm``: every expert's matmul on its slice of expert-sorted rows, in one call.

``torch._grouped_mm`` (torch >= 2.8) is the op CUDA builds use for MoE expert GEMMs (torchtitan's grouped
experts); it also runs on CPU. Its group boundaries are a device tensor (``offs``, int32, cumulative row
counts), so a dropless MoE needs no host sync and keeps static shapes: it compiles with ``fullgraph=True``.

It is wrapped here as the custom op ``amer::grouped_mm`` with its own fake (shape) function and backward:

* torch's meta function accepts bf16 only (the CUDA kernel's original limit), although the op runs in fp32
  and fp16 too, so ``torch.compile`` of an fp32 model would fail while tracing;
* its backward needs a contiguous output gradient (an expanded one, as from ``y.sum()``, is refused).

Two forms, both grouped along the rows ``M`` (``offs[e]`` = end of group ``e``, ``offs[-1] == M``):

* ``a`` (M, K), ``b`` (E, K, N) -> (M, N): rows of group ``e`` times ``b[e]`` (the forward and the input gradient);
* ``a`` (K, M), ``b`` (M, N) -> (E, K, N): ``a[:, group e] @ b[group e]`` (the weight gradient); an empty group
  gives zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_mm"]


@torch.library.custom_op("amer::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """See the module docstring; ``offs`` (E,) int32 cumulative group ends."""
    return torch._grouped_mm(a, b, offs=offs)


@grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _setup(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    a, b, offs = ctx.saved_tensors
    g = g.contiguous()
    da = db = None
    if b.dim() == 3:  # y = a @ b[e] per group
        if ctx.needs_input_grad[0]:
            da = grouped_mm(g, b.transpose(-1, -2), offs)  # (M, N) x (E, N, K) -> (M, K)
        if ctx.needs_input_grad[1]:
            db = grouped_mm(a.t(), g, offs)  # (K, M) x (M, N) -> (E, K, N)
    else:  # y[e] = a[:, group e] @ b[group e]
        if ctx.needs_input_grad[0]:
            da = grouped_mm(b, g.transpose(-1, -2), offs).t()  # (M, N) x (E, N, K) -> (M, K), transposed
        if ctx.needs_input_grad[1]:
            db = grouped_mm(a.t(), g, offs)  # (M, K) x (E, K, N) -> (M, N)
    return da, db, None


grouped_mm.register_autograd(_backward, setup_context=_setup)
