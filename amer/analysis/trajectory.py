"""Deterministic curvature of hidden-state trajectories: along the sequence (every consecutive token triple,
the bend STP's loss samples) and along depth (the hand-over between consecutive blocks' updates).

Both are ``1 - cos`` in [0, 2] through the one bend function of :mod:`amer.stp.geometry`, so a curvature
figure and the STP loss measure the same thing. Pure tensor math: no model, no device handling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from amer.analysis.decomposition import bend_units
from amer.stp.geometry import check_mask, one_minus_cos, valid_and_runs

__all__ = ["token_curvature", "token_chords", "triple_weights", "chord_weights", "depth_curvature",
           "depth_curvature_per_token", "depth_bends"]


def triple_weights(mask: Tensor | None, batch: int, length: int, stride: int,
                   device: torch.device | None = None) -> Tensor:
    """``(B, max(T - 2k, 0))`` fp32: 1 where the triple ``(t, t+k, t+2k)`` has all three positions valid and
    (document ids) inside one document, else 0; all ones without a mask."""
    n = max(length - 2 * stride, 0)
    if mask is None:
        return torch.ones(batch, n, device=device)
    check_mask(mask, batch, length)
    valid, runs = valid_and_runs(mask)
    # Runs are contiguous, so equal run ids at both ends put the middle in the same run too.
    same = runs[:, :n] == runs[:, 2 * stride : 2 * stride + n]
    ok = valid[:, :n] & valid[:, stride : stride + n] & valid[:, 2 * stride : 2 * stride + n] & same
    return ok.float()


def chord_weights(mask: Tensor | None, batch: int, length: int, stride: int,
                  device: torch.device | None = None) -> Tensor:
    """``(B, max(T - k, 0))`` fp32: 1 where the chord ``h[t+k] - h[t]`` joins two valid positions of one
    document, else 0; all ones without a mask."""
    n = max(length - stride, 0)
    if mask is None:
        return torch.ones(batch, n, device=device)
    check_mask(mask, batch, length)
    valid, runs = valid_and_runs(mask)
    ok = valid[:, :n] & valid[:, stride : stride + n] & (runs[:, :n] == runs[:, stride : stride + n])
    return ok.float()


def token_chords(hidden: Tensor, *, stride: int = 1, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The consecutive chords of every token triple ``(t, t+k, t+2k)``: ``(d1, d2, weights)`` with
    ``d1 = h[t+k] - h[t]`` and ``d2 = h[t+2k] - h[t+k]`` fp32 ``(B, n, D)`` and the weights of
    :func:`triple_weights` ``(B, n)``, ``n = max(T - 2k, 0)``. Entry ``t`` is the bend at the middle token
    ``t + k``."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, D), got shape {tuple(hidden.shape)}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    batch, length, _ = hidden.shape
    n = max(length - 2 * stride, 0)
    h = hidden.float()
    a, b, c = h[:, :n], h[:, stride : stride + n], h[:, 2 * stride : 2 * stride + n]  # (B, n, D)
    return b - a, c - b, triple_weights(mask, batch, length, stride, hidden.device)


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
    d1, d2, weights = token_chords(hidden, stride=stride, mask=mask)
    values = one_minus_cos(d1, d2)  # (B, n)
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
    for i in range(1, len(states) - 1):
        cur = states[i + 1].float() - states[i].float()
        out.append(one_minus_cos(prev, cur))  # (B, T)
        prev = cur
    return torch.stack(out)


def depth_bends(states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token depth bends in both units: ``(1 - cos, angle in degrees)``, each ``(L - 2, B, T)`` fp32,
    indexed as in :func:`depth_curvature_per_token`."""
    states = list(states)
    if len(states) < 3:
        raise ValueError(f"depth curvature needs at least 3 states, got {len(states)}")
    prev = states[1].float() - states[0].float()
    omc, ang = [], []
    for i in range(1, len(states) - 1):
        cur = states[i + 1].float() - states[i].float()
        o, a = bend_units(prev, cur)
        omc.append(o)
        ang.append(a)
        prev = cur
    return torch.stack(omc), torch.stack(ang)


def depth_curvature(states: Sequence[Tensor], *, mask: Tensor | None = None) -> Tensor:
    """Mean depth curvature per interior state, ``(L - 2,)`` fp32 (indexing as in
    :func:`depth_curvature_per_token`: entry ``j`` is the bend between block ``j`` and block
    ``j + 1`` when ``states[0]`` is the embedding). With a mask, only valid tokens are averaged
    (document ids matter only through padding: negative ids are excluded)."""
    per_token = depth_curvature_per_token(states)  # (L-2, B, T)
    if mask is None:
        return per_token.mean(dim=(1, 2))
    check_mask(mask, per_token.shape[1], per_token.shape[2])
    valid, _ = valid_and_runs(mask)
    w = valid.float()
    return (per_token * w).sum(dim=(1, 2)) / w.sum().clamp_min(1.0)
