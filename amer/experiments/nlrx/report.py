"""The report: means and spreads per arm group over seeds, paired tests of each STP arm against NTP, the
verdict on each of the paper's two claims (decided from the numbers only), and ``results.json``,
``results.md`` and ``results.png``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from amer.analysis.stats import paired_ttest, spearman
from amer.experiments.nlrx.grid import NTP, TAPS, Settings
from amer.experiments.reporting import frac as _frac_value
from amer.experiments.reporting import fraction_axis, group_rows, p_cell, paired
from amer.report import atomic_write_text, md_table, new_figure, save_figure, write_json

__all__ = ["summarize", "write_report"]

_FIGURES = ("accuracy", "heldout_ce", "heldout_stp_final", "heldout_stp_family", "erank", "train_ce")


def summarize(records: Sequence[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """Mean +- std per arm group, paired tests of each STP arm vs NTP, and the plain-language verdicts."""
    groups = group_rows(records, ("model", "lam", "taps", "fraction"), _FIGURES, extra=("pattern",))
    rows = []
    for (model, lam, taps, frac), row in groups.items():
        row["heldout_stp_own"] = row["heldout_stp_family" if taps == "family" else "heldout_stp_final"]
        row.update({"p_vs_ntp": None, "diff_vs_ntp": None} if lam == 0 else
                   paired(row, groups.get((model, 0.0, NTP, frac))))
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], -_frac_value(r["fraction"]), r["lam"], r["taps"]))
    verdicts = {m: _verdicts(m, [r for r in rows if r["model"] == m]) for m in dict.fromkeys(r["model"] for r in rows)}
    return {"settings": {**asdict(s), "fingerprint": s.fingerprint()}, "rows": rows, "verdicts": verdicts,
            "statement": _statement(verdicts)}


def _verdicts(model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Decide, from the numbers only, whether each of the paper's two claims reproduced for one model."""
    fracs = sorted({r["fraction"] for r in rows}, key=_frac_value)
    ntp = {r["fraction"]: r for r in rows if r["taps"] == NTP}
    stp = [r for r in rows if r["taps"] != NTP]
    out: dict[str, Any] = {}
    # -- data efficiency: STP at the smallest fraction vs NTP at the largest
    lo, hi = fracs[0], fracs[-1]
    if hi not in ntp or lo == hi or not [r for r in stp if r["fraction"] == lo]:
        out["data_efficiency"] = {"status": "untested", "text": "needs NTP at the largest fraction and STP arms "
                                  "at a smaller one"}
    else:
        full = ntp[hi]["accuracy"]["mean"]
        small_ntp = ntp[lo]["accuracy"]["mean"] if lo in ntp else None
        candidates = [r for r in stp if r["fraction"] == lo]
        best = max(candidates, key=lambda r: r["accuracy"]["mean"])
        b = best["accuracy"]["mean"]
        ratio = _frac_value(hi) / _frac_value(lo)
        arm = f"lambda {best['lam']:g} / {best['taps']}, the best of {len(candidates)} STP arms there"
        p = best["p_vs_ntp"]
        # the claim itself compares STP on less data with NTP on all of it: pair those by seed too
        full_by_seed = dict(zip(ntp[hi]["seeds"], ntp[hi]["accuracy"]["values"]))
        pairs = [(v, full_by_seed[sd]) for sd, v in zip(best["seeds"], best["accuracy"]["values"])
                 if sd in full_by_seed]
        _, p_full = paired_ttest([x for x, _ in pairs], [y for _, y in pairs]) if len(pairs) >= 2 else (None, None)
        ptxt = (f"paired p = {p:.3g} vs NTP at {lo}" if p is not None else "no paired test (fewer than 2 seeds)")
        if p_full is not None:
            ptxt += f", {p_full:.3g} vs NTP at {hi}"
        if full < 0.02:
            status = "inconclusive"
            text = (f"NTP reaches only {full:.1%} exact match with all the data, too little to measure a data "
                    "saving; train longer or larger")
        elif small_ntp is not None and small_ntp >= full - 0.01:
            status = "inconclusive"
            text = (f"NTP with {lo} of the data ({small_ntp:.1%}) already matches NTP with {hi} ({full:.1%}), so "
                    "there is no data gap for STP to close at this scale")
        elif b >= full:
            status = "reproduced"
            text = (f"STP ({arm}) with {ratio:g}x less data reaches {b:.1%} vs NTP's {full:.1%} with all of it "
                    f"({ptxt})")
        else:
            gap = full - (small_ntp if small_ntp is not None else 0.0)
            closed = (b - (small_ntp if small_ntp is not None else 0.0)) / gap if gap > 0 else 0.0
            status = "not reproduced"
            text = (f"the best STP arm at {lo} of the data ({arm}) reaches {b:.1%} vs NTP's {full:.1%} with all of it"
                    f"{'' if small_ntp is None else f' and {small_ntp:.1%} with {lo}'}; it closes {closed:.0%} of "
                    f"that gap ({ptxt})")
        out["data_efficiency"] = {"status": status, "text": text,
                                  "best_arm": {"lam": best["lam"], "taps": best["taps"]},
                                  "p_vs_ntp_full": p_full}
    sig = [r for r in stp if r["p_vs_ntp"] is not None and r["p_vs_ntp"] < 0.05]
    out["significant"] = [{"lam": r["lam"], "taps": r["taps"], "fraction": r["fraction"],
                           "diff": r["diff_vs_ntp"], "p": r["p_vs_ntp"]} for r in sig]
    out["n_tests"] = sum(1 for r in stp if r["p_vs_ntp"] is not None)
    # -- Figure 4b: held-out STP falls with lambda while CE stays flat (largest fraction)
    fig: dict[str, Any] = {}
    for taps in TAPS:
        pts = [r for r in rows if r["fraction"] == hi and (r["taps"] == taps or r["taps"] == NTP)]
        pts.sort(key=lambda r: r["lam"])
        if len(pts) < 3 or pts[0]["lam"] != 0:
            continue
        key = "heldout_stp_family" if taps == "family" else "heldout_stp_final"
        lams = [r["lam"] for r in pts]
        stps = [r[key]["mean"] for r in pts]
        ces = [r["heldout_ce"]["mean"] for r in pts]
        rho = spearman(lams, stps)
        ce_change = max(abs(c - ces[0]) / ces[0] for c in ces[1:])
        falls = rho is not None and rho <= -0.8 and stps[-1] < stps[0]
        flat = ce_change <= 0.05
        flat_up_to = 0.0  # the largest lambda up to which every held-out CE stays within 5% of NTP's
        for lam, c in zip(lams[1:], ces[1:]):
            if abs(c - ces[0]) / ces[0] > 0.05:
                break
            flat_up_to = lam
        fig[taps] = {"lambdas": lams, "stp": stps, "ce": ces, "spearman": rho, "max_ce_change": ce_change,
                     "ce_flat_up_to": flat_up_to, "stp_falls": falls, "ce_flat": flat, "reproduced": falls and flat}
    if fig:
        good = [t for t, v in fig.items() if v["reproduced"]]
        parts = [f"{t} taps: held-out STP {v['stp'][0]:.3f} -> {v['stp'][-1]:.3f} (Spearman rho "
                 f"{v['spearman'] if v['spearman'] is None else round(v['spearman'], 2)}), CE changes by at most "
                 f"{v['max_ce_change']:.1%} (within 5% of NTP's up to lambda {v['ce_flat_up_to']:g})"
                 for t, v in fig.items()]
        out["figure_4b"] = {"status": "reproduced" if len(good) == len(fig) else "partly reproduced" if good
                            else "not reproduced", "text": "; ".join(parts), "by_taps": fig}
    else:
        out["figure_4b"] = {"status": "untested", "text": "needs lambda 0 and at least two STP lambdas", "by_taps": {}}
    return out


