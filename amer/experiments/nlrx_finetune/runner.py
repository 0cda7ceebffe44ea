"""The experiment in order: pretraining, the gate, the learning-rate pick, the grid. Every phase writes what it
finished as it goes (pretraining checkpoints, ``gate.json``, ``OUT/arms/<arm-id>.json``), so running the same
command again continues where it stopped; results from other settings are refused, never mixed in."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from amer.errors import ExperimentError
from amer.experiments.nlrx_finetune.arm import Data, evaluate_model, load_data, pretrained_path, run_arm
from amer.experiments.nlrx_finetune.grid import INITS, Arm, Settings, build_grid, pick_arms
from amer.experiments.nlrx_finetune.pretrain import final_path, pretrain
from amer.model import HybridLM
from amer.report import write_json
from amer.runtime import tune_malloc

__all__ = ["Say", "arm_path", "load_arm", "run_arms", "pick_lrs", "measure_gate", "run_all", "read_all"]

Say = Callable[..., None]
_FIGURES = ("train_ce", "heldout_ce", "heldout_stp_span", "heldout_stp_triple", "erank")


def _say(*args: Any) -> None:
    print(*args, flush=True)


def arm_path(s: Settings, arm: Arm) -> Path:
    return Path(s.out) / "arms" / f"{arm.id}.json"


def _refuse_stale(path: Path, old: Any, s: Settings) -> None:
    new = json.loads(json.dumps(s.fingerprint()))
    if old != new:
        keys = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
        raise ExperimentError(f"{path} was produced with different settings ({', '.join(keys)}); use another --out, "
                              "or delete that directory to start over")


def load_arm(path: Path, s: Settings) -> dict[str, Any]:
    rec = json.loads(path.read_text())
    _refuse_stale(path, rec.get("settings"), s)
    return {k: math.nan if k in _FIGURES and v is None else v for k, v in rec.items()}


def _write_arm(arm: Arm, s: Settings, data: Data) -> dict[str, Any]:
    rec = run_arm(arm, s, data)
    stored = {k: None if k in _FIGURES and isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
    write_json(arm_path(s, arm), stored, compact_lists=False)  # by the worker: a crash elsewhere keeps it
    return rec


_WORKER_DATA: Data | None = None


def _worker_init(s: Settings) -> None:
    global _WORKER_DATA
    tune_malloc()
    torch.set_num_threads(s.threads or 1)
    _WORKER_DATA = load_data(s)


def _worker_arm(job: tuple[Arm, Settings]) -> dict[str, Any]:
    assert _WORKER_DATA is not None
    return _write_arm(job[0], job[1], _WORKER_DATA)


def _worker_pretrain(job: tuple[str, str, Settings]) -> dict[str, Any]:
    torch.set_num_threads(job[2].threads or 1)
    return pretrain(*job, say=_say)


def _pool(s: Settings, n: int, with_data: bool) -> Any:
    import multiprocessing

    # spawn, not fork: a forked child of a process that has run OpenMP regions can deadlock
    ctx = multiprocessing.get_context("spawn")
    return ctx.Pool(n, initializer=_worker_init if with_data else None, initargs=(s,) if with_data else ())


def run_arms(arms: Sequence[Arm], s: Settings, data: Data | None, *, label: str, say: Say = _say) -> list[dict[str, Any]]:
    """Run (or read back) every arm; each is written to ``OUT/arms`` by the process that ran it."""
    (Path(s.out) / "arms").mkdir(parents=True, exist_ok=True)
    have = {a.id: load_arm(arm_path(s, a), s) for a in arms if arm_path(s, a).is_file()}
    todo = [a for a in arms if a.id not in have]
    say(f"{label}: {len(arms)} arms ({len(have)} already done, {len(todo)} to run)")
    workers = min(s.workers, len(todo))
    pool = _pool(s, workers, True) if workers > 1 else None
    if pool is not None:
        results: Iterable[dict[str, Any]] = pool.imap_unordered(_worker_arm, [(a, s) for a in todo])
    else:
        data = data or load_data(s)
        results = (_write_arm(a, s, data) for a in todo)
    t0 = time.perf_counter()
    try:
        for k, rec in enumerate(results, 1):
            have[rec["id"]] = rec
            say(f"[{k}/{len(todo)}] {rec['id']}: acc {rec['accuracy']:.3f} ce {rec['heldout_ce']:.4f} "
                f"stp span/triple {rec['heldout_stp_span']:.4f}/{rec['heldout_stp_triple']:.4f} erank "
                f"{rec['erank']:.1f} ({rec['train_s']:.0f}+{rec['eval_s']:.0f} s; eta "
                f"{(time.perf_counter() - t0) / k * (len(todo) - k) / 60:.1f} min)")
    finally:
        if pool is not None:
            pool.terminate()
    return [have[a.id] for a in arms]


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


def measure_gate(s: Settings, data: Data, say: Say = _say) -> dict[str, Any]:
    """Held-out span-form STP of each pretrained model and of a random initialisation of it (seed 0), cached
    in ``OUT/gate.json``; the from-scratch NTP level is read from the arms later (see the report)."""
    path = Path(s.out) / "gate.json"
    if path.is_file():
        rec = json.loads(path.read_text())
        _refuse_stale(path, rec.get("settings"), s)
        return rec
    from amer.checkpoint import load_checkpoint

    models: dict[str, Any] = {}
    for name, _ in s.models:
        model, cfg = load_checkpoint(pretrained_path(s, name))
        pre = evaluate_model(model, data.test, s, decode=False)  # type: ignore[arg-type]
        torch.manual_seed(0)
        rnd = evaluate_model(HybridLM(cfg), data.test, s, decode=False)
        models[name] = {"pretrained": {k: pre[k] for k in ("heldout_stp_span", "heldout_stp_triple", "heldout_ce")},
                        "random_init": {k: rnd[k] for k in ("heldout_stp_span", "heldout_stp_triple", "heldout_ce")}}
        say(f"gate {name}: held-out span STP pretrained {pre['heldout_stp_span']:.4f}, random init "
            f"{rnd['heldout_stp_span']:.4f}")
    rec = {"settings": s.fingerprint(), "models": models}
    write_json(path, rec, compact_lists=False)
    return rec


def run_all(s: Settings, *, say: Say = _say) -> dict[str, Any]:
    """Every phase, skipping what is on disk; returns what the report needs."""
    Path(s.out).mkdir(parents=True, exist_ok=True)
    # these models are too small for intra-op threads to pay; on a busy machine extra threads thrash
    torch.set_num_threads(s.threads or 1)
    pre: dict[str, Any] = {}
    if s.init is None and "pretrained" in s.inits:
        jobs = [(name, pattern, s) for name, pattern in s.models]
        n = min(s.workers, len(jobs))
        if n > 1:
            pool = _pool(s, n, False)
            try:
                for summary in pool.imap_unordered(_worker_pretrain, jobs):
                    pre[summary["model"]] = summary
            finally:
                pool.terminate()
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
    gate = json.loads(gate_path.read_text()) if gate_path.is_file() else {"models": {}}
    pre = {}
    for name, _ in s.models if s.init is None else []:
        if (final_path(s, name) / "meta.json").is_file():
            pre[name] = json.loads((final_path(s, name) / "meta.json").read_text()).get("summary")
    return {"pretrain": pre, "gate": gate, "picks": picks, "lrs": lrs, "records": grid}


def _keys(s: Settings) -> list[tuple[str, str]]:
    return [(i, m) for i in INITS for m, _ in s.models]

