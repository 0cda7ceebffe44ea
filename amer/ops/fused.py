"""Hand-differentiated elementwise chains: RMSNorm, optionally gated by silu (Mamba-2's gated norm).

On CPU, eager PyTorch runs every elementwise op as its own pass over memory and autograd stores the
intermediates of composite ops. For the narrow models amer trains on CPU these passes, not the
matmuls, dominate a block's time, so the chains every block runs are written as single autograd nodes
that keep only their inputs and compute their backward with as few full-size passes as possible.
It equals the plain composite to rounding (gradcheck-tested in fp64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rms_norm", "cast"]


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` already has it: a no-op ``to`` still costs a dispatch
    (about 1 us), and a decoding step at batch 1 makes about a hundred of them."""
    return t if t.dtype == dtype else t.to(dtype)


class _RMSNormFn(torch.autograd.Function):
    """``rmsnorm(x * silu(gate)) * weight`` over the last axis (no gate: plain RMSNorm), one autograd node.

    ``F.rms_norm`` is a composite on CPU (pow, mean, add, rsqrt, mul, mul), so autograd stores and
    revisits several full-size intermediates, and the gated form of the Mamba block adds a silu and a
    product on top. Here the forward is a single-pass norm (``vector_norm``), the normalised product
    and the weight; backward recomputes the cheap gate product instead of storing it and uses the
    textbook formula ``dx_hat = g w``, ``dx = rstd (dx_hat - x_hat mean(dx_hat x_hat))``.
    Computed in fp32 at least (fp64 stays fp64); the output has the input's dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, gate: Tensor | None, eps: float) -> Tensor:  # type: ignore[override]
        y, rstd = _forward(x, weight, gate, eps)
        ctx.save_for_backward(x, weight, gate, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, weight, gate, rstd = ctx.saved_tensors
        acc = rstd.dtype
        xf, g = x.to(acc), grad.to(acc)
        if gate is not None:
            zf = gate.to(acc)
            sz = F.silu(zf)
            h = xf * sz
        else:
            h = xf
        n = h.shape[-1]
        x_hat = h.mul_(rstd) if gate is not None else h * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * x_hat).sum(dim=tuple(range(g.dim() - weight.dim()))).to(weight.dtype)
        gxh = g * weight.to(acc)
        dot = torch.linalg.vecdot(gxh, x_hat, dim=-1).unsqueeze_(-1).div_(n)
        dh = gxh.addcmul_(x_hat, dot, value=-1.0).mul_(rstd)  # d loss / d h
        if gate is None:
            return dh.to(x.dtype), grad_w, None, None
        grad_x = (dh * sz).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_gate = None
        if ctx.needs_input_grad[2]:
            grad_gate = torch.ops.aten.silu_backward(dh.mul_(xf), zf).to(gate.dtype)
        return grad_x, grad_w, grad_gate, None


def _forward(x: Tensor, weight: Tensor, gate: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = cast(x, acc)
    h = xf * F.silu(cast(gate, acc)) if gate is not None else xf
    n = h.shape[-1]
    rstd = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square_().div_(n).add_(eps).rsqrt_()
    y = (h * rstd).mul_(cast(weight, acc))
    return cast(y, x.dtype), rstd


def rms_norm(x: Tensor, weight: Tensor, eps: float, gate: Tensor | None = None) -> Tensor:
    """RMSNorm over the last axis, optionally of ``x * silu(gate)`` (Mamba-2's gated norm); fp32 inside.
    Without gradients (decoding, evaluation) the same arithmetic runs without the autograd node, whose
    bookkeeping costs more than the norm itself on one token."""
    if not torch.is_grad_enabled():
        return _forward(x, weight, gate, eps)[0]
    return _RMSNormFn.apply(x, weight, gate, eps)