def _statement(verdicts: dict[str, dict[str, Any]]) -> str:
    lines = []
    for model, v in verdicts.items():
        de, fb = v["data_efficiency"], v["figure_4b"]
        sig = v["significant"]
        better = [x for x in sig if x["diff"] > 0]
        worse = [x for x in sig if x["diff"] < 0]
        lines.append(
            f"{model}: data-efficiency effect: {de['status'].upper()} ({de['text']}). "
            f"Figure-4b mechanism: {fb['status'].upper()} ({fb['text']}). "
            f"{len(better)} of {v['n_tests']} STP-vs-NTP paired tests favour STP at p < 0.05 and "
            f"{len(worse)} favour NTP "
            "(uncorrected for multiple comparisons).")
    return "\n".join(lines)


def _pm(x: dict[str, Any], pct: bool = False, digits: int = 4) -> str:
    """``mean +- std`` (sample std over seeds); the mean alone for a single seed."""
    scale, d = (100.0, 1) if pct else (1.0, digits)
    text = f"{scale * x['mean']:.{d}f}"
    return text if len(x.get("values", [])) < 2 else f"{text} +- {scale * x['std']:.{d}f}"


def write_report(summary: dict[str, Any], out: Path, *, command: str = "") -> list[Path]:
    """``results.json``, ``results.md`` and (matplotlib permitting) ``results.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", summary, compact_lists=False)
    st = summary["settings"]
    lines = ["# NL-RX-SYNTH: STP vs next-token prediction, from scratch", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Models: {', '.join(f'{n} `{p}`' for n, p in st['models'])}, d_model {st['d_model']}; "
        f"{st['steps']} steps x batch {st['batch_size']} per arm (equal compute at every data fraction); "
        f"lr {st['lr']}, STP n_spans {st['n_spans']}; lambdas {st['lambdas']} at the largest fraction, "
        f"{st['lambdas'] if st['lambdas_small'] is None else st['lambdas_small']} below it; "
        f"train rows {st['train_rows'] or 'all'}, "
        f"test rows {st['test_rows'] or 'all'}; seeds {st['seeds']}.",
        "",
        "Accuracy: greedy exact match (%) on the test rows. p: paired t-test vs NTP (lambda 0) at the same "
        "fraction and seeds, two-sided. held-out STP: on the arm's own taps (NTP: `final` / per-family).",
        "",
    ]
    table = []
    for r in summary["rows"]:
        stp = (f"{_pm(r['heldout_stp_final'])} / {_pm(r['heldout_stp_family'])}" if r["taps"] == NTP
               else _pm(r["heldout_stp_own"]))
        table.append([r["model"], r["fraction"], f"{r['lam']:g}", r["taps"], _pm(r["accuracy"], True), p_cell(r),
                      _pm(r["heldout_ce"]), stp, f"{r['erank']['mean']:.1f}", str(r["n"])])
    lines.append(md_table(["model", "fraction", "lambda", "taps", "accuracy %", "p vs NTP", "held-out CE",
                           "held-out STP", "eff. rank", "n"], table))
    lines += ["", "## Verdict", "", *[f"- {x}" for x in summary["statement"].splitlines()], ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    written = [out / "results.json", out / "results.md"]
    png = _plot(summary, out / "results.png")
    if png is not None:
        written.append(png)
    return written


def _plot(summary: dict[str, Any], path: Path) -> Path | None:
    rows = summary["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    try:
        fig, axes = new_figure(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    except ImportError:  # the report is complete without the figure
        return None
    import matplotlib

    lams = sorted({r["lam"] for r in rows})
    cmap = matplotlib.colormaps["viridis"]
    for i, m in enumerate(models):
        ax = axes[i][0]
        mr = [r for r in rows if r["model"] == m]
        for key in dict.fromkeys((r["lam"], r["taps"]) for r in mr):
            pts = sorted((r for r in mr if (r["lam"], r["taps"]) == key), key=lambda r: _frac_value(r["fraction"]))
            x = [_frac_value(r["fraction"]) for r in pts]
            y = [100 * r["accuracy"]["mean"] for r in pts]
            e = [100 * r["accuracy"]["std"] for r in pts]
            lam, taps = key
            color = "black" if lam == 0 else cmap(lams.index(lam) / max(1, len(lams) - 1))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=color, ls="-" if taps in (NTP, "final") else "--",
                        label="NTP" if lam == 0 else f"STP {lam:g} {taps}", lw=2 if lam == 0 else 1)
        fraction_axis(ax, [r["fraction"] for r in mr], f"{m} `{mr[0]['pattern']}`: accuracy vs data (equal compute)")
        ax = axes[i][1]
        hi = max((r["fraction"] for r in mr), key=_frac_value)
        ce_ax = ax.twinx()
        for taps, ls in (("final", "-"), ("family", "--")):
            pts = sorted((r for r in mr if r["fraction"] == hi and r["taps"] in (taps, NTP)), key=lambda r: r["lam"])
            if len(pts) < 2:
                continue
            key = "heldout_stp_family" if taps == "family" else "heldout_stp_final"
            xs = list(range(len(pts)))
            ax.errorbar(xs, [r[key]["mean"] for r in pts], yerr=[r[key]["std"] for r in pts], marker="o", ls=ls,
                        color="tab:blue", capsize=3, label=f"held-out STP ({taps} taps)")
            ce_ax.errorbar(xs, [r["heldout_ce"]["mean"] for r in pts], yerr=[r["heldout_ce"]["std"] for r in pts],
                           marker="s", ls=ls, color="tab:red", capsize=3, label=f"held-out CE ({taps} arms)")
            ax.set_xticks(xs, [f"{r['lam']:g}" for r in pts])
        # both axes from 0: a flat CE must look flat, not be magnified by an auto-zoomed twin axis
        ax.set_ylim(bottom=0)
        ce_ax.set_ylim(bottom=0)
        ax.set_xlabel(f"lambda (fraction {hi})")
        ax.set_ylabel("held-out STP loss", color="tab:blue")
        ce_ax.set_ylabel("held-out CE (target tokens)", color="tab:red")
        ax.set_title(f"{m}: Figure-4b check")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ce_ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


