"""The span form of the STP loss: one patch against its complement (the released code's ``random_span``).

Huang, LeCun, Balestriero (arXiv 2602.22617) state the geodesic hypothesis as "the hidden-state
trajectory of a sequence is locally straight". Their released training code (``--linear=random_span``)
does not penalise the bend of random triples (that is the ``triple`` form, :mod:`amer.stp.triple`); per example it
carves one patch ``[a, b)`` out of the *content* and asks the patch's chord to point the way the rest of
the trajectory does::

    L = 1 - cos(h_b - h_a, (h_a - h_start) + (h_end - h_b))          in [0, 2]

0 when the trajectory is a straight line (any patch of a line is parallel to its complement), ~1 for a
random walk (the patch is independent of the rest), ~1.7 for i.i.d. states.

Definitions (everything per document; "document" as in :mod:`amer.stp.geometry`: a maximal run of equal
non-negative ids, or the whole valid row for a bool mask):

- **Endpoints.** ``content`` (``(B, T)`` bool) marks the positions whose hidden state may be an endpoint;
  ``None`` allows every valid position. A maximal run of consecutive allowed positions inside one
  document is a *segment*. The trajectory of a document is its segments joined end to start: the jump from
  the last state of one segment to the first state of the next (the chat template between the user turn
  and the answer, say) is cut out, as the released code cuts the template tokens between the user and
  assistant messages. Concretely, position ``t`` contributes the step ``h[t] - h[t-1]`` when both ``t``
  and ``t - 1`` are allowed and in one document; the document has ``N`` such steps and ``N + 1``
  points ``P_0 .. P_N`` (``P_k`` = the sum of its first ``k`` steps).
- **h_start, h_end**: ``P_0`` and ``P_N``, the states at the first and the last allowed position of the
  document (with a cut, the differences are taken along the joined trajectory).
- **The patch** ``[a, b)`` with ``0 <= a < b <= N`` and ``b - a < N`` (never the whole trajectory, so
  the complement is not empty), drawn as the released code's default draws it: ``a`` uniform in
  ``[0, N)``, then ``b`` uniform in ``[a + 1, N]``, redrawn while ``(a, b) = (0, N)``; i.e. for ``a = 0``
  ``b`` is uniform in ``[1, N - 1]``. The loss is ``1 - cos(P_b - P_a, (P_a - P_0) + (P_N - P_b))``.
- With the chat examples of the NL-RX experiment the allowed positions are the state before the first
  content token and every content token of the user turn, and likewise of the assistant turn: ``h_start``
  is the state just before the description, ``h_end`` the state at the regex's last token, and a patch
  ``[a, b)`` of content tokens is measured from the state before its first token to the state at its last,
  which is how the released code indexes ``hidden_states[start - 1]``.

Documents with ``N < 2`` (no proper patch exists) and ``T < 3`` contribute nothing. With several
documents in a row, each of the ``n_spans`` patches of the row first picks a document with probability
proportional to its ``N`` (a uniform step of the row, as the triple form picks its middle position).
Static shapes and no host sync, as in :mod:`amer.stp.triple`: the trajectory is one masked ``cumsum`` over time,
the draws are ``searchsorted`` on integer counts, the loss is one gather of four points per patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from amer.stp.geometry import check_mask, count_below, draw_device, one_minus_cos, suffix_min, valid_and_runs

__all__ = ["sample_patches", "patch_losses", "span_stp_per_layer"]


def _steps_and_documents(mask: Tensor | None, content: Tensor | None, batch: int, length: int,
                         device: torch.device) -> tuple[Tensor, Tensor]:
    """``(step (B, T) bool, runs (B, T) int64)``: where a trajectory step ends, and the document of each position."""
    if mask is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        runs = torch.zeros(batch, length, dtype=torch.long, device=device)
    else:
        valid, runs = valid_and_runs(mask)
    allowed = valid if content is None else valid & content.to(torch.bool)
    step = torch.zeros_like(allowed)
    step[:, 1:] = allowed[:, 1:] & allowed[:, :-1] & (runs[:, 1:] == runs[:, :-1])
    return step, runs


def sample_patches(batch: int, length: int, n_spans: int, *, mask: Tensor | None = None,
                   content: Tensor | None = None, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``n_spans`` patches per row: ``(idx (B, S, 4) int64, weight (B, S) fp32)``.

    ``idx[..., k]`` are the positions whose *cumulative trajectory* (see :func:`patch_losses`) gives the
    points ``P_0, P_a, P_b, P_N`` of the patch; weight 0 marks a row without a document of ``N >= 2``
    steps (its indices are in range and meaningless). Distribution: see the module docstring.
    """
    if n_spans < 1:
        raise ValueError(f"n_spans must be >= 1, got {n_spans}")
    for m in (mask, content):
        if m is not None:
            check_mask(m, batch, length)
            device = m.device
    if content is not None and content.dtype != torch.bool:
        raise TypeError(f"content must be a bool mask of allowed endpoint positions, got {content.dtype}")
    if length < 3:
        return (torch.zeros(batch, n_spans, 4, dtype=torch.long, device=device),
                torch.zeros(batch, n_spans, device=device))
    step, runs = _steps_and_documents(mask, content, batch, length, torch.device(device or "cpu"))
    pos = torch.arange(length, device=step.device)
    is_start = torch.ones_like(step)
    is_start[:, 1:] = runs[:, 1:] != runs[:, :-1]
    is_end = torch.ones_like(step)
    is_end[:, :-1] = runs[:, 1:] != runs[:, :-1]
    start = torch.where(is_start, pos, 0).cummax(dim=1).values  # first position of each position's document
    end = suffix_min(torch.where(is_end, pos, length - 1))  # its last position
    step_l = step.long()
    cnt = step_l.cumsum(1)  # steps in [0, t]
    before_doc = cnt.gather(1, start) - step_l.gather(1, start)  # steps of the row before the document
    n_doc = cnt.gather(1, end) - before_doc  # N of the position's document
    anchor = step & (n_doc >= 2)  # a step of a document that has a proper patch

    u = torch.rand(batch, n_spans, 3, generator=generator, device=draw_device(generator, step.device)).to(step.device)
    anc_cnt = anchor.long().cumsum(1)
    n_anc = anc_cnt[:, -1:]
    k = (u[..., 0] * n_anc).long().clamp(max=n_anc - 1).clamp_min(0)
    r = count_below(anc_cnt, k + 1).clamp(max=length - 1)  # (B, S) a step of the chosen document
    ok = anchor.gather(1, r)
    n = n_doc.gather(1, r).clamp_min(2)  # (B, S) N, >= 2 where ok
    base = before_doc.gather(1, r)  # rank of the document's first step among the row's steps
    a = (u[..., 1] * n).long().clamp(max=n - 1)  # uniform in [0, N)
    width = torch.where(a == 0, n - 1, n - a)  # b uniform in [a + 1, N], (0, N) excluded
    b = a + 1 + (u[..., 2] * width).long().clamp(max=width - 1)

    def after(j: Tensor) -> Tensor:
        """Position of the row's ``j``-th step (0-based): P_k is the trajectory at the document's (k-1)-th step."""
        return count_below(cnt, (j + 1).clamp(min=1)).clamp(max=length - 1)

    first = after(base)  # the document's first step; P_0 is the state one position before it
    p0 = (first - 1).clamp_min(0)
    pa = torch.where(a == 0, p0, after(base + a - 1))
    pb = after(base + b - 1)
    pn = after(base + n - 1)
    return torch.stack([p0, pa, pb, pn], dim=-1), ok.float()


