"""Semantic Tube Prediction (STP) loss and deterministic trajectory-curvature estimators.

STP (the "geodesic hypothesis" of Semantic Tube Prediction) assumes that hidden-state
trajectories of a language model are locally straight. The auxiliary loss here is the narrow,
predictor-free form of that idea: sample ordered positions ``s < r < t`` of a hidden-state
sequence and penalise the bend between the two consecutive chords::

    L = 1 - cos(h[r] - h[s], h[t] - h[r])          in [0, 2]

0 is a straight trajectory, 1 is a right angle (or a random walk: independent increments),
1.5 is i.i.d. noise (consecutive chords share the middle point, so cos ~ -1/2), 2 is a reversal.
This is ``--stp.form triple``; the STP paper's released code trains the patch-vs-complement ``span`` form,
in :mod:`amer.stp_span` (same masks, same contract); :class:`amer.objective.STPPolicy` picks one.

This module is pure math with no policy: it knows nothing about training steps, configs, gates,
weights or which layers are selected. Those live in :class:`amer.config.STPConfig` and the
training loop. Everything here is static-shape and host-sync free (no ``.item()``, no boolean
indexing, no branching on tensor values), so the loss compiles to one graph whose size does not
depend on ``n_spans`` (a Python loop over spans would unroll into a graph that
grows with the span count). Degenerate cases (padding, short documents, ``T < 3``) are handled
by zero weights, never by dynamic shapes.

Public API
----------
- :func:`compute_stp_loss`: the stochastic auxiliary loss (differentiable, scalar fp32).
- :func:`sample_spans`: the triple sampler it uses, exposed for inspection and tests.
- :func:`span_bends`: the bend of each sampled triple (what the loss averages).
- :func:`token_curvature`: deterministic curvature over consecutive token triples.
- :func:`depth_curvature` / :func:`depth_curvature_per_token`: curvature along depth.

Masks (``mask`` argument) are ``None``, a ``(B, T)`` bool validity mask (``True`` = real token)
or a ``(B, T)`` integer document-id tensor. Document ids: a document is a maximal run of equal
consecutive ids (so packing order, not id uniqueness, defines documents), and a negative id marks
padding (never a valid position).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "compute_stp_loss",
    "stp_per_layer",
    "sample_spans",
    "span_bends",
    "token_curvature",
    "depth_curvature",
    "depth_curvature_per_token",
]

# Norms are clamped to this before dividing; in fp32 eps**2 (1e-16) is still a normal number.
_EPS = 1e-8


def _one_minus_cos(u: Tensor, v: Tensor, eps: float = _EPS) -> Tensor:
    """``1 - cos(u, v)`` along the last axis, in fp32, clamped to [0, 2].

    The single place every estimator computes the bend. Both norms are clamped separately (as in
    ``F.cosine_similarity``), so a zero-length chord gives cos = 0 (loss 1) with finite gradients
    instead of 0/0; squared norms are clamped before ``rsqrt`` so the gradient at zero is 0, not
    NaN. Upcasting first keeps bf16/fp16 inputs from overflowing the dot product or losing the
    small differences between neighbouring states.
    """
    u = u.float()
    v = v.float()
    eps2 = eps * eps
    dot = (u * v).sum(-1)
    inv_u = torch.rsqrt((u * u).sum(-1).clamp_min(eps2))
    inv_v = torch.rsqrt((v * v).sum(-1).clamp_min(eps2))
    # Rounding can push |cos| a few ulp past 1; the clamp keeps the documented [0, 2] range.
    return (1.0 - dot * inv_u * inv_v).clamp(0.0, 2.0)


def _check_mask(mask: Tensor, batch: int, length: int) -> None:
    if mask.shape != (batch, length):
        raise ValueError(f"mask must have shape (B, T) = {(batch, length)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"mask must be bool (validity) or integer (document ids), got {mask.dtype}")


def _valid_and_runs(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Validity ``(B, T)`` bool and a run id ``(B, T)`` int64 that changes at every document start.

    A bool mask is one run per row (triples may span padding gaps: all that is asked of them is
    that each position is real); document ids start a new run wherever the id changes.
    """
    if mask.dtype == torch.bool:
        return mask, torch.zeros_like(mask, dtype=torch.long)
    change = mask[:, 1:] != mask[:, :-1]  # (B, T-1)
    runs = torch.cat([torch.zeros_like(mask[:, :1], dtype=torch.long), change.long().cumsum(1)], 1)
    return mask >= 0, runs


