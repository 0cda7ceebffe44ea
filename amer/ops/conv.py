"""Depthwise causal 1-D convolution with a decoding state, shared by the M and R blocks.

The pure-torch path is the reference; causal-conv1d's CUDA kernels (``causal_conv1d_fn`` for training and prefill,
with ``seq_idx`` and initial states; ``causal_conv1d_update`` for decoding) run where :mod:`amer.ops.kernels`
picks them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from amer.ops import kernels
from amer.ops.fused import cast

__all__ = ["causal_conv1d", "conv_state_init"]


def conv_state_init(batch_size: int, channels: int, width: int, *, device=None, dtype=None) -> Tensor:
    """Zero state: the last ``width - 1`` inputs, (B, width - 1, C)."""
    return torch.zeros(batch_size, max(width - 1, 0), channels, device=device, dtype=dtype)


def _shift_forward(x: Tensor, wt: Tensor, bias: Tensor | None, position: Tensor | None) -> Tensor:
    """The K shifted multiply-adds; ``wt`` (K, C) in x's dtype, each tap a contiguous channel vector."""
    T, K = x.shape[1], wt.shape[0]
    masks = None if position is None or _corrects(x) else position
    y = torch.addcmul(bias.to(x.dtype), x, wt[K - 1]) if bias is not None else x * wt[K - 1]
    for k in range(K - 1):
        s = K - 1 - k
        if s < T:
            y[:, s:].addcmul_(_reach(x[:, : T - s], masks, s), wt[k])
    if position is not None and masks is None:  # the outputs whose window crossed a start, again from their own
        rows, times = _crossed(position, K)
        y[rows, times] = _window(x, wt, bias, rows, times, lambda s: s <= position[rows, times], -1)
    return y


