"""Causal, row-local, document-local fixed-capacity MoE dispatch: static shapes (XLA, ``torch.compile``).

GShard / Switch capacity dispatch (Lepikhin et al. 2020, arXiv 2006.16668; Fedus et al. 2021, arXiv
2101.03961) queues every token-slot of the whole batch for a fixed-size expert buffer. Under a causal
language model that queue leaks: whether token t keeps its expert depends on how many *later* tokens
(and tokens of *other rows*) queued ahead of it, so a future token can change an earlier token's output
and a full forward disagrees with prefill + token-by-token decoding. Here each expert's budget is earned
token by token inside each document instead.

**Drop policy.** ``C = block_capacity(block, top_k, n_experts, capacity_factor)`` slots per ``block``
tokens: among the first ``n`` tokens of a document, an expert keeps at most ``floor(n * C / block)`` of
the slots routed to it, first come first served (token-major; a token picks an expert at most once, so
the order of its own k choices never matters). A slot beyond that budget is dropped: it contributes
nothing (with every slot dropped the token keeps only its residual) and it is counted. Positions count
from the document's first token (a row without documents is one document), so whether token t keeps a
slot depends only on its own document's tokens ``<= t``: no future token, no other row and no other
document of a packed row can change it. A packed document therefore equals itself alone in a row of its
own, drops included, and decoding (which carries the document's per-expert counts in a cache) reproduces
the full forward exactly.

**Why a budget that grows.** The buffer has a static number of rows per expert and row, and a document's
slots must not depend on its neighbours; a row of one-token documents that all pick one expert then
bounds what a one-token document may keep, and likewise for every length: ``floor(n * C / block)`` is the
largest budget a buffer of ``C * T / block`` rows per expert and row can honour for every packing. The
price: a document's first ``ceil(block / C) - 1`` tokens keep no expert slot (none for ``C == block``,
i.e. ``capacity_factor >= n_experts / top_k``, which never drops and equals the dropless dispatch).

**Kept slots in closed form.** With ``A(t)`` the slots an expert was asked for by tokens ``<= t`` of the
document and ``b(t)`` the budget at t, the greedy rule keeps ``K(t) = min(K(t-1) + a(t), b(t))``, whose
solution is ``K(t) = A(t) - max(0, max_{q<=t} (A(q) - b(q)))``: one cumulative sum and one cumulative
maximum over the row (offset per document so that maxima never cross a boundary), no loop over tokens.

**Shapes.** Kept slots go to a buffer of ``(E, B, R)`` rows, ``R = min(T, C * T // block)`` (a decoding
call that starts at document position ``s``: ``min(T, C * (s + T) // block)``), ordered by the row's
running count of kept slots per expert; the experts run as one batched matmul per projection and the
results are gathered back. Dropped slots are routed to a spare row that is discarded: no boolean
indexing, no host read, no data-dependent shape; the buffer holds about ``capacity_factor * B * T *
top_k`` rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from amer.ops.moe import expert_capacity, swiglu_expert

__all__ = ["CapacityCache", "block_capacity", "dispatch_causal_capacity"]


class CapacityCache(NamedTuple):
    """Decoding state of a capacity-dispatch MoE layer: the document's per-expert kept-slot counts."""

    counts: Tensor  # (B, E) int64 slots each expert kept from the document's tokens so far
    pos: int  # tokens of the document seen so far (the position of the next token)


