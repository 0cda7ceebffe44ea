"""Running the grid: every unfinished arm, in parallel processes, each written to ``OUT/arms/<arm-id>.json``
as soon as it finishes; arms already on disk are reused when their settings match and refused otherwise."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from amer.errors import ExperimentError
from amer.experiments.nlrx.arm import Data, evaluate_arm, load_data, run_arm, train_arm
from amer.experiments.nlrx.grid import Arm, Settings, build_grid
from amer.report import write_json
from amer.runtime import tune_malloc

__all__ = ["say", "check_stale", "run_grid", "arm_path", "finished_arms"]

Say = Callable[..., None]


def say(*args: Any) -> None:
    print(*args, flush=True)


def arm_path(s: Settings, arm: Arm) -> Path:
    return Path(s.out) / "arms" / f"{arm.id}.json"


def finished_arms(s: Settings) -> set[str]:
    """Ids of the arm files under ``OUT/arms`` (of this grid or not; their settings unchecked)."""
    return {p.stem for p in (Path(s.out) / "arms").glob("*.json")}


# figures an arm always has; a diverged arm's non-finite ones are stored as null (JSON has no NaN) and read back as NaN
_FIGURES = ("train_ce", "heldout_ce", "heldout_stp_final", "heldout_stp_family", "erank")


def check_stale(path: Path, s: Settings) -> dict[str, Any]:
    """The arm record at ``path``, refused when it was produced with settings that change results."""
    rec = from_stored(json.loads(path.read_text()))
    old = rec.get("settings", {})
    new = json.loads(json.dumps(s.fingerprint()))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ExperimentError(f"{path} was produced with different settings ({changes}); "
                              "use another --out, or delete that directory to start over")
    return rec


def _run_and_write(arm: Arm, s: Settings, data: Data) -> dict[str, Any]:
    rec = run_arm(arm, s, data)
    write_json(arm_path(s, arm), storable(rec), compact_lists=False)  # by the worker: a crash elsewhere keeps it
    return rec


def storable(rec: dict[str, Any]) -> dict[str, Any]:
    """An arm record as strict JSON can hold it: a diverged arm's non-finite figure becomes null, so the
    trained arm is kept (see :func:`from_stored`)."""
    return {k: None if k in _FIGURES and isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}


def from_stored(rec: dict[str, Any]) -> dict[str, Any]:
    """The record :func:`storable` wrote, with its missing figures back as NaN."""
    return {k: math.nan if k in _FIGURES and v is None else v for k, v in rec.items()}


_WORKER_DATA: Data | None = None


def _worker_init(s: Settings) -> None:
    global _WORKER_DATA
    tune_malloc()
    torch.set_num_threads(s.threads or 1)
    _WORKER_DATA = load_data(s)


def _worker_run(job: tuple[Arm, Settings]) -> dict[str, Any]:
    arm, s = job
    assert _WORKER_DATA is not None
    return _run_and_write(arm, s, _WORKER_DATA)


def run_grid(s: Settings, *, say: Say = say) -> list[dict[str, Any]]:
    """Run (or skip, when already written) every arm of the grid; returns all arm records.

    With ``s.workers > 1`` arms run in that many processes of ``s.threads or 1`` torch threads each:
    these models are too small for intra-op threads to pay, so two single-threaded arms at once on
    two cores nearly double the throughput of one two-threaded arm.
    """
    out = Path(s.out)
    (out / "arms").mkdir(parents=True, exist_ok=True)
    grid = build_grid(s)
    have = {a.id: check_stale(arm_path(s, a), s) for a in grid if arm_path(s, a).is_file()}
    todo = [a for a in grid if a.id not in have]
    say(f"nlrx: {len(grid)} arms ({len(have)} already done, {len(todo)} to run) -> {out}")
    if todo:
        data = load_data(s)
        say(f"data: {len(data.train)} train / {len(data.test)} test examples from {s.data_dir}; "
            f"{s.steps} steps x batch {s.batch_size} per arm")
    t_start = time.perf_counter()
    workers = min(s.workers, len(todo))
    if workers > 1:
        import multiprocessing

        # spawn, not fork: a forked child of a process that has run OpenMP regions can deadlock
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(s,))
        results: Iterable[dict[str, Any]] = pool.imap_unordered(_worker_run, [(a, s) for a in todo])
    else:
        pool = None
        results = (_run_and_write(a, s, data) for a in todo)
    try:
        for k, rec in enumerate(results, 1):
            have[rec["id"]] = rec
            _report_arm(k, len(todo), rec, time.perf_counter() - t_start, say)
    finally:
        if pool is not None:
            pool.terminate()
    return [have[a.id] for a in grid]


def _report_arm(k: int, n: int, rec: dict[str, Any], elapsed: float, say: Say) -> None:
    skipped = rec.get("skipped_steps", 0)
    say(f"[{k}/{n}] {rec['id']}: acc {rec['accuracy']:.3f} ce {rec['heldout_ce']:.4f} "
        f"stp final/family {rec['heldout_stp_final']:.4f}/{rec['heldout_stp_family']:.4f} erank {rec['erank']:.1f} "
        f"({rec['train_s']:.0f}+{rec['eval_s']:.0f} s, cpu {rec['train_cpu_s']:.0f}+{rec['eval_cpu_s']:.0f} s; "
        f"eta {elapsed / k * (n - k) / 60:.1f} min)" + (f"; {skipped} non-finite steps skipped" if skipped else ""))


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def estimate(s: Settings, *, timed_steps: int = 20, say: Say = say) -> float:
    """Wall-clock seconds the grid's unfinished arms should take, printed with its parts.

    Per model: the mean time of ``timed_steps`` training steps of a per-family STP arm (the dearest
    arm) times ``steps``, plus one evaluation of the test rows by the barely trained model (it never
    emits EOS, so decoding runs its whole budget: an upper bound). Arms are spread over
    ``min(workers, cores)`` processes, each with the thread count a worker would use. Both wall and
    process CPU time are measured: on a machine busy with other work the CPU figure (with one thread
    per worker) is what the grid would take with the cores to itself.
    """
    torch.set_num_threads(s.threads or (1 if s.workers > 1 else torch.get_num_threads()))
    data = load_data(s)
    grid = build_grid(s)
    done = finished_arms(s)
    per_model: dict[str, dict[str, float]] = {}
    for name, pattern in s.models:
        arm = Arm(name, pattern, max(s.lambdas) or 0.02, "family", s.fractions[0], 0)
        probe = Settings(**{**asdict(s), "steps": timed_steps})
        model, tr = train_arm(arm, probe, data)
        ev = evaluate_arm(model, data.test, s)
        m = {"step": tr["train_s"] / timed_steps, "step_cpu": tr["train_cpu_s"] / timed_steps,
             "eval": ev["eval_s"], "eval_cpu": ev["eval_cpu_s"]}
        per_model[name] = m
        say(f"estimate {name} `{pattern}`: {m['step'] * 1000:.0f} ms/step wall, {m['step_cpu'] * 1000:.0f} ms CPU "
            f"(batch {s.batch_size}); evaluation of {len(data.test)} test rows {m['eval']:.1f} s wall, "
            f"{m['eval_cpu']:.1f} s CPU; {tr['params']:,} parameters, {torch.get_num_threads()} torch thread(s)")
    todo = [a for a in grid if a.id not in done]
    par = max(1, min(s.workers, cores(), len(todo) or 1))
    wall = sum(per_model[a.model]["step"] * s.steps + per_model[a.model]["eval"] for a in todo) / par
    cpu = sum(per_model[a.model]["step_cpu"] * s.steps + per_model[a.model]["eval_cpu"] for a in todo) / par
    say(f"grid: {len(grid)} arms, {len(todo)} to run, {s.steps} steps each, {par} worker(s): about {wall / 60:.0f} min "
        f"at this machine's current speed, {cpu / 60:.0f} min with {par} core(s) to itself")
    return wall
