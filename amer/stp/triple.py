"""The triple form of the Semantic Tube Prediction (STP) loss (``--stp.form triple``).

STP (the "geodesic hypothesis" of Semantic Tube Prediction) assumes that hidden-state
trajectories of a language model are locally straight. The auxiliary loss here is the narrow,
predictor-free form of that idea: sample ordered positions ``s < r < t`` of a hidden-state
sequence and penalise the bend between the two consecutive chords::

    L = 1 - cos(h[r] - h[s], h[t] - h[r])          in [0, 2]

0 is a straight trajectory, 1 is a right angle (or a random walk: independent increments),
1.5 is i.i.d. noise (consecutive chords share the middle point, so cos ~ -1/2), 2 is a reversal.
The STP paper's released code trains the patch-vs-complement ``span`` form, in :mod:`amer.stp.span`
(same masks, same contract); :class:`amer.stp.policy.STPPolicy` picks one.

This module is pure math with no policy: it knows nothing about training steps, configs, gates,
weights or which layers are selected. Those live in :class:`amer.config.STPConfig` and
:mod:`amer.stp.policy`. Everything here is static-shape and host-sync free (no ``.item()``, no boolean
indexing, no branching on tensor values), so the loss compiles to one graph whose size does not
depend on ``n_spans`` (a Python loop over spans would unroll into a graph that
grows with the span count). Degenerate cases (padding, short documents, ``T < 3``) are handled
by zero weights, never by dynamic shapes.

Public API
----------
- :func:`compute_stp_loss`: the stochastic auxiliary loss (differentiable, scalar fp32).
- :func:`sample_spans`: the triple sampler it uses, exposed for inspection and tests.
- :func:`span_bends`: the bend of each sampled triple (what the loss averages).

Masks (``mask`` argument): ``None``, a bool validity mask or the document ids (``doc_ids``), see
:mod:`amer.stp.geometry`. The deterministic curvature estimators over the same bends live in
:mod:`amer.analysis.trajectory`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from amer.stp.geometry import check_mask, count_below, draw_device, one_minus_cos, suffix_min, valid_and_runs

__all__ = ["compute_stp_loss", "stp_per_layer", "sample_spans", "span_bends"]


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
        check_mask(mask, batch, length)
        device = mask.device
    if length < 3:
        idx = torch.zeros(batch, n_spans, 3, dtype=torch.long, device=device)
        return idx, torch.zeros(batch, n_spans, device=device)

    if mask is None:
        draw = torch.randint(0, length - 2, (batch, n_spans, 3), generator=generator,
                             device=draw_device(generator, device)).to(device)
        offsets = torch.arange(3, device=device)
        idx = draw.sort(dim=-1).values + offsets  # (B, S, 3) strictly increasing
        return idx, torch.ones(batch, n_spans, device=device)
    return _sample_spans_masked(mask, n_spans, generator)


def _sample_spans_masked(mask: Tensor, n_spans: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    batch, length = mask.shape
    device = mask.device
    pos = torch.arange(length, device=device)
    valid, runs = valid_and_runs(mask)
    valid_l = valid.long()
    # A position's document spans [start, end]; starts/ends are where the run id changes.
    is_start = torch.cat([torch.ones_like(runs[:, :1], dtype=torch.bool), runs[:, 1:] != runs[:, :-1]], 1)
    is_end = torch.cat([runs[:, 1:] != runs[:, :-1], torch.ones_like(runs[:, :1], dtype=torch.bool)], 1)
    start = torch.where(is_start, pos, 0).cummax(dim=1).values  # (B, T)
    end = suffix_min(torch.where(is_end, pos, length - 1))  # (B, T)
    # Valid-token ranks: cnt[i] = number of valid positions in [0, i] of the row.
    cnt = valid_l.cumsum(1)  # (B, T)
    before_doc = cnt.gather(1, start) - valid_l.gather(1, start)  # valid positions before the doc
    n_before = cnt - valid_l - before_doc  # valid positions of the doc strictly before i
    n_after = cnt.gather(1, end) - cnt  # valid positions of the doc strictly after i
    eligible = valid & (n_before > 0) & (n_after > 0)  # (B, T)

    u = torch.rand(batch, n_spans, 3, generator=generator, device=draw_device(generator, device)).to(device)
    # r: the k-th eligible position, k uniform in [0, n_eligible); searchsorted on the integer
    # cumulative count finds it without any float CDF rounding.
    elig_cnt = eligible.long().cumsum(1)  # (B, T)
    n_elig = elig_cnt[:, -1:]  # (B, 1)
    k = (u[..., 0] * n_elig).long().clamp(max=n_elig - 1).clamp_min(0)  # (B, S)
    r = count_below(elig_cnt, k + 1).clamp(max=length - 1)  # (B, S)
    ok = eligible.gather(1, r)
    nb = n_before.gather(1, r)
    na = n_after.gather(1, r)
    rank_r = cnt.gather(1, r) - 1  # 0-based valid rank of r
    # s and t: uniform valid ranks inside r's document on either side of r, mapped back to
    # positions by searching the valid-rank cumulative count.
    rank_s = rank_r - nb + (u[..., 1] * nb).long().clamp(max=nb - 1)
    rank_t = rank_r + 1 + (u[..., 2] * na).long().clamp(max=na - 1)
    s = count_below(cnt, rank_s.clamp_min(0) + 1).clamp(max=length - 1)
    t = count_below(cnt, rank_t.clamp_min(0) + 1).clamp(max=length - 1)
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
    return one_minus_cos(h_r - h_s, h_t - h_r)


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
        check_mask(mask, batch, length)

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
