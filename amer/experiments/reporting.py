"""What every experiment's report does with arm records: group them over seeds (mean, std and the values per
figure), pair an arm group with its baseline seed by seed, and draw accuracy against the data fraction."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from amer.analysis.stats import mean_std, paired_ttest

__all__ = ["frac", "group_rows", "paired", "p_cell", "fraction_axis"]


def frac(f: str) -> float:
    """``"1/4"`` -> 0.25: the order and the plot position of a data fraction."""
    return float(Fraction(f))


def group_rows(records: Sequence[dict[str, Any]], fields: Sequence[str], figures: Sequence[str],
               extra: Sequence[str] = ()) -> dict[tuple[Any, ...], dict[str, Any]]:
    """One row per distinct ``fields`` of the records' arms: those fields, ``extra`` arm fields (taken from the
    first seed), its seeds in order, ``n``, and per figure ``{"mean", "std", "values"}`` (values by seed)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r["arm"][f] for f in fields)].append(r)
    out = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["arm"]["seed"])
        row: dict[str, Any] = {**dict(zip(fields, key)), **{f: rs[0]["arm"][f] for f in extra},
                               "seeds": [r["arm"]["seed"] for r in rs], "n": len(rs)}
        for name in figures:
            vals = [r[name] for r in rs]
            m, sd = mean_std(vals)
            row[name] = {"mean": m, "std": sd, "values": vals}
        out[key] = row
    return out


def paired(row: dict[str, Any], base: dict[str, Any] | None, figure: str = "accuracy") -> dict[str, Any]:
    """``row`` minus ``base`` (two rows of :func:`group_rows`), paired by seed (seeds only one has are left out):
    ``diff_vs_ntp`` (mean difference), ``t_vs_ntp`` and ``p_vs_ntp`` (paired t-test, two-sided), ``n_pairs``;
    None when no seed pairs. The same non-zero difference on every seed has t = +-inf and p = 0; ``t_vs_ntp`` is
    then None (JSON has no Infinity) and the sign is the sign of ``diff_vs_ntp``."""
    by_seed = dict(zip(base["seeds"], base[figure]["values"])) if base is not None else {}
    pairs = [(v, by_seed[sd]) for sd, v in zip(row["seeds"], row[figure]["values"]) if sd in by_seed]
    if not pairs:
        return {"diff_vs_ntp": None, "p_vs_ntp": None, "n_pairs": 0}
    t, p = paired_ttest([a for a, _ in pairs], [b for _, b in pairs])
    if t is not None and not math.isfinite(t):
        t = None
    return {"diff_vs_ntp": sum(a - b for a, b in pairs) / len(pairs), "t_vs_ntp": t, "p_vs_ntp": p,
            "n_pairs": len(pairs)}


def p_cell(row: dict[str, Any]) -> str:
    """A results table's p column for a :func:`paired` result: ``-`` without a test, and a p of 0 from the same
    difference on every seed marked as such (it is the t-test's limit, not a measured tail)."""
    p = row.get("p_vs_ntp")
    if p is None:
        return "-"
    return "0 (same diff. every seed)" if p == 0 and row.get("t_vs_ntp") is None else f"{p:.3g}"


def fraction_axis(ax: Any, fractions: Sequence[str], title: str) -> None:
    """Exact match (%) from 0 against the data fractions on a log-2 axis labelled as fractions."""
    fr = sorted(set(fractions), key=frac)
    ax.set_xscale("log", base=2)
    ax.set_xticks([frac(f) for f in fr], fr)
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training data fraction")
    ax.set_ylabel("exact match (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
