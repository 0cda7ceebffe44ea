"""The curvature report: ``curvature.json``, ``curvature.md``, ``curvature.png`` and the terminal summary.

Renders what :func:`amer.analysis.curvature.evaluate` and :func:`amer.analysis.compare.compare`
return; it measures nothing. Family names come from the result itself and colours from the family
registry, so a newly registered family appears without any change here. ``units`` (``one-minus-cos``,
``angle`` or ``both``, default ``both``; the report's ``config.units`` when it has one) picks which unit the
curvature figures are shown in; the JSON always holds both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from amer.report import atomic_write_text, md_table, text_table, write_json
from amer.report.curvature_figure import LABEL, SUFFIX, UNITS, curvature_figure, plot_report, units_of
from amer.report.style import ENDS

__all__ = ["UNITS", "curvature_figure", "format_markdown", "format_summary", "plot_report", "units_of",
           "write_report"]

def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_stat(s: Mapping[str, Any] | None, unit: str = "one_minus_cos", *, std: bool = True) -> str:
    """``mean ± std [lo, hi]`` (std omitted with ``std=False``); degrees with two decimals."""
    if s is None:
        return "n/a"
    deg = unit == "angle"
    d, sd, mark = (2, 1, "°") if deg else (4, 3, "")
    text = _f(s["mean"], d) + mark
    if std and s.get("std") is not None:
        text += f" ± {_f(s['std'], sd)}"
    lo, hi = s["ci"]
    return text + f" [{_f(lo, d)}, {_f(hi, d)}]"


def _fmt_r(s: Mapping[str, Any] | None) -> str:
    if s is None or s.get("r") is None:
        return "n/a"
    lo, hi = s["ci"]
    return f"{s['r']:+.3f} [{'n/a' if lo is None else f'{lo:+.3f}'}, {'n/a' if hi is None else f'{hi:+.3f}'}]"


def _fmt_diff(d: Mapping[str, Any]) -> str:
    lo, hi = d["ci"]

    def signed(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.4f}"

    return f"{signed(d['diff'])} [{signed(lo)}, {signed(hi)}]"


def _units_cells(node: Mapping[str, Any], key: str, units: tuple[str, ...], stride: str | None = None, *,
                 std: bool = True) -> list[str]:
    """One formatted cell per unit of ``node[key (+ _deg)]`` (``[stride]`` when given)."""
    cells = []
    for u in units:
        s = node.get(key + SUFFIX[u])
        cells.append(_fmt_stat(s[stride] if stride is not None and s is not None else s, u, std=std))
    return cells


def _type_rows(res: Mapping[str, Any], units: tuple[str, ...], std: bool = True) -> list[list[str]]:
    return [[ty, str(v["n_boundaries"])] + _units_cells(v, "depth", units, std=std)
            for ty, v in res["boundary_types"].items()]


def _family_rows(res: Mapping[str, Any], units: tuple[str, ...], std: bool = True) -> list[list[str]]:
    rows = []
    for fam, v in res["families"].items():
        tok = [c for k in v["token"] for c in _units_cells(v, "token", units, k, std=std)]
        rows.append([f"{fam} ({v['name']})", str(len(v["blocks"]))] + tok + [_fmt_stat(v["stp"], std=std)]
                    + _units_cells(v, "depth_in", units, std=std) + _units_cells(v, "depth_out", units, std=std))
    return rows


def _with_units(names: list[str], units: tuple[str, ...]) -> list[str]:
    return [f"{n} [{LABEL[u]}]" if len(units) > 1 else f"{n} ({LABEL[u]})" for n in names for u in units]


def _family_headers(res: Mapping[str, Any], units: tuple[str, ...]) -> list[str]:
    return (["family", "blocks"] + _with_units([f"token curvature s={k}" for k in res["strides"]], units)
            + ["STP loss"] + _with_units(["depth curvature in"], units) + _with_units(["depth curvature out"], units))


def _rows_of(res: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, node) for every family, then every tap: the rows of the check tables."""
    return ([(f"{fam} ({v['name']})", v) for fam, v in res["families"].items()]
            + [(layer["tap"], layer) for layer in res["layers"]])


def _decomposition_table(res: Mapping[str, Any]) -> str:
    rows = [[name, k, _fmt_stat(d["normal"]), _fmt_stat(d["tangential"]), _fmt_stat(d["slowing"])]
            for name, node in _rows_of(res) for k, d in node["decomposition"].items()]
    # a bare | would end a Markdown table cell
    return md_table(["family / tap", "stride", r"normal \|a⊥\|/\|d2\|", r"tangential \|a∥\|/\|d2\|",
                     "slowing (fraction)"], rows)


