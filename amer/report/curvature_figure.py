"""``curvature.png``: one column of panels sharing the depth axis (taps and the boundaries between them).

Panels, top to bottom (each present when the result measured it; each axes is labelled ``kind:unit`` so a
reader of the figure object can find it):

- ``token:<unit>`` token curvature per tap (circles), with the baselines beside each tap: the shuffled text
  (x, family colour), i.i.d. noise and a random walk with the tap's covariance (grey bars), and the
  reference levels; one panel per unit shown;
- ``depth:<unit>`` depth curvature per boundary (diamonds, between the two taps it joins);
- ``decomposition`` the normal and tangential parts of token bends and the fraction of slowing triples;
- ``entropy`` Pearson r between contextual curvature (in degrees) and next-token entropy, per tap;
- ``cosines`` mean pairwise cosine of the states and of the chords, per tap;
- ``whitened:<unit>`` token curvature raw, centred and whitened;
- ``diff:<unit>`` with a comparison, A − B of token and depth curvature (filled where the CI excludes 0).

Error bars are 95% bootstrap confidence intervals over sequences, and the caption says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amer.report import new_figure, save_figure
from amer.report.style import ENDS, colour_of, palette, reference_lines

__all__ = ["UNITS", "SUFFIX", "LABEL", "units_of", "curvature_figure", "plot_report"]

# --units value -> the units shown, in order; each unit's key suffix in a result and its label
UNITS = {"one-minus-cos": ("one_minus_cos",), "angle": ("angle",), "both": ("one_minus_cos", "angle")}
SUFFIX = {"one_minus_cos": "", "angle": "_deg"}
LABEL = {"one_minus_cos": "1 - cos", "angle": "angle (°)"}


def units_of(report: Mapping[str, Any], units: str | None = None) -> tuple[str, ...]:
    """The units to show: ``units`` if given, else the report's ``config.units``, else both."""
    name = units or (report.get("config") or {}).get("units") or "both"
    if name not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}, got {name!r}")
    return UNITS[name]