def sample_spans(
    batch: int,
    length: int,
    n_spans: int,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample ``n_spans`` ordered triples per row: ``(idx (B, n_spans, 3) int64, weight (B, n_spans) fp32)``.

    Every index is in ``[0, T)``. A triple with weight 1 satisfies ``s < r < t``, all three
    positions valid and (document ids) inside one document; weight 0 marks a placeholder triple
    (no valid triple exists in that row, or ``T < 3``) whose indices are in range but meaningless.

    Without a mask (as in the seed implementation, with the range fixed): draw three positions
    i.i.d. uniform in ``[0, T-2)``, sort them and add ``[0, 1, 2]``. That maps the sorted draw
    one-to-one onto a strictly increasing triple in ``[0, T)``, covering every triple; triples
    with adjacent positions are slightly less likely than others (ties in the draw are rarer than
    distinct values), which does not matter for a curvature penalty. All weights are 1.

    With a mask, sampling happens *inside* documents so that short packed documents do not waste
    almost every triple: the middle position ``r`` is drawn uniformly among the *eligible*
    positions of the row (valid, with at least one valid position before and one after it in its
    document), then ``s`` uniformly among the valid positions of ``r``'s document before ``r`` and
    ``t`` uniformly among those after it. Consequently documents contribute in proportion to
    ``len - 2`` and documents shorter than 3 never; a row with no eligible position gets weight 0.
    For a bool mask the "document" is the whole row (so ``s`` and ``t`` may lie across a padding
    gap); use document ids when that must not happen. All of it is cumsum / cummax / searchsorted
    on ``(B, T)`` integer tensors plus one ``torch.rand``: static shapes, no host sync.
    """
    if n_spans < 1:
        raise ValueError(f"n_spans must be >= 1, got {n_spans}")
    if mask is not None:
        _check_mask(mask, batch, length)
        device = mask.device
    if length < 3:
        idx = torch.zeros(batch, n_spans, 3, dtype=torch.long, device=device)
        return idx, torch.zeros(batch, n_spans, device=device)

    if mask is None:
        draw = torch.randint(0, length - 2, (batch, n_spans, 3), generator=generator,
                             device=_draw_device(generator, device)).to(device)
        offsets = torch.arange(3, device=device)
        idx = draw.sort(dim=-1).values + offsets  # (B, S, 3) strictly increasing
        return idx, torch.ones(batch, n_spans, device=device)
    return _sample_spans_masked(mask, n_spans, generator)


def _searchsorted(sorted_seq: Tensor, values: Tensor) -> Tensor:
    """``torch.searchsorted(sorted_seq, values)`` (left) for (B, T) / (B, S) integer counts, as a count of the
    entries below each value: the same integers, and an op XLA compiles (its searchsorted falls back to the
    host, which would cut the training step's graph); (B, S, T) comparisons, small next to the model."""
    return (sorted_seq.unsqueeze(1) < values.unsqueeze(-1)).sum(-1)


def _suffix_min(x: Tensor) -> Tensor:
    """Running minimum from the right along dim 1, through cummax (which XLA compiles; cummin falls back)."""
    return -(-x).flip(1).cummax(dim=1).values.flip(1)


def _draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str | None:
    """Where a draw happens: on the generator's device (a host generator driving an XLA run draws on the
    host and the draw travels as an input, the same numbers a CPU run draws), else on ``device``."""
    return device if generator is None else generator.device


def _sample_spans_masked(mask: Tensor, n_spans: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    batch, length = mask.shape
    device = mask.device
    pos = torch.arange(length, device=device)
    valid, runs = _valid_and_runs(mask)
    valid_l = valid.long()
    # A position's document spans [start, end]; starts/ends are where the run id changes.
    is_start = torch.cat([torch.ones_like(runs[:, :1], dtype=torch.bool), runs[:, 1:] != runs[:, :-1]], 1)
    is_end = torch.cat([runs[:, 1:] != runs[:, :-1], torch.ones_like(runs[:, :1], dtype=torch.bool)], 1)
    start = torch.where(is_start, pos, 0).cummax(dim=1).values  # (B, T)
    end = _suffix_min(torch.where(is_end, pos, length - 1))  # (B, T)
    # Valid-token ranks: cnt[i] = number of valid positions in [0, i] of the row.
    cnt = valid_l.cumsum(1)  # (B, T)
    before_doc = cnt.gather(1, start) - valid_l.gather(1, start)  # valid positions before the doc
    n_before = cnt - valid_l - before_doc  # valid positions of the doc strictly before i
    n_after = cnt.gather(1, end) - cnt  # valid positions of the doc strictly after i
    eligible = valid & (n_before > 0) & (n_after > 0)  # (B, T)

    u = torch.rand(batch, n_spans, 3, generator=generator, device=_draw_device(generator, device)).to(device)
    # r: the k-th eligible position, k uniform in [0, n_eligible); searchsorted on the integer
    # cumulative count finds it without any float CDF rounding.
    elig_cnt = eligible.long().cumsum(1)  # (B, T)
    n_elig = elig_cnt[:, -1:]  # (B, 1)
    k = (u[..., 0] * n_elig).long().clamp(max=n_elig - 1).clamp_min(0)  # (B, S)
    r = _searchsorted(elig_cnt, k + 1).clamp(max=length - 1)  # (B, S)
    ok = eligible.gather(1, r)
    nb = n_before.gather(1, r)
    na = n_after.gather(1, r)
    rank_r = cnt.gather(1, r) - 1  # 0-based valid rank of r
    # s and t: uniform valid ranks inside r's document on either side of r, mapped back to
    # positions by searching the valid-rank cumulative count.
    rank_s = rank_r - nb + (u[..., 1] * nb).long().clamp(max=nb - 1)
    rank_t = rank_r + 1 + (u[..., 2] * na).long().clamp(max=na - 1)
    s = _searchsorted(cnt, rank_s.clamp_min(0) + 1).clamp(max=length - 1)
    t = _searchsorted(cnt, rank_t.clamp_min(0) + 1).clamp(max=length - 1)
    idx = torch.stack([s, r, t], dim=-1)  # (B, S, 3)
    return idx, ok.float()


def span_bends(hidden: Tensor, idx: Tensor) -> Tensor:
    """The bend ``1 - cos(h[r] - h[s], h[t] - h[r])`` of every triple of ``idx``: ``(B, S)`` fp32, unweighted.

    ``hidden`` is ``(B, T, D)`` and ``idx`` the ``(B, S, 3)`` triples of :func:`sample_spans`; the
    caller applies the span weights. The STP loss and the curvature report both read their spans
    through this, so the two figures are one computation. One gather of the ``3 * S`` positions per
    row, then the cosine, whatever ``S`` is.
    """
    batch, n_spans, _ = idx.shape
    dim = hidden.shape[-1]
    flat_idx = idx.reshape(batch, n_spans * 3)
    picked = hidden.gather(1, flat_idx.unsqueeze(-1).expand(batch, flat_idx.shape[1], dim))
    picked = picked.float().view(batch, n_spans, 3, dim)  # upcast before subtracting (bf16 safety)
    h_s, h_r, h_t = picked[:, :, 0], picked[:, :, 1], picked[:, :, 2]
    return _one_minus_cos(h_r - h_s, h_t - h_r)


def compute_stp_loss(
    hidden: Tensor | Sequence[Tensor],
    n_spans: int = 1,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """STP trajectory-straightness loss: mean of ``1 - cos(h[r] - h[s], h[t] - h[r])``, a fp32 scalar.

    Args:
        hidden: one ``(B, T, D)`` tensor or a list/tuple of them (the multi-layer variant; all
            share ``(B, T)``, ``D`` may differ). A list averages the per-layer losses, and every
            layer is read at the *same* sampled positions, so layers are compared like for like.
        n_spans: triples sampled per row (the variance knob: std falls like ``1/sqrt(n_spans)``;
            cost and graph size are independent of it).
        mask: ``None``, a ``(B, T)`` bool validity mask or ``(B, T)`` integer document ids
            (negative = padding). Triples are then sampled inside documents (see
            :func:`sample_spans` for the exact distribution) and weighted 0 when no valid one
            exists, never filtered.
        generator: makes the sampling reproducible.

    Returns:
        ``sum(w * (1 - cos)) / max(sum(w), 1)`` over all rows and spans, i.e. the mean over all
        valid triples of the batch, in [0, 2]. Rows without a valid triple contribute nothing;
        a batch without any (or ``T < 3``) gives 0, still attached to the graph so a backward
        through it runs (and sends zero gradients).

    Cost per layer: one gather of ``B * 3 * n_spans`` rows, two subtractions, one cosine.
    """
    layers = list(hidden) if isinstance(hidden, (list, tuple)) else [hidden]
    if not layers:
        raise ValueError("compute_stp_loss needs at least one hidden-state tensor")
    for h in layers:
        if h.dim() != 3:
            raise ValueError(f"hidden states must be (B, T, D), got shape {tuple(h.shape)}")
    batch, length = layers[0].shape[:2]
    for h in layers[1:]:
        if h.shape[:2] != (batch, length):
            raise ValueError(
                f"all hidden states must share (B, T); got {tuple(layers[0].shape[:2])} and {tuple(h.shape[:2])}"
            )
    if n_spans < 1:
        raise ValueError(f"n_spans must be >= 1, got {n_spans}")
    if mask is not None:
        _check_mask(mask, batch, length)

    return stp_per_layer(layers, n_spans, mask=mask, generator=generator).mean()


def stp_per_layer(
    hidden: Sequence[Tensor],
    n_spans: int = 1,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    rows: slice | None = None,
) -> Tensor:
    """The STP loss of each layer in ``hidden`` as a ``(n_layers,)`` fp32 tensor, all layers read at the
    same sampled triples (so a caller can weight layers, e.g. by family, or log them one by one).
    :func:`compute_stp_loss` of a list is the mean of this vector.

    ``rows``: ``hidden`` holds only these rows of a batch of ``mask.shape[0]`` rows (one data-parallel
    rank's share). Spans are drawn for the whole batch, as one process would, and the loss is normalised
    so that the mean over equal shares is the whole batch's loss.
    """
    layers = list(hidden)
    if not layers:
        raise ValueError("stp_per_layer needs at least one hidden-state tensor")
    batch, length = layers[0].shape[:2]
    if length < 3:  # no ordered triple exists; keep the zeros on the graph
        return torch.stack([h.float().sum() * 0.0 for h in layers])

    if rows is not None and mask is None:
        raise ValueError("stp_per_layer: rows= needs the whole batch's mask (document ids or validity)")
    full = batch if rows is None else mask.shape[0]
    idx, weight = sample_spans(
        full, length, n_spans, mask=mask, generator=generator, device=layers[0].device
    )  # (B, S, 3), (B, S)
    denom = weight.sum().clamp_min(1.0)
    if full != batch:
        idx, weight = idx[rows], weight[rows]
        denom = denom * (batch / full)
    losses = []
    for h in layers:  # a handful of selected taps, never a loop over spans
        losses.append((span_bends(h, idx) * weight).sum() / denom)
    return torch.stack(losses)


def token_curvature(
    hidden: Tensor,
    *,
    stride: int = 1,
    mask: Tensor | None = None,
    reduce: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Deterministic curvature over every consecutive token triple ``(t, t+k, t+2k)``, ``k = stride``.

    Value at ``t``: ``1 - cos(h[t+k] - h[t], h[t+2k] - h[t+k])``. With a mask, a triple has weight
    1 only if all three positions are valid and (document ids) lie in one document, else 0.

    Returns:
        ``reduce=True``: the weighted mean, a fp32 scalar (0 when no triple is valid).
        ``reduce=False``: ``(values, weights)``, both fp32 ``(B, max(T - 2k, 0))``; value ``t`` is
        the bend at the middle token ``t + k``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, D), got shape {tuple(hidden.shape)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    batch, length, _ = hidden.shape
    n = max(length - 2 * stride, 0)
    h = hidden.float()
    a, b, c = h[:, :n], h[:, stride : stride + n], h[:, 2 * stride : 2 * stride + n]  # (B, n, D)
    values = _one_minus_cos(b - a, c - b)  # (B, n)
    if mask is None:
        weights = torch.ones_like(values)
    else:
        _check_mask(mask, batch, length)
        valid, runs = _valid_and_runs(mask)
        # Runs are contiguous, so equal run ids at both ends put the middle in the same run too.
        same = runs[:, :n] == runs[:, 2 * stride : 2 * stride + n]
        ok = valid[:, :n] & valid[:, stride : stride + n] & valid[:, 2 * stride : 2 * stride + n] & same
        weights = ok.float()
    if not reduce:
        return values, weights
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def depth_curvature_per_token(states: Sequence[Tensor]) -> Tensor:
    """Per-token curvature along depth, ``(L - 2, B, T)`` fp32, for ``L >= 3`` states ``(B, T, D)``.

    ``states`` is the residual stream along depth, typically ``[embedding, out of block 0, out of
    block 1, ...]``, so ``states[l]`` is the output of block ``l - 1`` = the input of block ``l``.
    Entry ``j`` (``j = 0 .. L-3``) is the bend at the interior state ``l = j + 1``::

        1 - cos(states[l] - states[l-1], states[l+1] - states[l])

    i.e. the angle between the update written by block ``j`` and the one written by block
    ``j + 1``: the hand-over at the boundary between block ``j`` and block ``j + 1``.
    No mask is applied (each token is its own depth trajectory); weigh padding in the caller.
    Memory stays at two fp32 deltas regardless of ``L``.
    """
    states = list(states)
    if len(states) < 3:
        raise ValueError(f"depth curvature needs at least 3 states, got {len(states)}")
    shape = states[0].shape
    if len(shape) != 3 or any(x.shape != shape for x in states):
        raise ValueError(f"all states must share one (B, T, D) shape, got {[tuple(x.shape) for x in states]}")
    prev = states[1].float() - states[0].float()  # (B, T, D)
    out = []
    for l in range(1, len(states) - 1):
        cur = states[l + 1].float() - states[l].float()
        out.append(_one_minus_cos(prev, cur))  # (B, T)
        prev = cur
    return torch.stack(out)


def depth_curvature(states: Sequence[Tensor], *, mask: Tensor | None = None) -> Tensor:
    """Mean depth curvature per interior state, ``(L - 2,)`` fp32 (indexing as in
    :func:`depth_curvature_per_token`: entry ``j`` is the bend between block ``j`` and block
    ``j + 1`` when ``states[0]`` is the embedding). With a mask, only valid tokens are averaged
    (document ids matter only through padding: negative ids are excluded)."""
    per_token = depth_curvature_per_token(states)  # (L-2, B, T)
    if mask is None:
        return per_token.mean(dim=(1, 2))
    _check_mask(mask, per_token.shape[1], per_token.shape[2])
    valid, _ = _valid_and_runs(mask)
    w = valid.float()
    return (per_token * w).sum(dim=(1, 2)) / w.sum().clamp_min(1.0)