def _baseline_table(res: Mapping[str, Any], units: tuple[str, ...]) -> str:
    rows = []
    for name, node in _rows_of(res):
        for k, b in node["baselines"].items():
            for u in units:
                sfx = SUFFIX[u]
                rows.append([name, k, LABEL[u], _fmt_stat(node["token" + sfx][k], u, std=False)]
                            + [_fmt_stat(b[f"{base}{sfx}"], u, std=False) for base in ("shuffled", "noise", "walk")])
    return md_table(["family / tap", "stride", "unit", "model", "shuffled text", "i.i.d. noise", "random walk"], rows)


def _entropy_table(res: Mapping[str, Any]) -> str:
    rows = [[name, k, _fmt_r(e["angle"]), _fmt_r(e["one_minus_cos"]), str(e["angle"]["n"])]
            for name, node in _rows_of(res) for k, e in node["entropy"].items()]
    return md_table(["family / tap", "stride", "r (angle)", "r (1 - cos)", "positions"], rows)


def _anisotropy_table(res: Mapping[str, Any], units: tuple[str, ...]) -> str:
    rows = []
    for name, node in _rows_of(res):
        a = node["anisotropy"]
        for k in a["cos_chords"]:
            for u in units:
                sfx = SUFFIX[u]
                curv = [_fmt_stat(x, u, std=False) for x in (node["token" + sfx][k], a["centred" + sfx][k],
                                                             a["whitened" + sfx][k])]
                rows.append([name, k, _fmt_stat(a["cos_states"], std=False), _fmt_stat(a["cos_chords"][k], std=False),
                             LABEL[u], *curv, str(a.get("whitening_rank", ""))])
    return md_table(["family / tap", "stride", "cos states", "cos chords", "unit", "token curvature", "centred",
                     "whitened", "rank"], rows)


def _diff_rows(items: Iterable[tuple[str, str, Mapping[str, Any]]]) -> list[list[str]]:
    return [[name, stat, _f(d["a"]), _f(d["b"]), _fmt_diff(d), "yes" if d["excludes_zero"] else "no"]
            for name, stat, d in items]


_DIFF_HEADERS = ["", "statistic", "A", "B", "A − B [95% CI]", "CI excludes 0"]


def _family_diff_items(comp: Mapping[str, Any], units: tuple[str, ...]) -> list[tuple[str, str, Mapping[str, Any]]]:
    items = []
    for fam, v in comp["families"].items():
        for u in units:
            items += [(fam, f"token s={k} ({LABEL[u]})", d) for k, d in v["token" + SUFFIX[u]].items()]
        items.append((fam, "STP loss", v["stp"]))
        for u in units:
            items += [(fam, f"depth in ({LABEL[u]})", v["depth_in" + SUFFIX[u]]),
                      (fam, f"depth out ({LABEL[u]})", v["depth_out" + SUFFIX[u]])]
        for k, d in v["decomposition"].items():
            items += [(fam, f"{m} s={k}", d[m]) for m in ("normal", "tangential", "slowing")]
        for k, e in v.get("entropy", {}).items():
            items.append((fam, f"r entropy (angle) s={k}", e["angle"]))
        for k, d in v.get("anisotropy", {}).get("whitened", {}).items():
            items.append((fam, f"whitened s={k}", d))
    return items


def _tap_family_name(res: Mapping[str, Any], layer: Mapping[str, Any]) -> str:
    if layer["family"] is None:
        return ENDS.get(layer["kind"], ("", ""))[0]
    return res["families"].get(layer["family"], {}).get("name", "")


def _header(report: Mapping[str, Any], units: tuple[str, ...]) -> list[str]:
    cfg, res = report["config"], report["result"]
    opts = res.get("options", {})
    selected = cfg.get("stp_selected") or []
    out = [f"# Curvature report: pattern `{res['pattern']}`", "", f"- model: `{res['label']}`",
           f"- data: `{cfg.get('data', '?')}` validation split, {res['n_sequences']} sequences of "
           f"{res['seq_len']} tokens ({res['n_tokens']} tokens), fingerprint `{res['data_fingerprint']}`",
           f"- seed {res['seed']}, {res['n_bootstrap']} bootstrap replicates, STP estimator with "
           f"{res['stp_n_spans']} spans per sequence, strides {', '.join(map(str, res['strides']))}",
           f"- checks: baselines {'on' if opts.get('baselines') else 'off'}, anisotropy "
           f"{'on' if opts.get('anisotropy') else 'off'}, entropy "
           + (f"on (window {opts.get('entropy_window')} bends)" if opts.get("entropy") else "off")
           + f"; units shown: {', '.join(LABEL[u] for u in units)}"]
    if selected:
        out.append(f"- STP selection in the {'checkpoint' if cfg.get('checkpoint') else 'preset'} config: "
                   f"{', '.join(selected)} (marked * below)")
    out += ["", "Curvature is shown as `1 - cos` in [0, 2] (0 straight, 1 a right angle or unrelated directions, 1.5 "
                "i.i.d. noise, 2 a reversal) and/or as the mean angle in degrees (90 a random walk, 120 i.i.d. noise). "
                "Cells read `mean ± std [95% CI]`: the mean is pooled over every triple (token curvature, STP), token "
                "(depth curvature) or pair (cosines); std is the spread of single values; the interval is a bootstrap "
                "over sequences. Depth curvature at `X->Y` is the angle between the update written by block X and the "
                "one written by the next block Y.", ""]
    return out


