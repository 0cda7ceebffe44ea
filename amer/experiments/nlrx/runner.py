"""Running the grid: every unfinished arm, in parallel processes, each written to ``OUT/arms/<arm-id>.json``
as soon as it finishes; arms already on disk are reused when their settings match and refused otherwise."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from amer.experiments.nlrx.arm import evaluate_arm, load_data, run_arm, train_arm
from amer.experiments.nlrx.grid import Arm, Settings, build_grid
from amer.experiments.options import cores
from amer.experiments.runs import Say, arm_path, read_record, run_arms, say

__all__ = ["say", "check_stale", "run_grid", "arm_path", "finished_arms", "FIGURES"]

# figures an arm always has; a diverged arm's non-finite ones are stored as null (JSON has no NaN)
FIGURES = ("train_ce", "heldout_ce", "heldout_stp_final", "heldout_stp_family", "erank")


def finished_arms(s: Settings) -> set[str]:
    """Ids of the arm files under ``OUT/arms`` (of this grid or not; their settings unchecked)."""
    return {p.stem for p in (Path(s.out) / "arms").glob("*.json")}


def check_stale(path: Path, s: Settings) -> dict[str, Any]:
    """The arm record at ``path``, refused when it was produced with settings that change results."""
    return read_record(path, s, FIGURES)


def _describe(rec: dict[str, Any]) -> str:
    skipped = rec.get("skipped_steps", 0)
    return (f"acc {rec['accuracy']:.3f} ce {rec['heldout_ce']:.4f} stp final/family {rec['heldout_stp_final']:.4f}/"
            f"{rec['heldout_stp_family']:.4f} erank {rec['erank']:.1f} ({rec['train_s']:.0f}+{rec['eval_s']:.0f} s, "
            f"cpu {rec['train_cpu_s']:.0f}+{rec['eval_cpu_s']:.0f} s)"
            + (f"; {skipped} non-finite steps skipped" if skipped else ""))


def run_grid(s: Settings, *, say: Say = say) -> list[dict[str, Any]]:
    """Run (or skip, when already written) every arm of the grid; returns all arm records (see
    :func:`amer.experiments.runs.run_arms` for the worker processes)."""
    grid = build_grid(s)
    data = None
    if not all(arm_path(s, a).is_file() for a in grid):
        # loaded here as well as in each worker: bad data is one error from this process, before any worker starts
        data = load_data(s)
        say(f"data: {len(data.train)} train / {len(data.test)} test examples from {s.data_dir}; "
            f"{s.steps} steps x batch {s.batch_size} per arm")
    return run_arms(grid, s, run=run_arm, load_data=load_data, figures=FIGURES, describe=_describe,
                    label=f"nlrx -> {s.out}", data=data, say=say)


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
