"""Mixture-of-experts dispatch: route token-slots to feed-forward experts and combine the results.

Two strategies over the same stacked expert weights, ``w_gate_up`` (E, D, 2F) (gate columns first,
then up, as in :class:`amer.blocks.common.SwiGLU`) and ``w_down`` (E, F, D). The experts are SwiGLU unless
``act`` names another entry of :data:`amer.ops.activation.ACTIVATIONS`; an ungated one (``relu2``, ``gelu``)
has ``w_gate_up`` (E, D, F) and computes ``down(act(x up))``.

* :func:`dispatch_dropless` - sort the N*k token-slots by expert and run each expert on its
  contiguous slice (MegaBlocks, Gale et al. 2022, arXiv 2211.15841): no token is ever dropped and
  no FLOP is spent on padding. With ``torch._grouped_mm`` (the default wherever torch has it, see
  :mod:`amer.ops.kernels`) the slice boundaries stay on the device: static shapes, no host sync, and
  it compiles under ``torch.compile(fullgraph=True)``. The reference (``AMER_KERNELS=reference``, or
  fp64) reads the slice sizes on the host and runs :func:`grouped_swiglu`: eager only.
* :func:`dispatch_capacity` - GShard / Switch-Transformer dispatch (Lepikhin et al. 2020, arXiv
  2006.16668; Fedus et al. 2021, arXiv 2101.03961): every expert gets a fixed-size buffer of
  ``capacity`` rows and overflowing slots are dropped. Every shape is static, so it compiles to a
  single graph under ``torch.compile(fullgraph=True)`` and on XLA.

:func:`dense_reference` runs every expert on every token: the test oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from amer.ops.activation import activation
from amer.ops.fused import cast
from amer.ops.kernels import grouped_mm, megablocks

__all__ = ["expert_capacity", "dispatch_dropless", "dispatch_padded", "dispatch_capacity", "dense_reference",
           "swiglu_expert", "grouped_swiglu"]


def swiglu_expert(h: Tensor, w_gate_up: Tensor, w_down: Tensor, act: str = "silu") -> Tensor:
    """One SwiGLU expert (Shazeer 2020) on rows h (..., D) with w_gate_up (D, 2F), w_down (F, D); another
    ``act`` makes it that (gated or ungated) feed-forward.

    Batched weights (E, D, 2F) / (E, F, D) with h (E, C, D) work too (matmul broadcasts).
    """
    a = activation(act)
    if not a.gated:
        return torch.matmul(a.fn(torch.matmul(h, w_gate_up)), w_down)
    gate, up = torch.matmul(h, w_gate_up).chunk(2, dim=-1)  # (..., F) each
    return torch.matmul(a.fn(gate) * up, w_down)  # (..., D)


class _GroupedSwiGLU(torch.autograd.Function):
    """Every expert's SwiGLU on its contiguous slice of expert-sorted rows, as one autograd node.

    The per-expert composite (matmul, chunk, silu, mul, matmul; then cat of the expert outputs) makes
    autograd build ~6 nodes per expert whose backward cats the chunked gradients, splits the output
    gradient and stacks the unbound weight gradients: full-size copies that cost more than the
    elementwise math on CPU. Here the matmuls write straight into slices of preallocated buffers
    (``out=``), the activation runs once over all experts' rows, and only the inputs, the (M, 2F)
    pre-activations and silu(gate) are saved (backward recomputes the (M, F) product in one pass).
    xs (M, D) sorted by expert, ``counts[e]`` rows each; w_gate_up (E, D, 2F); w_down (E, F, D).
    """

    @staticmethod
    def forward(ctx, xs: Tensor, w_gate_up: Tensor, w_down: Tensor, counts: list[int],  # type: ignore[override]
                act: str = "silu") -> Tensor:
        M, D = xs.shape
        Fh = w_down.shape[1]
        a = activation(act)
        xs = xs.contiguous()
        h = xs.new_empty(M, w_gate_up.shape[-1])  # (M, 2F) gate | up pre-activations; ungated (M, F)
        slices = _expert_slices(counts)
        for e, sl in slices:
            torch.mm(xs[sl], w_gate_up[e], out=h[sl])
        s = a.fn(h[:, :Fh])  # (M, F), kept: backward needs it twice
        out = s * h[:, Fh:] if a.gated else s  # (M, F)
        ys = xs.new_empty(M, D)
        for e, sl in slices:
            torch.mm(out[sl], w_down[e], out=ys[sl])
        ctx.save_for_backward(xs, w_gate_up, w_down, h, s)
        ctx.slices, ctx.act = slices, act
        return ys

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        xs, w_gate_up, w_down, h, s = ctx.saved_tensors
        slices = ctx.slices
        a = activation(ctx.act)
        need_x, need_gu, need_d = ctx.needs_input_grad[:3]
        Fh = w_down.shape[1]
        gy = gy.contiguous()
        gate, up = h[:, :Fh], h[:, Fh:]
        full = len(slices) == w_gate_up.shape[0]  # else an expert without rows gets a zero gradient
        d_down = None
        if need_d:
            d_down = torch.empty_like(w_down) if full else torch.zeros_like(w_down)
            out = s * up if a.gated else s
            for e, sl in slices:
                torch.mm(out[sl].t(), gy[sl], out=d_down[e])
            del out
        d_act = torch.empty_like(s)  # (M, F)
        for e, sl in slices:
            torch.mm(gy[sl], w_down[e].t(), out=d_act[sl])
        if not a.gated:
            dh = a.grad(d_act, h)
        else:
            dh = torch.empty_like(h)  # (M, 2F): both halves written in place, no cat
            torch.mul(d_act, s, out=dh[:, Fh:])  # d up = d_act * act(gate)
            if ctx.act == "silu":
                torch.ops.aten.silu_backward.grad_input(d_act.mul_(up), gate, grad_input=dh[:, :Fh])  # d gate
            else:
                dh[:, :Fh] = a.grad(d_act.mul_(up), gate)
        d_gu = d_x = None
        if need_gu:
            d_gu = torch.empty_like(w_gate_up) if full else torch.zeros_like(w_gate_up)
            for e, sl in slices:
                torch.mm(xs[sl].t(), dh[sl], out=d_gu[e])
        if need_x:
            d_x = torch.empty_like(xs)
            for e, sl in slices:
                torch.mm(dh[sl], w_gate_up[e].t(), out=d_x[sl])
        return d_x, d_gu, d_down, None, None


def _expert_slices(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, row slice) of each expert that received rows, in expert order."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, slice(start, start + n)))
        start += n
    return out


def grouped_swiglu(xs: Tensor, w_gate_up: Tensor, w_down: Tensor, counts: list[int], act: str = "silu") -> Tensor:
    """SwiGLU (or the ``act`` feed-forward) of expert ``e`` on rows ``xs[sum(counts[:e]) : sum(counts[:e + 1])]``,
    for every expert.

    xs (M, D) expert-sorted, w_gate_up (E, D, 2F) (ungated: (E, D, F)), w_down (E, F, D) -> (M, D). Under
    autocast the matmuls run in the autocast dtype, as ``torch.matmul`` would.
    """
    dev = xs.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        xs, w_gate_up, w_down = xs.to(dt), w_gate_up.to(dt), w_down.to(dt)
        with torch.autocast(device_type=dev, enabled=False):
            return _GroupedSwiGLU.apply(xs, w_gate_up, w_down, counts, act)
    dt = torch.promote_types(xs.dtype, w_gate_up.dtype)
    return _GroupedSwiGLU.apply(xs.to(dt), w_gate_up.to(dt), w_down.to(dt), counts, act)


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Rows per expert buffer: ``ceil(capacity_factor * n_tokens * top_k / n_experts)``.

    Clamped to [1, n_tokens]: a token picks an expert at most once, so no expert can receive more
    than ``n_tokens`` slots and a larger buffer would only hold padding.
    """
    return max(1, min(math.ceil(capacity_factor * n_tokens * top_k / n_experts), n_tokens))


