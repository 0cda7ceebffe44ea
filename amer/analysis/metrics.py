"""Per-family figures for the training log: STP per tap and family, token curvature per family, depth
curvature per boundary type. Cheap enough to run every log interval on the step's own taps."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import Tensor

from amer.analysis.trajectory import depth_curvature_per_token, token_curvature
from amer.tap import Tap, tap_label

__all__ = ["depth_states", "training_metrics"]


def depth_states(taps: list[Tap]) -> tuple[list[Tensor], list[str]]:
    """States along depth ``[0, embed, block outputs..., final]`` and the label of each boundary.

    ``labels[j]`` names the bend entry ``j`` of :func:`amer.analysis.trajectory.depth_curvature_per_token` on
    these states: ``embed->A``, then ``A->E`` ..., then ``R->final``.
    """
    states = [torch.zeros_like(taps[0].hidden)] + [t.hidden for t in taps]
    labels = [f"{a.label}->{b.label}" for a, b in zip(taps[:-1], taps[1:])]
    return states, labels


@torch.no_grad()
def training_metrics(taps, per_tap_stp: Mapping[str, Tensor] | None = None, *,
                     doc_ids: Tensor | None = None) -> dict[str, float]:
    """Cheap per-family figures for the training log (flat dict of floats with stable names).

    ``stp/<tap>`` and ``stp/<F>``: STP loss per selected tap and its family mean;
    ``curv/tok/<F>``: token curvature (stride 1) averaged over every tap of family F (and
    ``embed``/``final``); ``curv/depth/<X->Y>``: depth curvature averaged over the boundaries of
    that type. ``taps`` must be a full recording (every block); ``doc_ids`` (or a bool validity mask) keeps
    token triples inside one document and padding out.
    """
    out: dict[str, float] = {}
    fam_stp: dict[str, list[float]] = defaultdict(list)
    for name, v in (per_tap_stp or {}).items():
        out[f"stp/{name}"] = float(v)
        fam_stp[tap_label(name)].append(float(v))
    for fam, vs in fam_stp.items():
        out[f"stp/{fam}"] = sum(vs) / len(vs)

    taps = [t._replace(hidden=t.hidden.detach()) for t in taps]
    tok: dict[str, list[float]] = defaultdict(list)
    for t in taps:
        tok[t.label].append(float(token_curvature(t.hidden, mask=doc_ids)))
    for fam, vs in tok.items():
        out[f"curv/tok/{fam}"] = sum(vs) / len(vs)

    if len(taps) >= 2:
        states, labels = depth_states(list(taps))
        per_token = depth_curvature_per_token(states)  # (n_boundaries, B, T)
        if doc_ids is not None and doc_ids.dtype != torch.bool:
            valid = (doc_ids >= 0).float()
        elif doc_ids is not None:
            valid = doc_ids.float()
        else:
            valid = torch.ones_like(per_token[0])
        means = (per_token * valid).sum(dim=(1, 2)) / valid.sum().clamp_min(1.0)
        by_type: dict[str, list[float]] = defaultdict(list)
        for label, v in zip(labels, means.tolist()):
            by_type[label].append(v)
        for label, vs in by_type.items():
            out[f"curv/depth/{label}"] = sum(vs) / len(vs)
    return out