def format_markdown(report: Mapping[str, Any], units: str | None = None) -> str:
    """``curvature.md``: what was measured and the tables per boundary type, per family, the checks (decomposition,
    baselines, entropy, anisotropy), per layer (and the comparison tables when the report has one)."""
    res, comp = report["result"], report.get("comparison")
    us = units_of(report, units)
    selected = set(report["config"].get("stp_selected") or [])
    out = _header(report, us)
    out += ["## Depth curvature per boundary type", "",
            md_table(["boundary type", "boundaries"] + _with_units(["depth curvature"], us), _type_rows(res, us)), ""]
    out += ["## Per family (mean over the family's blocks)", "",
            md_table(_family_headers(res, us), _family_rows(res, us)), ""]
    layer0 = res["layers"][0]
    out += ["## Normal and tangential parts of token bends", "",
            "With `d1 = h[t+k] - h[t]`, `d2 = h[t+2k] - h[t+k]`, the acceleration `a = d2 - d1` splits along the "
            "direction of travel `u = d1/|d1|` into `a∥ = (a·u)u` and `a⊥ = a - a∥`. The STP loss is exactly "
            "`1 - sgn(d1·d2) sqrt(1 - |a⊥|²/|d2|²)`: it sees the normal part only. `slowing` is the fraction of "
            "triples with `a·u < 0` (less progress along the heading than the step before).", "",
            _decomposition_table(res), ""]
    if "baselines" in layer0:
        out += ["## Baselines", "", "The same token curvature on the model's run over shuffled text (each document's "
                "tokens permuted), on i.i.d. Gaussian points with the tap's mean and covariance, and on a Gaussian "
                "random walk with the tap's covariance: each figure's own floor and ceiling.", "",
                _baseline_table(res, us), ""]
    if "entropy" in layer0:
        ent = res.get("next_token_entropy") or {}
        out += ["## Curvature against next-token entropy", "",
                f"Pearson r over positions between the contextual curvature (mean bend over the "
                f"{res['options']['entropy_window']} bends ending at a position) and the entropy of the next-token "
                f"distribution there (mean entropy {_fmt_stat(ent, std=False)} nats); 95% bootstrap CI over sequences.",
                "", _entropy_table(res), ""]
    if "anisotropy" in layer0:
        out += ["## Anisotropy", "", "Mean pairwise cosine of the states and of the chords within a sequence "
                "(near 1: everything points one way), and token curvature after removing the mean chord (centred) and "
                "after whitening with the states' covariance (rank: directions kept). A figure that survives both is "
                "not made by a few dominant directions.", "", _anisotropy_table(res, us), ""]
    rows = []
    into = {b["to"]: b for b in res["boundaries"]}
    for i, layer in enumerate(res["layers"]):
        b = into.get(layer["tap"])
        name = layer["tap"] + (" *" if layer["tap"] in selected else "")
        tok = [c for k in res["strides"] for c in _units_cells(layer, "token", us, str(k))]
        rows.append([str(i), name, _tap_family_name(res, layer)] + tok
                    + [_fmt_stat(layer["stp"]), b["type"] if b else ""]
                    + (_units_cells(b, "depth", us) if b else [""] * len(us)))
    out += ["## Per layer (depth order)", "",
            md_table(["#", "tap", "family"] + _with_units([f"token curvature s={k}" for k in res["strides"]], us)
                     + ["STP loss", "boundary into tap"] + _with_units(["depth curvature"], us), rows), ""]
    if comp is not None:
        out += _comparison_md(comp, us)
    return "\n".join(out)