def _arr(stats: list[Mapping[str, Any] | None], field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def get(s: Mapping[str, Any] | None, f: str, i: int | None = None) -> float:
        v = None if s is None else (s[f] if i is None else s[f][i])
        return np.nan if v is None else float(v)

    return (np.array([get(s, field) for s in stats]), np.array([get(s, "ci", 0) for s in stats]),
            np.array([get(s, "ci", 1) for s in stats]))


def _series(ax: Any, x: np.ndarray, stats: list[Any], colours: list[str], marker: str, *, field: str = "mean",
            hollow: bool = False, dx: float = 0.0, ls: str | None = "-", ms: float = 6, diff: bool = False) -> None:
    val, lo, hi = _arr(stats, field)
    if ls is not None:
        ax.plot(x + dx, val, ls, color="0.7", lw=0.8, zorder=1)
    for xi, v, lo_i, h, c, s in zip(x + dx, val, lo, hi, colours, stats):
        if np.isnan(v):
            continue
        fill = "none" if hollow or (diff and not s["excludes_zero"]) else c
        err = [[max(v - lo_i, 0) if not np.isnan(lo_i) else 0], [max(h - v, 0) if not np.isnan(h) else 0]]
        ax.errorbar([xi], [v], yerr=err, fmt=marker, color=c, mfc=fill, ms=ms, capsize=2, lw=1, zorder=3)


def _panels(res: Mapping[str, Any], comp: Any, units: tuple[str, ...]) -> list[tuple[str, str | None]]:
    layer0 = res["layers"][0]
    panels: list[tuple[str, str | None]] = []
    for u in units:
        panels += [("token", u), ("depth", u)]
    panels.append(("decomposition", None))
    if "entropy" in layer0:
        panels.append(("entropy", None))
    if "anisotropy" in layer0:
        panels += [("cosines", None), ("whitened", units[0])]
    if comp is not None:
        panels.append(("diff", units[0]))
    return panels


def curvature_figure(report: Mapping[str, Any], units: str | None = None) -> Any:
    """The curvature figure (a bare Agg ``Figure``); see the module docstring for its panels. A comparison adds
    hollow markers for B (smaller and to the right on the decomposition and cosine panels) and a last panel
    with A − B."""
    from matplotlib.lines import Line2D

    res, comp, res_b = report["result"], report.get("comparison"), report.get("result_b")
    us = units_of(report, units)
    k0 = str(res["strides"][0])
    n = len(res["layers"])
    xt = np.arange(n, dtype=float)
    xb = np.array([b["position"] + 0.5 for b in res["boundaries"]])
    colours = palette()
    tap_col = [colour_of(layer["family"] or layer["kind"], colours) for layer in res["layers"]]
    bnd_col = [tap_col[b["position"] + 1] for b in res["boundaries"]]
    level = res.get("ci_level", 0.95)
    n_boot = res.get("n_bootstrap")
    panels = _panels(res, comp, us)
    fig, axes = new_figure(len(panels), 1, sharex=True, squeeze=False, layout="constrained",
                           figsize=(max(8.0, 0.32 * n + 3.5), 2.4 * len(panels) + 1.0))
    axes = axes[:, 0]
    dx = -0.08 if res_b else 0.0
    layers = res["layers"]
    for ax, (kind, unit) in zip(axes, panels):
        ax.set_label(f"{kind}:{unit}" if unit else kind)
        for x in xb:
            ax.axvline(x, color="0.88", lw=0.7, zorder=0)
        ax.grid(axis="y", color="0.92", lw=0.6)
        sfx = {"one_minus_cos": "", "angle": "_deg"}.get(unit or "", "")
        ylab = f"{LABEL[unit]}  ({level:.0%} CI)" if unit else ""
        if kind == "token":
            _series(ax, xt, [lay["token" + sfx][k0] for lay in layers], tap_col, "o", dx=dx, ls=":")
            if res_b is not None:
                _series(ax, xt, [lay["token" + sfx][k0] for lay in res_b["layers"]], tap_col, "o", hollow=True,
                        dx=0.08, ls=":")
            if "baselines" in layers[0]:
                b = [lay["baselines"][k0] for lay in layers]
                _series(ax, xt, [s["shuffled" + sfx] for s in b], tap_col, "x", dx=0.25, ls=None, ms=5)
                for name, shade in (("noise", "0.35"), ("walk", "0.6")):
                    _series(ax, xt, [s[name + sfx] for s in b], [shade] * n, "_", dx=0.25, ls=None, ms=11)
            reference_lines(ax, unit=unit)  # random walk and i.i.d. noise: the token trajectory's null levels
            ax.set_title(f"{res['pattern']}: token curvature per tap (o, stride {k0}), {LABEL[unit]}"
                         + ("\nbaselines: x shuffled text, bars i.i.d. noise (dark) and random walk (light)"
                            if "baselines" in layers[0] else "")
                         + (f"\nfilled: A = {res['label']}   hollow: B = {res_b['label']}" if res_b else ""),
                         fontsize=9)
        elif kind == "depth":
            _series(ax, xb, [b["depth" + sfx] for b in res["boundaries"]], bnd_col, "D", dx=dx)
            if res_b is not None:
                _series(ax, xb, [b["depth" + sfx] for b in res_b["boundaries"]], bnd_col, "D", hollow=True, dx=0.08)
            reference_lines(ax, iid=False, unit=unit)  # independent updates: walk level only
            ax.set_title(f"depth curvature per boundary (◆, colour: the block after it), {LABEL[unit]}", fontsize=9)
        elif kind == "decomposition":
            for res_x, shift, ms in ((res, 0.0, 6), (res_b, 0.3, 4)):  # B (if any): smaller, to the right
                if res_x is None:
                    continue
                d = [lay["decomposition"][k0] for lay in res_x["layers"]]
                _series(ax, xt, [s["normal"] for s in d], tap_col, "o", dx=-0.12 + shift, ls=":", ms=ms,
                        hollow=res_x is res_b)
                _series(ax, xt, [s["tangential"] for s in d], tap_col, "^", hollow=True, dx=shift, ls=":", ms=ms)
                _series(ax, xt, [s["slowing"] for s in d], ["0.4"] * n, "s", dx=0.12 + shift, ls=None, ms=4)
            ylab = "ratio / fraction"
            ax.set_title(f"parts of the acceleration (stride {k0}): normal |a⊥|/|d2| (o, what STP sees),\n"
                         f"tangential |a∥|/|d2| (△), fraction of triples slowing (□)", fontsize=9)
        elif kind == "entropy":
            ax.axhline(0.0, color="0.4", lw=0.8)
            _series(ax, xt, [lay["entropy"][k0]["angle"] for lay in layers], tap_col, "o", field="r", dx=dx, ls=":")
            if res_b is not None and "entropy" in res_b["layers"][0]:
                _series(ax, xt, [lay["entropy"][k0]["angle"] for lay in res_b["layers"]], tap_col, "o", field="r",
                        hollow=True, dx=0.08, ls=":")
            ylab = f"Pearson r  ({level:.0%} CI)"
            ax.set_title(f"r(contextual curvature, next-token entropy): angle, window "
                         f"{res['options']['entropy_window']} bends, stride {k0}", fontsize=9)
        elif kind == "cosines":
            for res_x, shift, ms in ((res, 0.0, 6), (res_b, 0.3, 4)):
                if res_x is None or "anisotropy" not in res_x["layers"][0]:
                    continue
                a = [lay["anisotropy"] for lay in res_x["layers"]]
                _series(ax, xt, [s["cos_states"] for s in a], tap_col, "o", dx=-0.08 + shift, ls=":", ms=ms,
                        hollow=res_x is res_b)
                _series(ax, xt, [s["cos_chords"][k0] for s in a], tap_col, "^", hollow=True, dx=0.08 + shift, ls=":",
                        ms=ms)
            ax.axhline(0.0, color="0.4", lw=0.6)
            ylab = "mean pairwise cos"
            ax.set_title(f"anisotropy: mean pairwise cosine of states (o) and stride-{k0} chords (△)", fontsize=9)
        elif kind == "whitened":
            a = [lay["anisotropy"] for lay in layers]
            _series(ax, xt, [lay["token" + sfx][k0] for lay in layers], tap_col, "o", dx=-0.12, ls=":")
            _series(ax, xt, [s["centred" + sfx][k0] for s in a], tap_col, "^", hollow=True, dx=0.0, ls=None)
            _series(ax, xt, [s["whitened" + sfx][k0] for s in a], tap_col, "s", dx=0.12, ls=None, ms=5)
            reference_lines(ax, unit=unit)
            ax.set_title(f"token curvature raw (o), centred (△: mean chord removed),\nwhitened (□: states' "
                         f"covariance), {LABEL[unit]}", fontsize=9)
        elif kind == "diff":
            ax.axhline(0.0, color="0.4", lw=0.8)
            _series(ax, xt, [lay["token" + sfx][k0] for lay in comp["layers"]], tap_col, "o", field="diff", diff=True,
                    ls=":")
            _series(ax, xb, [b["depth" + sfx] for b in comp["boundaries"]], bnd_col, "D", field="diff", diff=True)
            ylab = f"A − B  ({comp.get('ci_level', level):.0%} CI)"
            ax.set_title(f"A − B of token (o) and depth (◆) curvature, {LABEL[unit]}\n"
                         f"({'paired' if comp['paired'] else 'independent'} bootstrap; filled: CI excludes 0)",
                         fontsize=9)
        ax.set_ylabel(ylab, fontsize=8)
    fig.supxlabel(f"Error bars: {level:.0%} bootstrap confidence intervals of the mean (percentile bootstrap, whole "
                  f"sequences resampled{f', {n_boot} replicates' if n_boot else ''}).", fontsize=8)
    top = axes[0].secondary_xaxis("top")
    top.set_xticks(xb, labels=[b["type"] for b in res["boundaries"]])
    top.tick_params(axis="x", labelrotation=90, labelsize=7, length=0)
    legend = [(ENDS["embed"][0], "embed")] + [(v["name"], fam) for fam, v in res["families"].items()]
    legend.append((ENDS["final"][0], "final"))
    handles = [Line2D([], [], ls="", marker="s", color=colour_of(key, colours), label=label) for label, key in legend]
    handles += [Line2D([], [], ls=":", marker="o", color="0.3", label="token curvature\n(at a tap)"),
                Line2D([], [], ls="-", marker="D", color="0.3",
                       label="depth curvature\n(at a boundary;\ncolour: block after it)"),
                Line2D([], [], ls=(0, (4, 3)), color="0.45", lw=0.8,
                       label="reference levels:\nrandom walk,\ni.i.d. noise\n(token panels)"),
                Line2D([], [], ls="-", marker="|", ms=10, color="0.3", label=f"error bar:\n{level:.0%} bootstrap CI")]
    axes[0].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[-1].set_xticks(xt, labels=[lay["tap"] for lay in layers])
    axes[-1].tick_params(axis="x", labelrotation=90, labelsize=7)
    axes[-1].set_xlim(-0.6, n - 0.4)
    return fig


def plot_report(report: Mapping[str, Any], path: str | Path, *, units: str | None = None, dpi: int = 120) -> Path:
    """``curvature.png``: :func:`curvature_figure` written atomically."""
    return save_figure(curvature_figure(report, units), path, dpi=dpi)