def _flatten(x: Tensor, expert_idx: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    D = x.shape[-1]
    xf = x.reshape(-1, D)  # (N, D)
    N = xf.shape[0]
    return xf, expert_idx.reshape(N, -1), weights.reshape(N, -1).to(x.dtype)


def dispatch_dropless(x: Tensor, expert_idx: Tensor, weights: Tensor, w_gate_up: Tensor,
                      w_down: Tensor, act: str = "silu") -> Tensor:
    """Dropless top-k dispatch: y[n] = sum_j weights[n, j] * expert_{expert_idx[n, j]}(x[n]).

    x: (..., D); expert_idx, weights: (..., k) (indices distinct per token, as top-k gives);
    w_gate_up: (E, D, 2F) (ungated ``act``: (E, D, F)); w_down: (E, F, D). Returns y with the shape of x.

    The N*k slots are sorted by expert id (stable, so slot order within an expert follows the
    tokens), the inputs gathered once, each expert run on its contiguous slice - one grouped GEMM
    per projection (:func:`_dropless_grouped`), or the reference loop over experts, never over
    tokens - and the weighted outputs summed back per token.
    """
    xf, idx, w = _flatten(x, expert_idx, weights)
    N, k = idx.shape
    E = w_gate_up.shape[0]
    flat_e = idx.reshape(-1)  # (N*k,) slot s = n*k + j
    dt = _compute_dtype(xf, w_gate_up)
    experts = grouped_mm(x.device, dt, (xf.shape[1], w_gate_up.shape[-1], w_down.shape[1]))
    if experts is not None:
        return _dropless_grouped(experts, xf, flat_e, w.reshape(-1), w_gate_up, w_down, k, act).reshape(x.shape)
    mb = megablocks(x.device)
    if mb is not None and hasattr(mb, "gather") and hasattr(mb, "scatter"):
        return _dropless_megablocks(mb, xf, flat_e, w.reshape(-1), w_gate_up, w_down, k, act).reshape(x.shape)

    sorted_e, order = torch.sort(flat_e, stable=True)  # (N*k,) slot ids grouped by expert
    token = order // k  # (N*k,) source token of each sorted slot
    counts = torch.bincount(sorted_e, minlength=E).tolist()  # host sync: slice sizes
    xs = xf.index_select(0, token)  # (N*k, D) the one gather
    ys = grouped_swiglu(xs, w_gate_up, w_down, counts, act)  # (N*k, D) expert-sorted
    ys = ys * w.reshape(-1).index_select(0, order).unsqueeze(-1)
    # index_add (not a gather of the unsorted slots) so the k contributions are summed in one pass
    y = xf.new_zeros(N, xf.shape[1]).index_add_(0, token, ys)
    return y.reshape(x.shape)


def dispatch_padded(x: Tensor, expert_idx: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor,
                    act: str = "silu") -> Tensor:
    """:func:`dispatch_dropless` for a few dozen tokens without gradients (decoding a batch of rows), on batched
    matmuls: each expert's rows padded to the largest expert's count, the experts run as one ``bmm`` per projection.

    At decoding sizes every expert gets a handful of rows and the step reads each expert's weights for them: on CPU
    one batched product over the (E, C, D) buffer reads them faster than the grouped GEMM's one ``mm`` per expert
    (top-2 of 8 experts, width 192, 16 tokens: 370 vs 560 us a block; 2.5x on the products alone). The count ``C``
    is read on the host, so this is the eager CPU path; nothing is dropped, the result is the dropless one.
    """
    xf, idx, w = _flatten(x, expert_idx, weights)
    N, k = idx.shape
    E, D = w_gate_up.shape[0], xf.shape[1]
    dt = torch.promote_types(xf.dtype, w_gate_up.dtype)
    flat_e = idx.reshape(-1)  # (N k,) slot n k + j
    onehot = F.one_hot(flat_e, E)
    seen = onehot.cumsum(0)  # (N k, E) slots of each expert up to and including this one
    C = int(seen[-1].max())
    dest = flat_e * C + (seen * onehot).sum(-1) - 1  # (N k,) buffer row: the expert's block, the slot's place in it
    buf = xf.new_zeros(E * C, D, dtype=dt).index_copy_(0, dest, cast(xf, dt).repeat_interleave(k, dim=0))
    out = swiglu_expert(buf.view(E, C, D), cast(w_gate_up, dt), cast(w_down, dt), act).view(E * C, D)
    ys = out.index_select(0, dest).view(N, k, D)
    return torch.bmm(cast(w, dt).unsqueeze(1), ys).reshape(x.shape)  # each token's k outputs, weighted and summed


def _compute_dtype(xs: Tensor, w: Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on (as ``torch.matmul`` would), else the promoted one."""
    dev = xs.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(xs.dtype, w.dtype)


def _dropless_grouped(experts, xf: Tensor, flat_e: Tensor, w: Tensor, w_gate_up: Tensor, w_down: Tensor,
                      k: int, act: str = "silu") -> Tensor:
    """The dropless dispatch on grouped GEMM (:func:`amer.ops.grouped.grouped_swiglu`), with no host sync.

    The group ends ``offs`` (E,) int32 are found by ``searchsorted`` in the sorted expert ids, on the device;
    every shape depends only on N, k and the weights, so the whole dispatch is one static graph.
    """
    N, D = xf.shape
    E = w_gate_up.shape[0]
    dt = _compute_dtype(xf, w_gate_up)
    sorted_e, order = torch.sort(flat_e, stable=True)
    token = order // k
    offs = torch.searchsorted(sorted_e, torch.arange(E, device=xf.device, dtype=sorted_e.dtype), right=True,
                              out_int32=True)  # (E,) end of each expert's rows
    with torch.autocast(device_type=xf.device.type, enabled=False):  # a custom op: autocast would not cast it
        xs = xf.to(dt).index_select(0, token)  # (N*k, D)
        ys = experts(xs, w_gate_up.to(dt), w_down.to(dt), offs, act)  # (N*k, D)
        ys = ys * w.to(dt).index_select(0, order).unsqueeze(-1)
        return ys.new_zeros(N, D).index_add_(0, token, ys)


def _dropless_megablocks(mb, xf: Tensor, flat_e: Tensor, w: Tensor, w_gate_up: Tensor, w_down: Tensor,
                         k: int, act: str = "silu") -> Tensor:
    """Same as the torch path with MegaBlocks' fused permute (gather) and weighted un-permute (scatter).

    MegaBlocks' convention: ``indices`` are slot ids (n*k + j) in expert order, ``bins`` the
    inclusive cumulative slot counts per expert, all int32.
    """
    E = w_gate_up.shape[0]
    with torch.no_grad():
        sorted_e, order = torch.sort(flat_e.int(), stable=True)
        counts = torch.bincount(flat_e, minlength=E)
        bins = torch.cumsum(counts, 0).int()
        indices, bin_ids = order.int(), sorted_e.int()
    xs = mb.gather(xf.contiguous(), indices, bin_ids, bins, k)  # (N*k, D) expert-sorted
    sizes = counts.tolist()
    wgu, wd = w_gate_up.unbind(0), w_down.unbind(0)
    outs = [swiglu_expert(xe, wgu[e], wd[e], act) for e, xe in enumerate(xs.split(sizes)) if sizes[e] > 0]
    ys = torch.cat(outs) if len(outs) > 1 else outs[0]
    return mb.scatter(ys.contiguous(), indices, bin_ids, w.contiguous(), bins, k)  # (N, D)


def dispatch_capacity(x: Tensor, expert_idx: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor,
                      capacity: int, act: str = "silu") -> tuple[Tensor, Tensor]:
    """Fixed-capacity top-k dispatch with static shapes. Returns (y like x, n_dropped 0-dim int64).

    Each slot's position in its expert's queue is a cumulative sum over the one-hot assignment.
    Slots are queued choice-major - every token's first choice before any token's second choice -
    so overflow drops low-priority choices first (GShard's rule). Slots at position >= capacity
    are dropped: they contribute nothing (the token keeps its residual) and are counted. Kept
    slots are placed in an (E, capacity, D) buffer, the experts run as one batched matmul per
    projection, and the outputs are gathered back and weighted. No boolean indexing, no host
    sync, no data-dependent shape: dropped slots are routed to one spare row that is discarded.
    """
    xf, idx, w = _flatten(x, expert_idx, weights)
    N, k = idx.shape
    E, D = w_gate_up.shape[0], xf.shape[1]
    C = capacity
    e_kn = idx.t().reshape(-1)  # (k*N,) choice-major slot order
    w_kn = w.t().reshape(-1)  # (k*N,)
    with torch.no_grad():
        onehot = F.one_hot(e_kn, E)  # (k*N, E)
        pos = (onehot.cumsum(0) * onehot).sum(-1) - 1  # (k*N,) 0-based place in its expert's queue
        keep = pos < C
        n_dropped = (~keep).sum()
        dest = torch.where(keep, e_kn * C + pos, E * C)  # (k*N,) buffer row; E*C = the spare row
        token = torch.arange(N, device=xf.device).repeat(k)  # (k*N,)
        # buffer row -> source token; empty rows point at the zero pad row N
        src = torch.full((E * C + 1,), N, dtype=torch.long, device=xf.device).scatter(0, dest, token)[: E * C]
    x_pad = torch.cat([xf, xf.new_zeros(1, D)])  # (N + 1, D)
    buf = x_pad.index_select(0, src).view(E, C, D)
    out = swiglu_expert(buf, w_gate_up, w_down, act)  # (E, C, D): bmm per projection, empty rows stay 0
    out_pad = torch.cat([out.reshape(E * C, D), out.new_zeros(1, D)])  # (E*C + 1, D)
    ys = out_pad.index_select(0, dest).view(k, N, D)  # dropped slots read the zero row
    y = (ys * (w_kn * keep.to(w_kn.dtype)).view(k, N, 1)).sum(0)  # (N, D)
    return y.reshape(x.shape), n_dropped


def dense_reference(x: Tensor, router_probs_topk_dense: Tensor, w_gate_up: Tensor, w_down: Tensor,
                    act: str = "silu") -> Tensor:
    """Every expert on every token, combined with dense routing weights (zero off the top-k).

    x: (..., D); router_probs_topk_dense: (..., E). O(N * E) work: the test oracle, not a kernel.
    """
    D = x.shape[-1]
    xf = x.reshape(-1, D)
    dense_w = router_probs_topk_dense.reshape(xf.shape[0], -1).to(x.dtype)  # (N, E)
    out = swiglu_expert(xf.unsqueeze(0), w_gate_up, w_down, act)  # (E, N, D)
    return torch.einsum("ne,end->nd", dense_w, out).reshape(x.shape)
