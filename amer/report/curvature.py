"""The curvature report: ``curvature.json``, ``curvature.md``, ``curvature.png`` and the terminal summary.

Renders what :func:`amer.analysis.curvature.evaluate` and :func:`amer.analysis.compare.compare`
return; it measures nothing. Family names come from the result itself and colours from the family
registry, so a newly registered family appears without any change here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amer.report import atomic_write_text, md_table, new_figure, save_figure, text_table, write_json
from amer.report.style import ENDS, colour_of, palette, reference_lines

__all__ = ["curvature_figure", "format_markdown", "format_summary", "plot_report", "write_report"]



def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_stat(s: Mapping[str, Any], *, std: bool = True) -> str:
    """``mean ± std [lo, hi]`` (std omitted with ``std=False``)."""
    text = _f(s["mean"])
    if std and s.get("std") is not None:
        text += f" ± {_f(s['std'], 3)}"
    lo, hi = s["ci"]
    return text + f" [{_f(lo)}, {_f(hi)}]"


def _fmt_diff(d: Mapping[str, Any]) -> str:
    lo, hi = d["ci"]

    def signed(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.4f}"

    return f"{signed(d['diff'])} [{signed(lo)}, {signed(hi)}]"


def _type_rows(res: Mapping[str, Any]) -> list[list[str]]:
    return [[ty, str(v["n_boundaries"]), _fmt_stat(v["depth"])] for ty, v in res["boundary_types"].items()]


def _family_rows(res: Mapping[str, Any]) -> list[list[str]]:
    return [[f"{fam} ({v['name']})", str(len(v["blocks"]))] + [_fmt_stat(v["token"][k]) for k in v["token"]]
            + [_fmt_stat(v["stp"]), _fmt_stat(v["depth_in"]), _fmt_stat(v["depth_out"])]
            for fam, v in res["families"].items()]


def _family_headers(res: Mapping[str, Any]) -> list[str]:
    return (["family", "blocks"] + [f"token curvature s={k}" for k in res["strides"]]
            + ["STP loss", "depth curvature in", "depth curvature out"])


def _diff_rows(items: Iterable[tuple[str, str, Mapping[str, Any]]]) -> list[list[str]]:
    return [[name, stat, _f(d["a"]), _f(d["b"]), _fmt_diff(d), "yes" if d["excludes_zero"] else "no"]
            for name, stat, d in items]


_DIFF_HEADERS = ["", "statistic", "A", "B", "A − B [95% CI]", "CI excludes 0"]


def _family_diff_items(comp: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    items = []
    for fam, v in comp["families"].items():
        items += [(fam, f"token s={k}", d) for k, d in v["token"].items()]
        items += [(fam, "STP loss", v["stp"]), (fam, "depth in", v["depth_in"]), (fam, "depth out", v["depth_out"])]
    return items


def _tap_family_name(res: Mapping[str, Any], layer: Mapping[str, Any]) -> str:
    if layer["family"] is None:
        return ENDS.get(layer["kind"], ("", ""))[0]
    return res["families"].get(layer["family"], {}).get("name", "")


def format_markdown(report: Mapping[str, Any]) -> str:
    """``curvature.md``: what was measured and the tables per boundary type, per family, per layer
    (and the comparison tables when the report has one)."""
    cfg, res = report["config"], report["result"]
    comp = report.get("comparison")
    selected = set(cfg.get("stp_selected") or [])
    out = [f"# Curvature report: pattern `{res['pattern']}`", ""]
    out.append(f"- model: `{res['label']}`")
    out.append(f"- data: `{cfg.get('data', '?')}` validation split, {res['n_sequences']} sequences of "
               f"{res['seq_len']} tokens ({res['n_tokens']} tokens), fingerprint `{res['data_fingerprint']}`")
    out.append(f"- seed {res['seed']}, {res['n_bootstrap']} bootstrap replicates, STP estimator with "
               f"{res['stp_n_spans']} spans per sequence, strides {', '.join(map(str, res['strides']))}")
    if selected:
        out.append(f"- STP selection in the {'checkpoint' if cfg.get('checkpoint') else 'preset'} config: "
                   f"{', '.join(cfg['stp_selected'])} (marked * below)")
    out += ["", "All values are `1 - cos` in [0, 2]: 0 straight, 1 a right angle (or unrelated directions), "
                "2 a reversal. Cells read `mean ± std [95% CI]`: the mean is pooled over every triple "
                "(token curvature, STP) or token (depth curvature); std is the spread of single bends; the "
                "interval is a bootstrap over sequences. Depth curvature at `X->Y` is the angle between the update "
                "written by block X and the one written by the next block Y.", ""]
    out += ["## Depth curvature per boundary type", "",
            md_table(["boundary type", "boundaries", "depth curvature"], _type_rows(res)), ""]
    out += ["## Per family (mean over the family's blocks)", "",
            md_table(_family_headers(res), _family_rows(res)), ""]
    rows = []
    into = {b["to"]: b for b in res["boundaries"]}
    for i, layer in enumerate(res["layers"]):
        b = into.get(layer["tap"])
        name = layer["tap"] + (" *" if layer["tap"] in selected else "")
        rows.append([str(i), name, _tap_family_name(res, layer)]
                    + [_fmt_stat(layer["token"][str(k)]) for k in res["strides"]]
                    + [_fmt_stat(layer["stp"]), b["type"] if b else "", _fmt_stat(b["depth"]) if b else ""])
    out += ["## Per layer (depth order)", "",
            md_table(["#", "tap", "family"] + [f"token curvature s={k}" for k in res["strides"]]
                     + ["STP loss", "boundary into tap", "depth curvature"], rows), ""]
    if comp is not None:
        out += ["## Comparison", "", f"- A: `{comp['a']}`", f"- B: `{comp['b']}`",
                f"- difference A − B with a {comp['ci_level']:.0%} CI: {comp['method']} "
                f"({comp['n_bootstrap']} replicates, seed {comp['seed']}); negative = A is straighter.", ""]
        out += ["### Per boundary type", "", md_table(
            ["boundary type"] + _DIFF_HEADERS[1:],
            _diff_rows((ty, "depth", v["depth"]) for ty, v in comp["boundary_types"].items())), ""]
        out += ["### Per family", "", md_table(["family"] + _DIFF_HEADERS[1:],
                                               _diff_rows(_family_diff_items(comp))), ""]
        items = []
        into_c = {b["to"]: b for b in comp["boundaries"]}
        for layer in comp["layers"]:
            items += [(layer["tap"], f"token s={k}", d) for k, d in layer["token"].items()]
            items.append((layer["tap"], "STP loss", layer["stp"]))
            if layer["tap"] in into_c:
                items.append((layer["tap"], f"depth ({into_c[layer['tap']]['type']})", into_c[layer["tap"]]["depth"]))
        out += ["### Per layer", "", md_table(["tap"] + _DIFF_HEADERS[1:], _diff_rows(items)), ""]
    return "\n".join(out)


def format_summary(report: Mapping[str, Any]) -> str:
    """The terminal summary: depth curvature per boundary type and the per-family table (plus the
    per-type and per-family differences when comparing)."""
    res, comp = report["result"], report.get("comparison")
    parts = [f"curvature of {res['label']} (pattern {res['pattern']}, {res['n_sequences']} sequences x "
             f"{res['seq_len']} tokens; mean ± std [95% CI])", "",
             text_table(["boundary type", "n", "depth curvature"], _type_rows(res)), "",
             text_table(_family_headers(res), _family_rows(res))]
    if comp is not None:
        items = [(ty, "depth", v["depth"]) for ty, v in comp["boundary_types"].items()] + _family_diff_items(comp)
        parts += ["", f"A = {comp['a']}", f"B = {comp['b']}", f"A − B ({comp['method']}):", "",
                  text_table(_DIFF_HEADERS, _diff_rows(items))]
    return "\n".join(parts)


def plot_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """``curvature.png``: :func:`curvature_figure` written atomically."""
    return save_figure(curvature_figure(report), path, dpi=120)


def curvature_figure(report: Mapping[str, Any]) -> Any:
    """The curvature figure (a bare Agg ``Figure``): token curvature per tap (circles, top panel) and depth
    curvature at every boundary (diamonds, between the two taps it joins, second panel), coloured by family,
    every boundary marked by a vertical line and labelled with its type along the top. Error bars are the
    report's bootstrap confidence intervals (95%), and the caption says so. Both curvature panels carry the
    reference level 1.0 (random walk); only the token panel carries 1.5 (i.i.d. noise), which is not the
    i.i.d. level of depth curvature (:mod:`amer.report.style` derives both). A comparison adds hollow markers
    for B and a last panel with A − B and its CI (filled where the CI excludes zero), where neither level
    applies: a difference is read against 0."""
    from matplotlib.lines import Line2D

    res, comp = report["result"], report.get("comparison")
    res_b = report.get("result_b")
    k0 = str(res["strides"][0])
    n = len(res["layers"])
    xt = np.arange(n, dtype=float)
    xb = np.array([b["position"] + 0.5 for b in res["boundaries"]])
    colours = palette()
    tap_col = [colour_of(layer["family"] or layer["kind"], colours) for layer in res["layers"]]
    bnd_col = [tap_col[b["position"] + 1] for b in res["boundaries"]]
    level = res.get("ci_level", 0.95)
    n_boot = res.get("n_bootstrap")
    ci_text = (f"Error bars: {level:.0%} bootstrap confidence intervals of the mean (percentile bootstrap, whole "
               f"sequences resampled{f', {n_boot} replicates' if n_boot else ''}).")

    fig, axes = new_figure(3 if comp else 2, 1, sharex=True, squeeze=False, layout="constrained",
                           figsize=(max(8.0, 0.32 * n + 3.0), 10.5 if comp else 7.5))
    axes = axes[:, 0]

    def series(ax: Any, x: np.ndarray, stats: list[Mapping[str, Any]], colours: list[str], marker: str,
               hollow: bool = False, diff: bool = False, dx: float = 0.0, ls: str = "-") -> None:
        field = "diff" if diff else "mean"
        val = np.array([np.nan if s[field] is None else s[field] for s in stats])
        lo = np.array([np.nan if s["ci"][0] is None else s["ci"][0] for s in stats])
        hi = np.array([np.nan if s["ci"][1] is None else s["ci"][1] for s in stats])
        ax.plot(x + dx, val, ls, color="0.7", lw=0.8, zorder=1)
        for xi, v, lo_i, h, c, s in zip(x + dx, val, lo, hi, colours, stats):
            fill = "none" if hollow or (diff and not s["excludes_zero"]) else c
            ax.errorbar([xi], [v], yerr=[[max(v - lo_i, 0)], [max(h - v, 0)]], fmt=marker, color=c, mfc=fill,
                        ms=6, capsize=2, lw=1, zorder=3)

    def decorate(ax: Any) -> None:
        for x in xb:
            ax.axvline(x, color="0.88", lw=0.7, zorder=0)
        ax.grid(axis="y", color="0.92", lw=0.6)

    dx = -0.08 if res_b else 0.0
    ax_tok, ax_depth = axes[0], axes[1]
    for ax in (ax_tok, ax_depth):
        decorate(ax)
        ax.set_ylabel(f"1 - cos  ({level:.0%} CI)")
    series(ax_tok, xt, [lay["token"][k0] for lay in res["layers"]], tap_col, "o", dx=dx, ls=":")
    series(ax_depth, xb, [b["depth"] for b in res["boundaries"]], bnd_col, "D", dx=dx)
    if res_b is not None:
        series(ax_tok, xt, [lay["token"][k0] for lay in res_b["layers"]], tap_col, "o", hollow=True, dx=0.08, ls=":")
        series(ax_depth, xb, [b["depth"] for b in res_b["boundaries"]], bnd_col, "D", hollow=True, dx=0.08)
    reference_lines(ax_tok)  # 1.0 random walk, 1.5 i.i.d. noise: the token trajectory's two null levels
    reference_lines(ax_depth, iid=False)  # independent updates give 1.0; 1.5 is no null level along depth
    title = f"{res['pattern']}: token curvature per tap (o, stride {k0})"
    ax_tok.set_title(title + (f"\nfilled: A = {res['label']}   hollow: B = {res_b['label']}" if res_b else ""),
                     fontsize=9)
    fig.supxlabel(ci_text, fontsize=8)  # the caption, under the figure
    ax_depth.set_title("depth curvature per boundary (◆, colour: the block after it)", fontsize=9)
    top = ax_tok.secondary_xaxis("top")
    top.set_xticks(xb, labels=[b["type"] for b in res["boundaries"]])
    top.tick_params(axis="x", labelrotation=90, labelsize=7, length=0)
    legend = [(ENDS["embed"][0], "embed")] + [(v["name"], fam) for fam, v in res["families"].items()]
    legend.append((ENDS["final"][0], "final"))
    handles = [Line2D([], [], ls="", marker="s", color=colour_of(key, colours), label=label)
               for label, key in legend]
    handles += [Line2D([], [], ls=":", marker="o", color="0.3", label="token curvature\n(at a tap)"),
                Line2D([], [], ls="-", marker="D", color="0.3",
                       label="depth curvature\n(at a boundary;\ncolour: block after it)"),
                Line2D([], [], ls=(0, (4, 3)), color="0.45", lw=0.8,
                       label="reference levels:\n1.0 random walk,\n1.5 i.i.d. noise\n(token panel only)"),
                Line2D([], [], ls="-", marker="|", ms=10, color="0.3", label=f"error bar:\n{level:.0%} bootstrap CI")]
    ax_tok.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    if comp is not None:
        ax2 = axes[2]
        decorate(ax2)
        ax2.axhline(0.0, color="0.4", lw=0.8)
        series(ax2, xt, [lay["token"][k0] for lay in comp["layers"]], tap_col, "o", diff=True, ls=":")
        series(ax2, xb, [b["depth"] for b in comp["boundaries"]], bnd_col, "D", diff=True)
        ax2.set_ylabel(f"A − B  ({comp.get('ci_level', level):.0%} bootstrap CI)")
        ax2.set_title(f"difference A − B ({'paired' if comp['paired'] else 'independent'} bootstrap, "
                      f"{comp.get('ci_level', level):.0%} CI); filled = CI excludes 0", fontsize=9)
    axes[-1].set_xticks(xt, labels=[lay["tap"] for lay in res["layers"]])
    axes[-1].tick_params(axis="x", labelrotation=90, labelsize=7)
    axes[-1].set_xlim(-0.6, n - 0.4)
    return fig


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``curvature.json``, ``curvature.md`` and ``curvature.png`` into ``out_dir`` (created), each
    atomically."""
    out = Path(out_dir)
    paths = {"json": out / "curvature.json", "md": out / "curvature.md", "png": out / "curvature.png"}
    write_json(paths["json"], dict(report))
    atomic_write_text(paths["md"], format_markdown(report))
    plot_report(report, paths["png"])
    return paths