def patch_losses(hidden: Tensor, idx: Tensor, step: Tensor) -> Tensor:
    """``1 - cos(P_b - P_a, (P_a - P_0) + (P_N - P_b))`` of every patch: ``(B, S)`` fp32, unweighted.

    ``step`` is the ``(B, T)`` bool of trajectory steps; the trajectory ``C[t] = sum of h[t'] - h[t'-1]``
    over the steps ``t' <= t`` equals ``h[t] - h[start]`` inside one segment and skips the cut jumps.
    One fp32 cumsum over time, one gather of the four points per patch.
    """
    h = hidden.float()  # upcast before differencing (bf16 safety)
    delta = torch.zeros_like(h)
    delta[:, 1:] = (h[:, 1:] - h[:, :-1]) * step[:, 1:, None].to(h.dtype)
    traj = delta.cumsum(dim=1)  # (B, T, D)
    batch, n_spans, _ = idx.shape
    dim = h.shape[-1]
    flat = idx.reshape(batch, n_spans * 4)
    pts = traj.gather(1, flat.unsqueeze(-1).expand(batch, flat.shape[1], dim)).view(batch, n_spans, 4, dim)
    p0, pa, pb, pn = pts.unbind(2)
    return one_minus_cos(pb - pa, (pa - p0) + (pn - pb))


def span_stp_per_layer(hidden: Sequence[Tensor], n_spans: int = 1, *, mask: Tensor | None = None,
                       content: Tensor | None = None, generator: torch.Generator | None = None,
                       rows: slice | None = None) -> Tensor:
    """The span-form STP loss of each layer, ``(n_layers,)`` fp32, every layer read at the same patches.

    The counterpart of :func:`amer.stp.triple.stp_per_layer` (same ``rows`` contract: patches are drawn for the
    whole batch that ``mask`` / ``content`` describe, the loss normalised so equal shares average to it).
    A batch without any proper patch (or ``T < 3``) gives zeros still attached to the graph.
    """
    layers = list(hidden)
    if not layers:
        raise ValueError("span_stp_per_layer needs at least one hidden-state tensor")
    batch, length = layers[0].shape[:2]
    if length < 3:
        return torch.stack([h.float().sum() * 0.0 for h in layers])
    if rows is not None and mask is None and content is None:
        raise ValueError("span_stp_per_layer: rows= needs the whole batch's mask (document ids or validity)")
    ref = mask if mask is not None else content
    full = batch if rows is None else ref.shape[0]
    idx, weight = sample_patches(full, length, n_spans, mask=mask, content=content, generator=generator,
                                 device=layers[0].device)
    step, _ = _steps_and_documents(mask, content, full, length, layers[0].device)
    denom = weight.sum().clamp_min(1.0)
    if full != batch:
        idx, weight, step = idx[rows], weight[rows], step[rows]
        denom = denom * (batch / full)
    return torch.stack([(patch_losses(h, idx, step) * weight).sum() / denom for h in layers])
