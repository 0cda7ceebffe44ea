"""Two curvature results side by side: the difference of every statistic with a bootstrap interval."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from amer.analysis.curvature import FORMAT, json_float
from amer.analysis.entropy import pearson
from amer.analysis.stats import CI_LEVEL, percentile_ci, ratio, resample_weights
from amer.errors import AnalysisError

__all__ = ["compare"]


def _is_stat(node: Any) -> bool:
    return isinstance(node, dict) and "key" in node and ("mean" in node or "r" in node)


def _value(stat: dict[str, Any]) -> float | None:
    return stat["mean"] if "mean" in stat else stat["r"]


def _stat_nodes(node: Any) -> Iterable[dict[str, Any]]:
    if _is_stat(node):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _stat_nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _stat_nodes(v)


def _map_stats(node: Any, fn: Callable[[dict[str, Any]], Any]) -> Any:
    """A copy of a result's structure (layers, boundaries, ...) with every statistic replaced by ``fn(stat)``."""
    if _is_stat(node):
        return fn(node)
    if isinstance(node, dict):
        return {k: _map_stats(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_stats(v, fn) for v in node]
    return node


def compare(result_a: Mapping[str, Any], result_b: Mapping[str, Any]) -> dict[str, Any]:
    """Differences ``a - b`` of every statistic of two :func:`amer.analysis.curvature.evaluate` results,
    each with a 95% CI.

    Every statistic is compared, the correlations with entropy included (their difference of r, with the
    same resampling applied to each run's per-sequence moments). When both ran on the same data (same
    sequences: equal data fingerprints and counts) the bootstrap is *paired*: one resampling of sequence
    indices is applied to both runs, so the interval reflects how the two models differ on the same
    text, not how the text varies (this is much tighter than comparing two separate intervals).
    Otherwise the runs are resampled independently. ``excludes_zero`` is True when the interval lies
    strictly on one side of 0. The bootstrap uses ``result_a``'s seed and replicate count. A result compared with itself
    gives 0 with the interval [0, 0].

    Raises :class:`~amer.errors.AnalysisError` when the results come from different patterns or strides.
    """
    for r, name in ((result_a, "result_a"), (result_b, "result_b")):
        if not isinstance(r, Mapping) or "per_sequence" not in r:
            raise AnalysisError(f"{name} is not an amer.analysis.curvature.evaluate() result (format {FORMAT})")
        if r.get("format") != FORMAT:
            raise AnalysisError(f"{name} has format {r.get('format')!r}, this amer reads {FORMAT!r}: measure it "
                                f"again with amer curvature")
    if result_a["pattern"] != result_b["pattern"]:
        raise AnalysisError(
            f"cannot compare different patterns: {result_a['pattern']!r} vs {result_b['pattern']!r}; "
            f"compare two models of one pattern (e.g. trained with STP on vs off)")
    if list(result_a["strides"]) != list(result_b["strides"]):
        raise AnalysisError(f"cannot compare results measured at different strides: {result_a['strides']} vs "
                            f"{result_b['strides']}; evaluate both with the same strides")
    pa, pb = result_a["per_sequence"], result_b["per_sequence"]
    if pa["keys"] != pb["keys"] or pa.get("corr_keys") != pb.get("corr_keys"):
        raise AnalysisError("cannot compare: the two results measure different statistics (evaluate both with the "
                            "same options: baselines, anisotropy, entropy)")
    keys = pa["keys"]
    Sa, Ca = (np.asarray(pa[k], dtype=np.float64) for k in ("sum", "count"))
    Sb, Cb = (np.asarray(pb[k], dtype=np.float64) for k in ("sum", "count"))
    paired = result_a["data_fingerprint"] == result_b["data_fingerprint"] and Sa.shape == Sb.shape
    R, seed = int(result_a["n_bootstrap"]), int(result_a["seed"])
    Wa = resample_weights(Sa.shape[0], R, seed)
    Wb = Wa if paired else resample_weights(Sb.shape[0], R, seed + 1)
    ci = percentile_ci(ratio(Wa @ Sa, Wa @ Ca) - ratio(Wb @ Sb, Wb @ Cb))
    point = ratio(Sa.sum(0), Ca.sum(0)) - ratio(Sb.sum(0), Cb.sum(0))
    col = {k: i for i, k in enumerate(keys)}
    if pa.get("corr_keys"):  # correlations: the same resampling applied to each run's moments
        Ma, Mb = np.asarray(pa["moments"], dtype=np.float64), np.asarray(pb["moments"], dtype=np.float64)
        rdiff = pearson(np.einsum("rn,nkj->rkj", Wa, Ma)) - pearson(np.einsum("rn,nkj->rkj", Wb, Mb))
        ci = np.concatenate([ci, percentile_ci(rdiff)], axis=1)
        point = np.concatenate([point, pearson(Ma.sum(0)) - pearson(Mb.sum(0))])
        col.update({k: len(keys) + i for i, k in enumerate(pa["corr_keys"])})
    b_values = {s["key"]: _value(s) for s in _stat_nodes(
        [result_b["layers"], result_b["boundaries"], result_b["boundary_types"], result_b["families"]])}

    def diff_of(stat_a: dict[str, Any]) -> dict[str, Any]:
        i = col[stat_a["key"]]
        lo, hi = json_float(ci[0, i]), json_float(ci[1, i])
        return {"key": stat_a["key"], "a": _value(stat_a), "b": b_values.get(stat_a["key"]),
                "diff": json_float(point[i]), "ci": [lo, hi],
                "excludes_zero": bool(lo is not None and hi is not None and (lo > 0 or hi < 0))}

    return {
        "pattern": result_a["pattern"],
        "a": result_a.get("label", "a"),
        "b": result_b.get("label", "b"),
        "difference": "a - b",
        "paired": paired,
        "method": ("paired bootstrap: both runs on the same sequences, resampled together" if paired else
                   "independent bootstrap: the runs saw different data, each resampled separately"),
        "n_bootstrap": R,
        "seed": seed,
        "ci_level": CI_LEVEL,
        "layers": _map_stats(result_a["layers"], diff_of),
        "boundaries": _map_stats(result_a["boundaries"], diff_of),
        "boundary_types": _map_stats(result_a["boundary_types"], diff_of),
        "families": _map_stats(result_a["families"], diff_of),
    }
