"""The report: the gate, the learning-rate pick, means and spreads per arm group, paired tests against NTP, the
decision rule (fixed before any result, written above the results) and a plain verdict; ``results.json``,
``results.md`` and ``results.png``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from amer.analysis.stats import mean_std
from amer.experiments.nlrx_finetune.grid import NTP, SPAN, Settings
from amer.experiments.reporting import frac as _fv
from amer.experiments.reporting import fraction_axis, group_rows, p_cell, paired
from amer.report import atomic_write_text, md_table, new_figure, save_figure, write_json

__all__ = ["DECISION_RULE", "summarize", "write_report"]

DECISION_RULE = (
    "Decided before running, per model, on the arms fine-tuned from the pretrained weights: the paper's claim "
    "reproduces at this scale if (a) some span-form lambda > 0 trained on the smallest data fraction reaches NTP "
    "trained on all the data (mean over seeds of the per-seed difference in exact match >= 0, runs paired by seed; "
    "counted only when NTP itself gains from the data, i.e. NTP on all of it beats NTP on the smallest fraction), "
    "or (b) some span-form lambda > 0 beats NTP on all the data (positive mean difference, paired t-test over seeds "
    "p < 0.05, two-sided, uncorrected). No verdict is given for a model whose gate fails: its pretrained model's "
    "held-out span STP loss on the test rows must be at least `gate_margin` below the from-scratch NTP model's "
    "(mean over seeds, all the data); otherwise the pretrained trajectories are no straighter than those a model "
    "learns from the task alone, and the premise of the paper (STP keeps straight what pretraining made straight) "
    "is not met. The from-scratch grid is the control: the same rule applied to it is reported, not decided on.")

_KEYS = ("accuracy", "heldout_ce", "heldout_stp_span", "heldout_stp_triple", "erank", "train_ce")


def _rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups = group_rows(records, ("init", "model", "form", "lam", "fraction"), _KEYS, extra=("pattern", "lr"))
    rows = []
    for (init, model, form, _lam, frac), row in groups.items():
        row.update({"p_vs_ntp": None, "diff_vs_ntp": None} if form == NTP else
                   paired(row, groups.get((init, model, NTP, 0.0, frac))))
        rows.append(row)
    rows.sort(key=lambda r: (r["init"] != "pretrained", r["model"], -_fv(r["fraction"]), r["form"] != NTP,
                             r["form"], r["lam"]))
    return rows


def _decide(init: str, model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    mine = [r for r in rows if r["init"] == init and r["model"] == model]
    fracs = sorted({r["fraction"] for r in mine}, key=_fv)
    lo, hi = fracs[0], fracs[-1]
    full_ntp = next((r for r in mine if r["form"] == NTP and r["fraction"] == hi), None)
    ntp_mean = {r["fraction"]: r["accuracy"]["mean"] for r in mine if r["form"] == NTP}
    # with no data-size effect (NTP on all the data no better than on the smallest fraction: e.g. both at 0)
    # "reaching NTP on all the data" is no evidence of data efficiency
    informative = lo in ntp_mean and hi in ntp_mean and ntp_mean[hi] > ntp_mean[lo]
    a_tests, b_tests = [], []
    for r in mine:
        if r["form"] != SPAN or r["lam"] == 0:
            continue
        if r["fraction"] == lo and lo != hi and full_ntp:
            d = paired(r, full_ntp)
            a_tests.append({"lam": r["lam"], "diff": d["diff_vs_ntp"], "p": d["p_vs_ntp"], "n": d["n_pairs"],
                            "ok": informative and d["diff_vs_ntp"] is not None and d["diff_vs_ntp"] >= 0})
        if r["fraction"] == hi and r["diff_vs_ntp"] is not None:
            b_tests.append({"lam": r["lam"], "diff": r["diff_vs_ntp"], "p": r["p_vs_ntp"], "n": r.get("n_pairs", 0),
                            "ok": r["diff_vs_ntp"] > 0 and r["p_vs_ntp"] is not None and r["p_vs_ntp"] < 0.05})
    tested = bool(a_tests or b_tests)
    return {"data_efficiency": a_tests, "full_data": b_tests, "fractions": [lo, hi], "informative": informative,
            "status": ("reproduced" if any(t["ok"] for t in a_tests + b_tests) else "not reproduced") if tested
            else "untested"}


def _scratch_level(name: str, top: str, lr: float | None, records: Sequence[dict[str, Any]]) -> list[float]:
    """Held-out span STP of the from-scratch NTP model on all the data, one value per seed, at the picked
    learning rate only: the pick's other rates barely train, and its seed-0 arm is also a grid arm."""
    by_seed = {}
    for r in records:
        a = r["arm"]
        if (a["init"], a["model"], a["form"], a["fraction"]) == ("scratch", name, NTP, top) and \
                (lr is None or a["lr"] == lr):
            by_seed[a["seed"]] = r["heldout_stp_span"]
    return [by_seed[k] for k in sorted(by_seed)]