def _shift_backward(g: Tensor, x: Tensor, wt: Tensor, position: Tensor | None, need_x: bool,
                    need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """d x (B, T, C) and d wt (K, C), each when asked.

    ``dx[t] = sum_k w[k] g[t + s_k]`` and ``dw[k] = sum g[t] x[t - s_k]``."""
    K, T = wt.shape[0], g.shape[1]
    masks = None if position is None or _corrects(x) else position
    gx = gw = None
    # the incoming gradient of the outputs each tap reaches, masked once and read by both sums below
    reached = {s: _reach(g[:, s:], masks, s) for s in range(1, min(K, T))}
    crossed = _crossings(position, K) if position is not None and masks is None else {}
    if need_x:
        gx = g * wt[K - 1]
        for k in range(K - 1):
            s = K - 1 - k
            if s < T:
                gx[:, : T - s].addcmul_(reached[s], wt[k])
        if crossed:  # the inputs a crossed tap reached, again from their own document's outputs only
            key = torch.cat([r * T + t - s for s, (r, t) in crossed.items()]).unique()
            rows, times = key // T, key % T
            ahead = (times.unsqueeze(1) + torch.arange(K, device=key.device)).clamp(max=T - 1)  # (N, K): t + s
            seen = position[rows.unsqueeze(1), ahead]

            def keep(s: int) -> Tensor:
                return (times + s < T) & (seen[:, s] >= s)

            gx[rows, times] = _window(g, wt, None, rows, times, keep, +1)
    if need_w:
        gw = torch.zeros_like(wt)  # (K, C)
        torch.sum(g * x, dim=(0, 1), out=gw[K - 1])
        for k in range(K - 1):
            s = K - 1 - k
            if s < T:
                torch.sum(reached[s] * x[:, : T - s], dim=(0, 1), out=gw[k])
        for s, (rows, times) in crossed.items():
            gw[K - 1 - s].sub_((g[rows, times] * x[rows, times - s]).sum(0))
    return gx, gw


class _CausalConvShift(torch.autograd.Function):
    """The training-path depthwise causal conv as K shifted multiply-adds in the (B, T, C) layout.

    A depthwise conv with a kernel of 4 is pure memory traffic. ``F.conv1d`` wants (B, C, T): a
    transposed, padded copy in, a transposed result out, and oneDNN's depthwise backward (with its
    own zero-filled buffers) measured about 1.7x slower on CPU than these shifted ``addcmul``s, which
    read the (possibly strided) input where it lies. Backward writes the chain rule out directly:
    ``dx[t] = sum_k w[k] g[t + s_k]``, ``dw[k] = sum g[t] x[t - s_k]``, ``db = sum g`` with
    ``s_k = K - 1 - k``.

    With ``position`` (B, T), each token's offset into its packed document, tap ``k`` reads ``x[t - s_k]``
    only where ``position[t] >= s_k``: the window never reaches into the previous document, exactly as if
    each document were its own sequence with zero history.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                position: Tensor | None) -> Tensor:
        wt = weight.to(x.dtype).t().contiguous()  # (K, C)
        ctx.save_for_backward(x, wt, position)
        ctx.has_bias = bias is not None
        ctx.w_dtype = weight.dtype
        return _shift_forward(x, wt, bias, position)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, wt, position = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw = _shift_backward(g, x, wt, position, need_x, need_w)
        gb = g.sum(dim=(0, 1)).to(ctx.w_dtype) if need_b and ctx.has_bias else None
        return gx, None if gw is None else gw.t().to(ctx.w_dtype), gb, None


# Under torch.compile the same arithmetic runs as one opaque op per direction. Traced, the shifted slices and the
# (B, T)-reductions of the weight gradient became one inductor kernel that measured slower than these eager ops
# (conv + silu forward and backward at (4, 512, 576): 9.2 vs 6.5 ms on a 2-core AMD EPYC); kept opaque, the ops
# around the conv still fuse with each other.
@torch.library.custom_op("amer::causal_conv_shift", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Tensor | None, position: Tensor | None) -> Tensor:
    return _shift_forward(x, weight.to(x.dtype).t().contiguous(), bias, position).contiguous()


@_conv_op.register_fake
def _(x, weight, bias, position):
    return x.new_empty(x.shape)


@torch.library.custom_op("amer::causal_conv_shift_backward", mutates_args=())
def _conv_op_backward(g: Tensor, x: Tensor, weight: Tensor, position: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    gx, gw = _shift_backward(g.contiguous(), x, weight.to(x.dtype).t().contiguous(), position, True, True)
    return gx.contiguous(), gw.t().to(weight.dtype).contiguous(), g.sum(dim=(0, 1)).to(weight.dtype)


@_conv_op_backward.register_fake
def _(g, x, weight, position):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _conv_op_setup(ctx, inputs, output) -> None:
    x, weight, bias, position = inputs
    ctx.save_for_backward(x, weight, position)
    ctx.has_bias = bias is not None


def _conv_op_autograd(ctx, g: Tensor):
    x, weight, position = ctx.saved_tensors
    gx, gw, gb = _conv_op_backward(g, x, weight, position)
    return gx, gw, gb if ctx.has_bias else None, None


_conv_op.register_autograd(_conv_op_autograd, setup_context=_conv_op_setup)


def _corrects(x: Tensor) -> bool:
    """Packed documents on CPU: the taps run over the whole row, then the few outputs whose window crossed a
    document start (and, in the backward, the inputs such a window reached) are computed again from their own
    document alone and written over, so documents stay independent bit for bit; a mask per tap would cost a
    full pass over the activations each, as much as the tap itself (conv forward + backward at (4, 512, 1024),
    documents of 96 tokens on average: 16.9 ms masked, 9.2 ms written over, 7.5 ms with no documents at all).
    Elsewhere (XLA, CUDA without causal-conv1d) the masks keep shapes static and the host out of the loop."""
    return x.device.type == "cpu"


def _crossed(position: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """The (rows, times) of the outputs whose window of K reaches back past their document's start:
    ``position[t] < K - 1`` and ``position[t] < t`` (not the row's first document)."""
    t = torch.arange(position.shape[1], device=position.device)
    return torch.nonzero((position < K - 1) & (position < t), as_tuple=True)


def _window(v: Tensor, wt: Tensor, bias: Tensor | None, rows: Tensor, times: Tensor, keep: Callable[[int], Tensor],
            direction: int) -> Tensor:
    """``bias + sum_s [keep(s)] wt[K-1-s] v[rows, times + direction * s]`` for s in 0..K-1: the conv
    (direction -1) or its transpose (+1) at a few positions, each tap that ``keep`` refuses an exact zero.
    The terms are added in the order and with the ops of the whole-row taps (s = 0 first, then K-1 down to 1),
    so a rewritten output rounds exactly as it does in its document run alone."""
    K, T = wt.shape[0], v.shape[1]
    zero = torch.zeros((), dtype=v.dtype, device=v.device)

    def tap(s: int) -> Tensor:
        picked = v[rows, (times + direction * s).clamp(0, T - 1)]
        return picked if s == 0 else torch.where(keep(s).unsqueeze(-1), picked, zero)

    out = torch.addcmul(bias.to(v.dtype), tap(0), wt[K - 1]) if bias is not None else tap(0) * wt[K - 1]
    for s in range(K - 1, 0, -1):
        out.addcmul_(tap(s), wt[K - 1 - s])
    return out


def _crossings(position: Tensor, K: int) -> dict[int, tuple[Tensor, Tensor]]:
    """For each step back ``s`` in 1..K-1, the (rows, times) of the outputs whose tap ``s`` reads the
    previous document: ``position[t] < s <= t``. Of the order of K documents per row, not T."""
    rows, times = _crossed(position, K)
    first = position[rows, times]
    out = {}
    for s in range(1, K):
        hit = (first < s) & (times >= s)
        out[s] = (rows[hit], times[hit])
    return out


def _reach(v: Tensor, position: Tensor | None, s: int) -> Tensor:
    """``v`` (B, T - s, C), aligned with the outputs ``t >= s``, zeroed where the tap ``s`` steps back would
    cross into the previous document (``position[t] < s``)."""
    if position is None:
        return v
    return v * (position[:, s:] >= s).unsqueeze(-1).to(v.dtype)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  state: Tensor | None = None, *, position: Tensor | None = None,
                  seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """y[t, c] = bias[c] + sum_k weight[c, k] * x[t - (K-1) + k, c], causal in t.

    x: (B, T, C); weight: (C, K); state: (B, K-1, C) inputs preceding x (zeros at the start of a
    sequence), or None on the training path. Packed documents (training path only): ``position`` (B, T), the
    offsets into the documents, for the reference, and ``seq_idx`` (B, T), the non-decreasing document numbers,
    for the kernel; the window stops at each document's first token. Returns y (B, T, C) and the new state
    (or None).
    """
    K = weight.shape[-1]
    B, T, C = x.shape
    if state is not None and (position is not None or seq_idx is not None):
        raise ValueError("causal_conv1d: document positions apply to the training path (state=None) only")
    if T > 0 and (position is None or seq_idx is not None):  # the kernel reads document numbers, not positions
        fn = (kernels.conv1d if state is None or T > 1 else kernels.conv1d_update)(x.device, x.dtype, K, C)
        if fn is not None:
            return _kernel(fn, x, weight, bias, state, seq_idx)
    if state is None:
        conv = _conv_op if torch.compiler.is_compiling() else _CausalConvShift.apply
        return conv(x, weight, bias, position), None
    xs = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K - 1 + T, C)
    new_state = xs[:, xs.shape[1] - (K - 1):] if K > 1 else state
    if T == 1:
        # decoding step: a product and a sum over the window, in the (B, K, C) layout the state has (a quarter of
        # einsum's time, which transposes and batches K-long dot products; 18 vs 70 us at batch 16, 512 channels)
        y = (xs * cast(weight, x.dtype).t()).sum(1, keepdim=True)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y, new_state
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv1d(xs.transpose(1, 2), weight.unsqueeze(1).to(x.dtype), b, groups=C)
    return y.transpose(1, 2), new_state


def _kernel(fn: Callable, x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
            seq_idx: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """causal-conv1d in its channel-last layout, which is amer's (B, T, C) transposed: no copy when ``x`` is
    contiguous. Its decoding update writes the state in place, so it gets a copy (amer's caches are values)."""
    B, T, C = x.shape
    if x.stride(2) != 1 or x.stride(1) != C:
        x = x.contiguous()
    bias = None if bias is None else bias.to(weight.dtype)
    if state is None:
        seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
        y = fn(x.transpose(1, 2), weight, bias, seq_idx=seq)
        return y.transpose(1, 2), None
    new_state = state.to(x.dtype, copy=True).contiguous()  # (B, K - 1, C)
    if T == 1:
        y = fn(x[:, 0], new_state.transpose(1, 2), weight, bias)  # (B, C)
        return y.unsqueeze(1), new_state
    y, final = fn(x.transpose(1, 2), weight, bias, initial_states=new_state.transpose(1, 2), return_final_states=True)
    return y.transpose(1, 2), final.transpose(1, 2)
