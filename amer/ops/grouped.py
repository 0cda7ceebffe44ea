"""Grouped-GEMM feed-forward experts (SwiGLU by default) over ``torch._grouped_mm``: every expert on its slice of
expert-sorted rows.

``torch._grouped_mm`` (torch >= 2.8) is the op CUDA builds use for MoE expert GEMMs (torchtitan's grouped
experts); it also runs on CPU. Its group boundaries are a device tensor (``offs``: int32, the cumulative row
count at the end of each group, ``offs[-1] == M``), so a dropless MoE needs no host sync and keeps static
shapes: it compiles with ``fullgraph=True``. What it wants, as measured with torch 2.13 on CPU: fp32, bf16 or
fp16 (not fp64); every matrix row 16-byte aligned (widths multiples of 4 in fp32, 8 in bf16); an empty group
gives zeros in the weight-gradient form.

The expert feed-forward is one custom op, ``amer::grouped_swiglu`` (its ``act`` argument picks SwiGLU, GeGLU, or
the ungated squared ReLU or GELU of :mod:`amer.ops.activation`), with its own shape function and backward:

* torch's meta function of ``_grouped_mm`` accepts bf16 only (the CUDA kernel's original limit), although the
  op runs in fp32 and fp16 too, so tracing an fp32 model through it would fail;
* one node instead of autograd's chain of grouped matmuls, chunk, silu and product: forward saves the
  (M, 2F) pre-activations and silu(gate) only (ungated: the (M, F) pre-activations and their activation), and
  backward makes two elementwise passes around four grouped GEMMs (the layout of the reference
  :class:`amer.ops.moe._GroupedSwiGLU`, whose loop over experts it replaces).

On CPU ``_grouped_mm`` runs one ``mm`` per group and zero-fills its outputs: an E block of the ``small`` preset
(forward and backward, 8 x 256 tokens, one thread) measured 1.08x the reference loop's time, the whole training
step 1.01x; the gain is a dropless E block that compiles.

Forms of ``_grouped_mm`` used: (M, K) x (E, K, N) -> (M, N), rows grouped (forward, input gradients), and
(K, M) x (M, N) -> (E, K, N), the contraction grouped (weight gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from amer.ops.activation import activation

__all__ = ["grouped_swiglu"]


def _fwd_impl(xs: Tensor, w_gate_up: Tensor, w_down: Tensor, offs: Tensor,
              act: str = "silu") -> tuple[Tensor, Tensor, Tensor]:
    Fh = w_down.shape[1]
    a = activation(act)
    h = torch._grouped_mm(xs, w_gate_up, offs=offs)  # (M, 2F): gate | up; ungated (M, F)
    if a.gated:
        s = a.fn(h[:, :Fh])
        ys = torch._grouped_mm(s * h[:, Fh:], w_down, offs=offs)  # (M, D)
    else:
        s = a.fn(h)
        ys = torch._grouped_mm(s, w_down, offs=offs)
    return ys, h, s


_fwd = torch.library.custom_op("amer::grouped_swiglu_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _(xs, w_gate_up, w_down, offs, act="silu"):
    M, Fh = xs.shape[0], w_down.shape[1]
    return xs.new_empty(M, w_down.shape[2]), xs.new_empty(M, w_gate_up.shape[2]), xs.new_empty(M, Fh)


@torch.library.custom_op("amer::grouped_swiglu_bwd", mutates_args=())
def _bwd(gy: Tensor, xs: Tensor, w_gate_up: Tensor, w_down: Tensor, offs: Tensor, h: Tensor,
         s: Tensor, act: str = "silu") -> tuple[Tensor, Tensor, Tensor]:
    Fh = w_down.shape[1]
    a = activation(act)
    gy = gy.contiguous()
    d_act = torch._grouped_mm(gy, w_down.transpose(-1, -2), offs=offs)  # (M, F)
    if a.gated:
        gate, up = h[:, :Fh], h[:, Fh:]
        d_down = torch._grouped_mm((s * up).t(), gy, offs=offs)  # (E, F, D)
        dh = torch.empty_like(h)  # both halves written in place, no cat
        torch.mul(d_act, s, out=dh[:, Fh:])  # d up = d_act * act(gate)
        if act == "silu":
            torch.ops.aten.silu_backward.grad_input(d_act.mul_(up), gate, grad_input=dh[:, :Fh])  # d gate
        else:
            dh[:, :Fh] = a.grad(d_act.mul_(up), gate)
    else:
        d_down = torch._grouped_mm(s.t(), gy, offs=offs)  # (E, F, D)
        dh = a.grad(d_act, h)
    d_gu = torch._grouped_mm(xs.t(), dh, offs=offs)  # (E, D, 2F) or (E, D, F)
    d_x = torch._grouped_mm(dh, w_gate_up.transpose(-1, -2), offs=offs)  # (M, D)
    return d_x, d_gu, d_down


@_bwd.register_fake
def _(gy, xs, w_gate_up, w_down, offs, h, s, act="silu"):
    return torch.empty_like(xs), torch.empty_like(w_gate_up), torch.empty_like(w_down)


def _setup(ctx, inputs, output) -> None:
    xs, w_gate_up, w_down, offs, act = inputs
    _, h, s = output
    ctx.save_for_backward(xs, w_gate_up, w_down, offs, h, s)
    ctx.act = act


def _backward(ctx, gy: Tensor, gh: Tensor | None, gs: Tensor | None):
    xs, w_gate_up, w_down, offs, h, s = ctx.saved_tensors
    d_x, d_gu, d_down = _bwd(gy, xs, w_gate_up, w_down, offs, h, s, ctx.act)
    return d_x, d_gu, d_down, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


def grouped_swiglu(xs: Tensor, w_gate_up: Tensor, w_down: Tensor, offs: Tensor, act: str = "silu") -> Tensor:
    """Feed-forward of expert ``e`` on rows ``xs[offs[e - 1] : offs[e]]``: xs (M, D) expert-sorted, w_gate_up
    (E, D, 2F) (gate columns first; an ungated ``act``: (E, D, F)), w_down (E, F, D), offs (E,) int32 -> (M, D).
    One dtype for all three; ``act`` names an :data:`amer.ops.activation.ACTIVATIONS` entry (SwiGLU by default)."""
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # no backward to record: the op's body without the custom-op dispatch (about 80 us a call, as much as the
        # GEMMs of a decoding step's experts)
        return _fwd_impl(xs, w_gate_up, w_down, offs, act)[0]
    return _fwd(xs, w_gate_up, w_down, offs, act)[0]