def _gate(s: Settings, gate: dict[str, Any], records: Sequence[dict[str, Any]],
          lrs: dict[tuple[str, str], float]) -> dict[str, Any]:
    out = {}
    for name, _ in s.models:
        g = gate.get("models", {}).get(name)
        scratch = _scratch_level(name, s.top_fraction, lrs.get(("scratch", name)), records)
        entry: dict[str, Any] = {"pretrained": g["pretrained"]["heldout_stp_span"] if g else None,
                                 "random_init": g["random_init"]["heldout_stp_span"] if g else None,
                                 "scratch_ntp": mean_std(scratch)[0] if scratch else None, "n_scratch": len(scratch),
                                 "margin": s.gate_margin}
        if not s.gate:  # a model pretrained at scale: measured for the record, never withholds the verdict
            entry["status"] = "not applied"
        elif entry["pretrained"] is None or entry["scratch_ntp"] is None:
            entry["status"] = "unmeasured"
        else:
            entry["status"] = "passed" if entry["pretrained"] <= entry["scratch_ntp"] - s.gate_margin else "failed"
        out[name] = entry
    return out


def summarize(res: dict[str, Any], s: Settings) -> dict[str, Any]:
    records = res["records"]
    rows = _rows(records)
    gate = _gate(s, res["gate"], list(res["picks"]) + list(records), res["lrs"])
    decisions = {f"{i}/{m}": _decide(i, m, rows) for i in s.inits for m, _ in s.models}
    lines = []
    for name, _ in s.models:
        g = gate[name]
        pre = decisions.get(f"pretrained/{name}")
        ctl = decisions.get(f"scratch/{name}")
        if "pretrained" not in s.inits:
            head = f"{name}: no pretrained arms, so no verdict"
        elif g["status"] not in ("passed", "not applied"):
            head = (f"{name}: GATE {g['status'].upper()}: held-out span STP of the pretrained model "
                    f"{_num(g['pretrained'])} vs {_num(g['scratch_ntp'])} for the from-scratch NTP model (random init "
                    f"{_num(g['random_init'])}; needed at least {s.gate_margin:g} lower). A model this small, "
                    "pretrained this briefly, lacks the straight geometry the paper relies on; no verdict on STP")
        else:
            head = f"{name}: claim {pre['status'].upper()} when fine-tuning the pretrained model ({_explain(pre)})"
        if ctl is not None:
            head += f". Control from scratch: {ctl['status']} ({_explain(ctl)})"
        lines.append(head + ".")
    return {"settings": {**asdict(s), "fingerprint": s.fingerprint()}, "data": s.data_name,
            "decision_rule": DECISION_RULE, "gate": gate, "lrs": {f"{i}/{m}": v for (i, m), v in res["lrs"].items()},
            "pretrain": res["pretrain"], "rows": rows, "decisions": decisions, "statement": "\n".join(lines)}


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _explain(d: dict[str, Any]) -> str:
    lo, hi = d["fractions"]
    best_a = max(d["data_efficiency"], key=lambda t: t["diff"] if t["diff"] is not None else -1, default=None)
    best_b = min(d["full_data"], key=lambda t: t["p"] if t["p"] is not None else 2, default=None)
    parts = []
    if best_a is not None:
        parts.append(f"best STP at {lo} vs NTP at {hi}: lambda {best_a['lam']:g}, "
                     f"{100 * (best_a['diff'] or 0):+.1f} points over {best_a['n']} seeds"
                     + ("" if d["informative"] else " (uninformative: NTP does not gain from more data here)"))
    if best_b is not None:
        p = "n/a" if best_b["p"] is None else f"{best_b['p']:.3g}"
        parts.append(f"lowest-p STP vs NTP at {hi}: lambda {best_b['lam']:g}, {100 * best_b['diff']:+.1f} points, "
                     f"p = {p}")
    return "; ".join(parts) or "no STP arms"


def _pm(x: dict[str, Any], pct: bool = False) -> str:
    scale, d = (100.0, 1) if pct else (1.0, 4)
    text = f"{scale * x['mean']:.{d}f}"
    return text if len(x["values"]) < 2 else f"{text} +- {scale * x['std']:.{d}f}"