def block_capacity(block: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots per expert per ``block`` tokens: ``clamp(ceil(capacity_factor * block * top_k / n_experts), 1, block)``."""
    return expert_capacity(block, top_k, n_experts, capacity_factor)


def dispatch_causal_capacity(x: Tensor, expert_idx: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor, *,
                             capacity: int, block: int, start: int = 0, counts: Tensor | None = None,
                             position: Tensor | None = None, act: str = "silu") -> tuple[Tensor, Tensor, Tensor]:
    """Causal document-local capacity top-k dispatch (see the module docstring for the drop policy).

    x (B, T, D); expert_idx, weights (B, T, k) (indices distinct per token, as top-k gives); w_gate_up
    (E, D, 2F) (ungated ``act``: (E, D, F)); w_down (E, F, D); ``act`` the experts' activation (SwiGLU by
    default, see :func:`amer.ops.moe.swiglu_expert`). A row is one document that ``x[:, 0]`` continues at
    position ``start`` (a decoding cache's position), with ``counts`` (B, E) the slots each expert already kept
    from it; or, for packed rows, ``position`` (B, T) gives each token's offset into its own document (0 starts
    one).
    Returns ``(y (B, T, D), n_dropped (0-dim int64), counts (B, E) kept by each row's last document)``.
    """
    B, T, D = x.shape
    k = expert_idx.shape[-1]
    E = w_gate_up.shape[0]
    N, C, dev = B * T, capacity, x.device
    if position is not None and (start or counts is not None):
        raise ValueError("dispatch_causal_capacity: pass either position (packed rows) or start/counts (decoding)")
    R = max(1, min(T, C * (start + T) // block))  # buffer rows per expert and row: kept slots never exceed it
    xf = x.reshape(N, D)
    w = weights.to(x.dtype)
    with torch.no_grad():
        a = F.one_hot(expert_idx, E).sum(2)  # (B, T, E) 0/1: which experts each token chose
        A = a.cumsum(1)  # (B, T, E) slots asked of each expert up to and including token t
        t = torch.arange(T, device=dev)
        if position is None:
            pos = (t + start).expand(B, T)
            need = A if counts is None else A + counts.view(B, 1, E)  # slots held after t if none dropped
            over = need - (C * (pos + 1) // block).unsqueeze(-1)  # (B, T, E) excess over the budget at t
            dropped = over.cummax(1).values.clamp(min=0)  # (B, T, E) drops so far in the document
            prev = F.pad(dropped[:, :-1], (0, 0, 1, 0))
        else:
            pos = position.long()
            first = (t - pos).unsqueeze(-1).expand(B, T, E)  # (B, T, E) the document's first token
            need = A - (A - a).gather(1, first)  # document-local cumulative count
            over = need - (C * (pos + 1) // block).unsqueeze(-1)
            # a running maximum per document: later documents sit higher by more than any excess spans, so
            # no maximum crosses a boundary (|over| <= T)
            lift = ((pos == 0).long().cumsum(1) * (2 * T + 4)).unsqueeze(-1)
            dropped = ((over + lift).cummax(1).values - lift).clamp(min=0)
            prev = F.pad(dropped[:, :-1], (0, 0, 1, 0)) * (pos != 0).unsqueeze(-1)
        kept = a - (dropped - prev)  # (B, T, E) 0/1: the slot token t asked of expert e was kept
        keep = kept.gather(2, expert_idx).bool()  # (B, T, k)
        n_dropped = a.sum() - kept.sum()
        row_pos = (kept.cumsum(1) - kept).gather(2, expert_idx)  # (B, T, k) the row's earlier kept slots
        last = need[:, -1] - dropped[:, -1]  # (B, E) kept by each row's last document
        rows = torch.arange(B, device=dev).view(B, 1, 1)
        dest = torch.where(keep, (expert_idx * B + rows) * R + row_pos, E * B * R).reshape(-1)  # (N k,)
        token = torch.arange(N, device=dev).repeat_interleave(k)  # (N k,) source token of each slot
        # buffer row -> source token; empty rows point at the zero pad row N
        src = torch.full((E * B * R + 1,), N, dtype=torch.long, device=dev).scatter(0, dest, token)[:-1]
    x_pad = torch.cat([xf, xf.new_zeros(1, D)])  # (N + 1, D)
    buf = x_pad.index_select(0, src).view(E, B * R, D)
    out = swiglu_expert(buf, w_gate_up.to(buf.dtype), w_down.to(buf.dtype), act)  # (E, B R, D), empty rows stay 0
    out_pad = torch.cat([out.reshape(E * B * R, D), out.new_zeros(1, D)])  # (E B R + 1, D)
    ys = out_pad.index_select(0, dest).view(N, k, D)  # dropped slots read the zero row
    y = (ys * (w.reshape(N, k) * keep.reshape(N, k).to(w.dtype)).unsqueeze(-1)).sum(1)  # (N, D)
    return y.view(B, T, D), n_dropped, last