def _comparison_md(comp: Mapping[str, Any], us: tuple[str, ...]) -> list[str]:
    out = ["## Comparison", "", f"- A: `{comp['a']}`", f"- B: `{comp['b']}`",
           f"- difference A − B with a {comp['ci_level']:.0%} CI: {comp['method']} "
           f"({comp['n_bootstrap']} replicates, seed {comp['seed']}); negative = A is straighter.", ""]
    out += ["### Per boundary type", "", md_table(
        ["boundary type"] + _DIFF_HEADERS[1:],
        _diff_rows((ty, f"depth ({LABEL[u]})", v["depth" + SUFFIX[u]]) for ty, v in comp["boundary_types"].items()
                   for u in us)), ""]
    out += ["### Per family", "",
            md_table(["family"] + _DIFF_HEADERS[1:], _diff_rows(_family_diff_items(comp, us))), ""]
    items = []
    into_c = {b["to"]: b for b in comp["boundaries"]}
    for layer in comp["layers"]:
        for u in us:
            items += [(layer["tap"], f"token s={k} ({LABEL[u]})", d) for k, d in layer["token" + SUFFIX[u]].items()]
        items.append((layer["tap"], "STP loss", layer["stp"]))
        for k, e in layer.get("entropy", {}).items():
            items.append((layer["tap"], f"r entropy (angle) s={k}", e["angle"]))
        if layer["tap"] in into_c:
            b = into_c[layer["tap"]]
            items += [(layer["tap"], f"depth {b['type']} ({LABEL[u]})", b["depth" + SUFFIX[u]]) for u in us]
    out += ["### Per layer", "", md_table(["tap"] + _DIFF_HEADERS[1:], _diff_rows(items)), ""]
    return out


def _checks_rows(res: Mapping[str, Any], unit: str) -> tuple[list[str], list[list[str]]]:
    """The terminal's per-family table of the checks at the first stride, in one unit."""
    k, sfx = str(res["strides"][0]), SUFFIX[unit]
    headers = ["family", "normal", "tangential", "slowing"]
    layer0 = res["layers"][0]
    if "baselines" in layer0:
        headers += [f"shuffled [{LABEL[unit]}]", "noise", "walk"]
    if "entropy" in layer0:
        headers += ["r entropy (angle)"]
    if "anisotropy" in layer0:
        headers += ["cos chords", f"whitened [{LABEL[unit]}]"]
    rows = []
    for fam, v in res["families"].items():
        d = v["decomposition"][k]
        row = [fam] + [_f(d[m]["mean"], 3) for m in ("normal", "tangential", "slowing")]
        if "baselines" in v:
            row += [_f(v["baselines"][k][b + sfx]["mean"], 3) for b in ("shuffled", "noise", "walk")]
        if "entropy" in v:
            row.append(_fmt_r(v["entropy"][k]["angle"]))
        if "anisotropy" in v:
            an = v["anisotropy"]
            row += [_f(an["cos_chords"][k]["mean"], 3), _f(an["whitened" + sfx][k]["mean"], 3)]
        rows.append(row)
    return headers, rows


def format_summary(report: Mapping[str, Any], units: str | None = None) -> str:
    """The terminal summary: depth curvature per boundary type, the per-family table and the per-family checks
    (plus the per-type and per-family differences when comparing)."""
    res, comp = report["result"], report.get("comparison")
    us = units_of(report, units)
    headers, rows = _checks_rows(res, us[-1])
    std = len(us) == 1  # with both units the spread is left to curvature.md: the table stays readable
    parts = [f"curvature of {res['label']} (pattern {res['pattern']}, {res['n_sequences']} sequences x "
             f"{res['seq_len']} tokens; mean{' ± std' if std else ''} [95% CI])", "",
             text_table(["boundary type", "n"] + _with_units(["depth curvature"], us), _type_rows(res, us, std)), "",
             text_table(_family_headers(res, us), _family_rows(res, us, std)), "",
             f"checks at stride {res['strides'][0]} (means; r with its 95% CI):", "", text_table(headers, rows)]
    if comp is not None:
        items = [(ty, f"depth ({LABEL[u]})", v["depth" + SUFFIX[u]]) for ty, v in comp["boundary_types"].items()
                 for u in us] + _family_diff_items(comp, us)
        parts += ["", f"A = {comp['a']}", f"B = {comp['b']}", f"A − B ({comp['method']}):", "",
                  text_table(_DIFF_HEADERS, _diff_rows(items))]
    return "\n".join(parts)


def write_report(report: Mapping[str, Any], out_dir: str | Path, units: str | None = None, *,
                 dpi: int = 120) -> dict[str, Path]:
    """Write ``curvature.json``, ``curvature.md`` and ``curvature.png`` (at ``dpi``) into ``out_dir`` (created),
    each atomically."""
    out = Path(out_dir)
    paths = {"json": out / "curvature.json", "md": out / "curvature.md", "png": out / "curvature.png"}
    write_json(paths["json"], dict(report))
    atomic_write_text(paths["md"], format_markdown(report, units))
    plot_report(report, paths["png"], units=units, dpi=dpi)
    return paths