def write_report(summary: dict[str, Any], out: Path, *, command: str = "") -> list[Path]:
    """``results.json``, ``results.md`` and (matplotlib permitting) ``results.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", summary, compact_lists=False)
    st = summary["settings"]
    lines = [f"# {summary['data']}: STP when fine-tuning pretrained models (span form), with a from-scratch control",
             ""]
    if command:
        lines += ["```", command, "```", ""]
    source = f"`{st['init']}`" if st["init"] else (
        f"pretrained here on kjv + stdlib, {st['pretrain_epochs']:g} epoch(s) of {st['pretrain_seq_len']}-token rows")
    lines += [f"Models: {', '.join(f'{n} `{p}`' for n, p in st['models'])}, d_model {st['d_model']}, {source}. "
              f"Fine-tuning: {st['epochs']:g} epochs of each data fraction, batch {st['batch_size']}, AdamW "
              f"(weight decay {st['weight_decay']:g}), linear decay without warm-up, "
              f"NTP targets `{st['ntp_targets']}`, STP on the final state, span form with {st['n_spans']} patch(es) "
              "per example (triple bridge arm: "
              f"{st['triple_spans']} triples); lambdas {st['lambdas']}; seeds {st['seeds']}; train rows "
              f"{st['train_rows'] or 'all'}, test rows {st['test_rows'] or 'all'}.", "",
              "## Decision rule", "", summary["decision_rule"], "", "## Gate", ""]
    lines.append(md_table(["model", "pretrained", "random init", "from-scratch NTP", "status"],
                          [[m, _num(g["pretrained"]), _num(g["random_init"]), _num(g["scratch_ntp"]), g["status"]]
                           for m, g in summary["gate"].items()]))
    lines += ["", "Held-out span-form STP loss of the final state on the test rows (lower = straighter).", "",
              "Learning rates picked (NTP, all the data, first seed, best exact match): "
              + ", ".join(f"{k} {v:g}" for k, v in summary["lrs"].items()), "", "## Results", "",
              "Accuracy: greedy exact match (%). diff and p: mean per-seed difference in points and paired t-test "
              "(two-sided) vs NTP of the same init, model and fraction, paired over shared seeds.", ""]
    table = [[r["init"], r["model"], r["fraction"], r["form"], f"{r['lam']:g}", _pm(r["accuracy"], True),
              "-" if r["diff_vs_ntp"] is None else f"{100 * r['diff_vs_ntp']:+.1f}", p_cell(r), _pm(r["heldout_ce"]),
              _pm(r["heldout_stp_span"]), _pm(r["heldout_stp_triple"]), f"{r['erank']['mean']:.1f}", str(r["n"])]
             for r in summary["rows"]]
    lines.append(md_table(["init", "model", "fraction", "form", "lambda", "accuracy %", "diff vs NTP", "p vs NTP",
                           "held-out CE", "held-out STP span", "held-out STP triple", "eff. rank", "n"], table))
    lines += ["", "## Verdict", "", *[f"- {x}" for x in summary["statement"].splitlines()], ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    written = [out / "results.json", out / "results.md"]
    png = _plot(summary, out / "results.png")
    return written + ([png] if png is not None else [])


def _plot(summary: dict[str, Any], path: Path) -> Path | None:
    rows = summary["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return None
    try:
        fig, axes = new_figure(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    except ImportError:  # the report is complete without the figure
        return None
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    lams = sorted({r["lam"] for r in rows})
    for ax, m in zip(axes[0], models):
        mr = [r for r in rows if r["model"] == m]
        for key in dict.fromkeys((r["init"], r["form"], r["lam"]) for r in mr):
            pts = sorted((r for r in mr if (r["init"], r["form"], r["lam"]) == key), key=lambda r: _fv(r["fraction"]))
            init, form, lam = key
            color = "black" if form == NTP else cmap(lams.index(lam) / max(1, len(lams) - 1))
            ax.errorbar([_fv(r["fraction"]) for r in pts], [100 * r["accuracy"]["mean"] for r in pts],
                        yerr=[100 * r["accuracy"]["std"] for r in pts], marker="o" if form != "triple" else "^",
                        capsize=3, color=color, ls="-" if init == "pretrained" else ":",
                        label=f"{init} {'NTP' if form == NTP else f'{form} {lam:g}'}")
        fraction_axis(ax, [r["fraction"] for r in mr], f"{m} `{mr[0]['pattern']}`: fine-tuned (solid) vs from "
                      "scratch (dotted)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
