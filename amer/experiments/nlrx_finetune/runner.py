"""The experiment in order: pretraining, the gate, the learning-rate pick, the grid. Every phase writes what it
finished as it goes (pretraining checkpoints, ``gate.json``, ``OUT/arms/<arm-id>.json``), so running the same
command again continues where it stopped; results from other settings are refused, never mixed in."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from amer.errors import ExperimentError
from amer.experiments import runs
from amer.experiments.nlrx_finetune.arm import Data, evaluate_model, load_data, pretrained_path, run_arm
from amer.experiments.nlrx_finetune.grid import INITS, Arm, Settings, build_grid, pick_arms
from amer.experiments.nlrx_finetune.init import describe, load_model
from amer.experiments.nlrx_finetune.pretrain import final_path, pretrain
from amer.experiments.runs import Say, arm_path, refuse_stale, say
from amer.experiments.workers import imap_unordered
from amer.fileread import json_loads
from amer.model import HybridLM
from amer.report import write_json

__all__ = ["FIGURES", "arm_path", "load_arm", "run_arms", "pick_lrs", "measure_gate", "run_all", "read_all"]

# figures an arm always has; a diverged arm's non-finite ones are stored as null (JSON has no NaN)
FIGURES = ("train_ce", "heldout_ce", "heldout_stp_span", "heldout_stp_triple", "erank")


def load_arm(path: Path, s: Settings) -> dict[str, Any]:
    return runs.read_record(path, s, FIGURES)


def _describe(rec: dict[str, Any]) -> str:
    return (f"acc {rec['accuracy']:.3f} ce {rec['heldout_ce']:.4f} stp span/triple {rec['heldout_stp_span']:.4f}/"
            f"{rec['heldout_stp_triple']:.4f} erank {rec['erank']:.1f} ({rec['train_s']:.0f}+{rec['eval_s']:.0f} s)")


def run_arms(arms: Sequence[Arm], s: Settings, data: Data | None, *, label: str,
             say: Say = say) -> list[dict[str, Any]]:
    """Run (or read back) every arm; each is written to ``OUT/arms`` by the process that ran it."""
    return runs.run_arms(arms, s, run=run_arm, load_data=load_data, figures=FIGURES, describe=_describe, label=label,
                         data=data, say=say)


def _worker_pretrain(job: tuple[str, str, Settings]) -> dict[str, Any]:
    torch.set_num_threads(job[2].threads or 1)
    return pretrain(*job, say=say)


def pick_lrs(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Per (init, model): the lr with the best exact match; ties go to the lower held-out CE."""
    best: dict[tuple[str, str], tuple[float, float, float]] = {}
    for r in records:
        a = r["arm"]
        key = (a["init"], a["model"])
        score = (r["accuracy"], -r["heldout_ce"] if math.isfinite(r["heldout_ce"]) else -math.inf, a["lr"])
        if key not in best or score[:2] > best[key][:2]:
            best[key] = score
    return {k: v[2] for k, v in best.items()}


def measure_gate(s: Settings, data: Data, say: Say = say) -> dict[str, Any]:
    """Held-out span-form STP of each pretrained model and of a random initialisation of it (seed 0), cached
    in ``OUT/gate.json``; the from-scratch NTP level is read from the arms later (see the report)."""
    path = Path(s.out) / "gate.json"
    if path.is_file():
        rec = json_loads(path.read_text())
        refuse_stale(path, rec.get("settings"), s)
        return rec
    models: dict[str, Any] = {}
    for name, _ in s.models:
        model = load_model(str(pretrained_path(s, name)), s.device)
        pre = evaluate_model(model, data.test, s, decode=False)
        del model
        torch.manual_seed(0)
        rnd = evaluate_model(HybridLM(describe(str(pretrained_path(s, name))).cfg).to(s.device), data.test, s,
                             decode=False)
        models[name] = {"pretrained": {k: pre[k] for k in ("heldout_stp_span", "heldout_stp_triple", "heldout_ce")},
                        "random_init": {k: rnd[k] for k in ("heldout_stp_span", "heldout_stp_triple", "heldout_ce")}}
        say(f"gate {name}: held-out span STP pretrained {pre['heldout_stp_span']:.4f}, random init "
            f"{rnd['heldout_stp_span']:.4f}")
    rec = {"settings": s.fingerprint(), "models": models}
    write_json(path, rec, compact_lists=False)
    return rec


def run_all(s: Settings, *, say: Say = say) -> dict[str, Any]:
    """Every phase, skipping what is on disk; returns what the report needs."""
    Path(s.out).mkdir(parents=True, exist_ok=True)
    # these models are too small for intra-op threads to pay; on a busy machine extra threads thrash
    torch.set_num_threads(s.threads or 1)
    pre: dict[str, Any] = {}
    if s.init is None and "pretrained" in s.inits:
        jobs = [(name, pattern, s) for name, pattern in s.models]
        n = min(s.workers, len(jobs))
        if n > 1:
            for summary in imap_unordered(_worker_pretrain, jobs, n):
                pre[summary["model"]] = summary
        else:
            pre = {name: pretrain(name, pattern, s, say=say) for name, pattern, _ in jobs}
    data = load_data(s)
    say(f"data: {len(data.train)} train / {len(data.test)} test examples ({s.data_name})")
    gate = measure_gate(s, data, say) if "pretrained" in s.inits else {"models": {}}
    picks = run_arms(pick_arms(s), s, data, label="learning-rate pick", say=say)
    lrs = pick_lrs(picks)
    for (init, model), lr in sorted(lrs.items()):
        say(f"lr pick {init} {model}: {lr:g}")
    grid = run_arms(build_grid(s, lrs), s, data, label="grid", say=say)
    return {"pretrain": pre, "gate": gate, "picks": picks, "lrs": lrs, "records": grid}


def read_all(s: Settings) -> dict[str, Any]:
    """What :func:`run_all` returns, from the files alone (``--report-only``); refuses when nothing is there."""
    picks = [load_arm(arm_path(s, a), s) for a in pick_arms(s) if arm_path(s, a).is_file()]
    if not picks:
        raise ExperimentError(f"no finished arms of this experiment under {Path(s.out) / 'arms'}")
    lrs = pick_lrs(picks)
    grid_arms = [a for a in build_grid(s, {k: lrs.get(k, math.nan) for k in _keys(s)}) if (a.init, a.model) in lrs]
    grid = [load_arm(arm_path(s, a), s) for a in grid_arms if arm_path(s, a).is_file()]
    gate_path = Path(s.out) / "gate.json"
    gate = json_loads(gate_path.read_text()) if gate_path.is_file() else {"models": {}}
    pre = {}
    for name, _ in s.models if s.init is None else []:
        if (final_path(s, name) / "meta.json").is_file():
            pre[name] = json_loads((final_path(s, name) / "meta.json").read_text()).get("summary")
    return {"pretrain": pre, "gate": gate, "picks": picks, "lrs": lrs, "records": grid}


def _keys(s: Settings) -> list[tuple[str, str]]:
    return [(i, m) for i in INITS for m, _ in s.models]

