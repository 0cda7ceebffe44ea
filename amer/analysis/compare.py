"""Two curvature results side by side: the difference of every statistic with a bootstrap interval."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from amer.analysis.curvature import FORMAT, json_float
from amer.analysis.stats import CI_LEVEL, percentile_ci, ratio, resample_weights
from amer.errors import AnalysisError

__all__ = ["compare"]


def _is_stat(node: Any) -> bool:
    return isinstance(node, dict) and "key" in node and "mean" in node


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

    When both ran on the same data (same sequences: equal data fingerprints and counts) the
    bootstrap is *paired*: one resampling of sequence indices is applied to both runs, so the
    interval reflects how the two models differ on the same text, not how the text varies (this
    is much tighter than comparing two separate intervals). Otherwise the runs are resampled
    independently. ``excludes_zero`` is True when the interval lies strictly on one side of 0.
    The bootstrap uses ``result_a``'s seed and replicate count. A result compared with itself
    gives 0 with the interval [0, 0].

    Raises :class:`~amer.errors.AnalysisError` when the results come from different patterns or strides.
    """
    for r, name in ((result_a, "result_a"), (result_b, "result_b")):
        if not isinstance(r, Mapping) or r.get("format") != FORMAT or "per_sequence" not in r:
            raise AnalysisError(f"{name} is not an amer.analysis.curvature.evaluate() result (format {FORMAT})")
    if result_a["pattern"] != result_b["pattern"]:
        raise AnalysisError(
            f"cannot compare different patterns: {result_a['pattern']!r} vs {result_b['pattern']!r}; "
            f"compare two models of one pattern (e.g. trained with STP on vs off)")
    if list(result_a["strides"]) != list(result_b["strides"]):
        raise AnalysisError(f"cannot compare results measured at different strides: {result_a['strides']} vs "
                            f"{result_b['strides']}; evaluate both with the same strides")
    keys = result_a["per_sequence"]["keys"]
    if keys != result_b["per_sequence"]["keys"]:
        raise AnalysisError("cannot compare: the two results measure different statistics")
    Sa, Ca = (np.asarray(result_a["per_sequence"][k], dtype=np.float64) for k in ("sum", "count"))
    Sb, Cb = (np.asarray(result_b["per_sequence"][k], dtype=np.float64) for k in ("sum", "count"))
    paired = result_a["data_fingerprint"] == result_b["data_fingerprint"] and Sa.shape == Sb.shape
    R, seed = int(result_a["n_bootstrap"]), int(result_a["seed"])
    Wa = resample_weights(Sa.shape[0], R, seed)
    Wb = Wa if paired else resample_weights(Sb.shape[0], R, seed + 1)
    ci = percentile_ci(ratio(Wa @ Sa, Wa @ Ca) - ratio(Wb @ Sb, Wb @ Cb))
    point = ratio(Sa.sum(0), Ca.sum(0)) - ratio(Sb.sum(0), Cb.sum(0))
    col = {k: i for i, k in enumerate(keys)}
    b_means = {s["key"]: s["mean"] for s in _stat_nodes(
        [result_b["layers"], result_b["boundaries"], result_b["boundary_types"], result_b["families"]])}

    def diff_of(stat_a: dict[str, Any]) -> dict[str, Any]:
        i = col[stat_a["key"]]
        lo, hi = json_float(ci[0, i]), json_float(ci[1, i])
        return {"key": stat_a["key"], "a": stat_a["mean"], "b": b_means.get(stat_a["key"]),
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
