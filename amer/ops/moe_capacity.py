"""Causal, row-local fixed-capacity MoE dispatch: static shapes (XLA, ``torch.compile``) without a batch-wide queue.

GShard / Switch capacity dispatch (Lepikhin et al. 2020, arXiv 2006.16668; Fedus et al. 2021, arXiv
2101.03961) queues every token-slot of the whole batch for a fixed-size expert buffer. Under a causal
language model that queue leaks: whether token t keeps its expert depends on how many *later* tokens
(and tokens of *other rows*) queued ahead of it, so a future token can change an earlier token's output
and a full forward disagrees with prefill + token-by-token decoding. Here the queue is causal instead.

**Drop policy.** Each row is cut into fixed blocks of ``block`` positions (absolute positions in the
row: ``0..block-1``, ``block..2*block-1``, ...). Inside a block the slots queue *token-major*: token
t's choices before token t+1's (a token picks an expert at most once, so the order of its own k choices
never matters). A slot whose expert already holds ``capacity`` slots of earlier tokens of the same block
and row is dropped: it contributes nothing (with every slot dropped the token keeps only its residual)
and it is counted. Whether token t keeps a slot therefore depends only on the routing of tokens
``<= t`` of its own row and block: no future token and no other row can change it, and decoding
(which carries the block's per-expert counts in a cache) reproduces the full forward exactly.

**Capacity.** ``capacity = clamp(ceil(capacity_factor * block * top_k / n_experts), 1, block)``
slots per expert per block, independent of the sequence length and the batch size (so a prompt of
any length, a batch of any size and a decoding step all drop by the same rule). ``capacity_factor >=
n_experts / top_k`` (capacity = block) never drops and equals the dropless dispatch.

Packed documents share a row's blocks: with drops, a document packed after another may keep fewer slots
than it would alone (never more than the block allows); with no drops it is unaffected.

**Shapes.** Kept slots go to a buffer of ``(E, B * G, Cb, D)`` rows (G blocks touched by the call,
``Cb = min(capacity, block, T)``), the experts run as one batched matmul per projection, and the results
are gathered back. Dropped slots are routed to a spare row that is discarded: no boolean indexing, no
host read, no data-dependent shape; the buffer holds about ``capacity_factor * B * T * top_k`` rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from amer.ops.moe import expert_capacity, swiglu_expert

__all__ = ["CapacityCache", "block_capacity", "dispatch_causal_capacity"]


class CapacityCache(NamedTuple):
    """Decoding state of a capacity-dispatch MoE layer: the current block's per-expert slot counts."""

    counts: Tensor  # (B, E) int64 slots each expert already holds in the block that ``pos`` falls in
    pos: int  # tokens of the row seen so far (the absolute position of the next token)


def block_capacity(block: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots per expert per block: ``clamp(ceil(capacity_factor * block * top_k / n_experts), 1, block)``."""
    return expert_capacity(block, top_k, n_experts, capacity_factor)


def dispatch_causal_capacity(x: Tensor, expert_idx: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor, *,
                             capacity: int, block: int, start: int = 0, counts: Tensor | None = None,
                             experts: Callable[[Tensor, Tensor, Tensor], Tensor] = swiglu_expert,
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """Causal block-capacity top-k dispatch (see the module docstring for the drop policy).

    x (B, T, D); expert_idx, weights (B, T, k) (indices distinct per token, as top-k gives); w_gate_up
    (E, D, 2F); w_down (E, F, D). ``start`` is the absolute row position of ``x[:, 0]`` (a decoding
    cache's position) and ``counts`` (B, E) the slots each expert already holds in the block ``start``
    falls in (ignored when ``start`` opens a new block). Returns ``(y (B, T, D), n_dropped (0-dim int64),
    counts after the last token (B, E))``. ``experts(buffer, w_gate_up, w_down)`` runs the experts on the
    ``(E, rows, D)`` buffer (expert parallelism passes one that sends each expert's rows to its rank).
    """
    B, T, D = x.shape
    k = expert_idx.shape[-1]
    E = w_gate_up.shape[0]
    N, C, dev = B * T, capacity, x.device
    off = start % block
    G = (off + T - 1) // block + 1  # blocks this call touches
    Cb = min(C, block, T)  # buffer rows per expert per block: no block holds more of this call's tokens
    xf = x.reshape(N, D)
    w = weights.to(x.dtype)
    with torch.no_grad():
        onehot = F.one_hot(expert_idx, E).sum(2)  # (B, T, E) 0/1: which experts each token chose
        incl = onehot.cumsum(1)  # (B, T, E) slots per expert up to and including token t
        excl = incl - onehot
        t = torch.arange(T, device=dev)
        grp = torch.div(t + off, block, rounding_mode="floor")  # (T,) block of each token, 0-based in this call
        first = (grp * block - off).clamp(min=0)  # (T,) this call's first token of that block
        local = excl - excl.index_select(1, first)  # (B, T, E) this call's slots ahead in the block
        prior = local
        if counts is not None and off > 0:  # the block already under way when the call starts
            prior = local + counts.view(B, 1, E) * (grp == 0).view(1, T, 1)
        pos = prior.gather(2, expert_idx)  # (B, T, k) place in its expert's queue for the block
        lpos = local.gather(2, expert_idx)  # (B, T, k) row in this call's buffer (< Cb when kept)
        keep = pos < C
        n_dropped = (~keep).sum()
        group = torch.arange(B, device=dev).view(B, 1) * G + grp.view(1, T)  # (B, T) buffer block of each token
        R = E * B * G * Cb  # buffer rows; row R is the spare that dropped slots write to
        dest = torch.where(keep, (expert_idx * (B * G) + group.unsqueeze(-1)) * Cb + lpos, R).reshape(-1)  # (N k,)
        token = torch.arange(N, device=dev).repeat_interleave(k)  # (N k,) source token of each slot
        # buffer row -> source token; empty rows point at the zero pad row N
        src = torch.full((R + 1,), N, dtype=torch.long, device=dev).scatter(0, dest, token)[:R]
        last = prior[:, -1] + onehot[:, -1]  # (B, E) counts after the last token, in its block
    x_pad = torch.cat([xf, xf.new_zeros(1, D)])  # (N + 1, D)
    buf = x_pad.index_select(0, src).view(E, B * G * Cb, D)
    out = experts(buf, w_gate_up.to(buf.dtype), w_down.to(buf.dtype))  # (E, B G Cb, D), empty rows stay 0
    out_pad = torch.cat([out.reshape(R, D), out.new_zeros(1, D)])  # (R + 1, D)
    ys = out_pad.index_select(0, dest).view(N, k, D)  # dropped slots read the zero row
    y = (ys * (w.reshape(N, k) * keep.reshape(N, k).to(w.dtype)).unsqueeze(-1)).sum(1)  # (N, D)
    return y.view(B, T, D), n_dropped, last
