"""The sections of a curvature result (``layers``, ``boundaries``, ``boundary_types``, ``families``) built
from its flat statistics, and the definitions every result carries. The schema is documented in
``docs/curvature.md``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from amer.analysis.layout import Layout
from amer.families import get_family

__all__ = ["DEFINITIONS", "sections"]

DEFINITIONS = {
    "mean": "pooled over every valid triple (token curvature, STP), token (depth curvature) or pair (pairwise "
            "cosines) of every sequence",
    "std": "pooled standard deviation over the same items (spread of single values, not an error bar)",
    "token": "1 - cos(d1, d2), d1 = h[t+k] - h[t], d2 = h[t+2k] - h[t+k], over consecutive triples inside one "
             "document, stride k; token_deg: the angle between d1 and d2 in degrees",
    "depth": "1 - cos(update of one block, update of the next) per token; embed->X uses the embedding itself as "
             "the first update, X->final the final norm's change; depth_deg: the same angle in degrees",
    "decomposition": "a = d2 - d1, u = d1/|d1|, a_par = (a.u)u, a_perp = a - a_par; normal = |a_perp|/|d2| "
                     "(= sin of the bend), tangential = |a_par|/|d2|, slowing = fraction of triples with a.u < 0; "
                     "over triples whose two chords both have a length; 1 - cos = 1 - sgn(d1.d2) sqrt(1 - normal^2)",
    "baselines": "shuffled: the model on the same text with each document's tokens shuffled; noise: i.i.d. "
                 "Gaussian points with the tap's mean and covariance; walk: a Gaussian random walk with the "
                 "tap's covariance as increment covariance; each in both units (*_deg in degrees)",
    "anisotropy": "cos_states / cos_chords: mean cosine over pairs of states / stride-k chords within one "
                  "sequence; centred: token curvature of chords minus the tap's mean chord; whitened: of the "
                  "centred chords times Sigma^-1/2 (Sigma: covariance of the tap's states; whitening_rank "
                  "directions kept)",
    "entropy": "Pearson r over positions p between the contextual curvature at p (mean bend of the window of "
               "bends ending at p..p-W+1, each triple ending at its last position) and the entropy (nats) of "
               "the next-token distribution at p; one_minus_cos and angle units",
}

_TAP_STRIDED = {"decomposition": ("normal", "tangential", "slowing"),
                "baselines": ("shuf", "shuf_deg", "noise", "noise_deg", "walk", "walk_deg")}
_BASELINE_NAMES = {"shuf": "shuffled", "shuf_deg": "shuffled_deg", "noise": "noise", "noise_deg": "noise_deg",
                   "walk": "walk", "walk_deg": "walk_deg"}


def _tap_part(stats: Mapping[str, Any], lay: Layout, key: Callable[..., str], rank: int | None) -> dict[str, Any]:
    """The per-tap (or per-family) statistics beside ``token``/``stp``: the angle, decomposition, baselines,
    anisotropy and entropy, each present only when measured. ``key(measure, stride=None)`` names a column."""
    ks = [str(k) for k in lay.strides]

    def strided(m: str) -> dict[str, Any]:
        return {k: stats[key(m, k)] for k in ks}

    out: dict[str, Any] = {"token_deg": strided("tok_deg"),
                           "decomposition": {k: {m: stats[key(m, k)] for m in _TAP_STRIDED["decomposition"]}
                                             for k in ks}}
    if lay.opts.baselines:
        out["baselines"] = {k: {_BASELINE_NAMES[m]: stats[key(m, k)] for m in _TAP_STRIDED["baselines"]} for k in ks}
    if lay.opts.anisotropy:
        out["anisotropy"] = {"cos_states": stats[key("cos_states")], "cos_chords": strided("cos_chords"),
                             "centred": strided("cent"), "centred_deg": strided("cent_deg"),
                             "whitened": strided("white"), "whitened_deg": strided("white_deg")}
        if rank is not None:
            out["anisotropy"]["whitening_rank"] = rank
    if lay.opts.entropy:
        out["entropy"] = {k: {"one_minus_cos": stats[key("ent", k)], "angle": stats[key("ent_deg", k)]} for k in ks}
    return out


def sections(lay: Layout, stats: Mapping[str, dict[str, Any]], ranks: Mapping[str, int]) -> dict[str, Any]:
    """The ``layers``, ``boundaries``, ``boundary_types`` and ``families`` sections of a result."""
    layers = []
    for n, kind, lab, layer, index in zip(lay.names, lay.kinds, lay.labels, lay.layers, lay.indices):
        row: dict[str, Any] = {"tap": n, "kind": kind, "family": lab if kind == "block" else None, "layer": layer,
                               "index": index, "token": {str(k): stats[f"tok/{n}/s{k}"] for k in lay.strides},
                               "stp": stats[f"stp/{n}"]}
        row.update(_tap_part(stats, lay, lambda m, k=None, n=n: f"{m}/{n}" + (f"/s{k}" if k else ""), ranks.get(n)))
        layers.append(row)
    boundaries = [{"position": j, "name": b, "type": ty, "from": lay.names[j], "to": lay.names[j + 1],
                   "depth": stats[f"depth/{b}"], "depth_deg": stats[f"depth_deg/{b}"]}
                  for j, (b, ty) in enumerate(zip(lay.boundary_names, lay.boundary_types))]
    types: dict[str, dict[str, Any]] = {}
    for b in boundaries:
        types.setdefault(b["type"], {"n_boundaries": 0, "positions": [], "depth": stats[f"depth_type/{b['type']}"],
                                     "depth_deg": stats[f"depth_type_deg/{b['type']}"]})
        types[b["type"]]["n_boundaries"] += 1
        types[b["type"]]["positions"].append(b["position"])
    families = {}
    for fam in lay.families:
        pre = f"fam/{fam}/"
        families[fam] = {
            "name": get_family(fam).name,
            "blocks": [n for n, lab, kind in zip(lay.names, lay.labels, lay.kinds) if kind == "block" and lab == fam],
            "token": {str(k): stats[f"{pre}tok/s{k}"] for k in lay.strides},
            "stp": stats[f"{pre}stp"],
            "depth_in": stats[f"{pre}depth_in"],
            "depth_out": stats[f"{pre}depth_out"],
            "depth_in_deg": stats[f"{pre}depth_in_deg"],
            "depth_out_deg": stats[f"{pre}depth_out_deg"],
            **_tap_part(stats, lay, lambda m, k=None, pre=pre: f"{pre}{m}" + (f"/s{k}" if k else ""),
                         None),
        }
    return {"layers": layers, "boundaries": boundaries, "boundary_types": types, "families": families}
