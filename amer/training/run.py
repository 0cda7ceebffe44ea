"""A run directory: created fresh (or afresh with ``--overwrite``) or resumed, its config, its checkpoints (with
everything needed to continue bit-identically: optimizer, RNG states, data position) and their pruning.

amer only writes into a run directory it created: ``amer-run.json`` (the run id) marks one, and resume
refuses any other directory. It only deletes what it wrote, by name (:mod:`amer.fileio`): whatever else is
in a run directory survives resume, pruning and ``--overwrite``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from amer.checkpoint import (
    CHECKPOINT_FILES,
    checkpoint_step,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from amer.config import TrainConfig, to_dict
from amer.configio import INT_MAX
from amer.data import BatchIterator
from amer.errors import CheckpointError, ConfigError, TrainingError
from amer.fileio import fault_point, json_text, own_temp_files, recover_dirs, refuse_link, remove_own_files, write_json
from amer.fileread import json_loads, read_file
from amer.training.restore import restore, rng_pack, rng_unpack
from amer.training.runlock import LOCK_NAME, RunLock, acquire, ensure_free

__all__ = ["RunState", "Target", "MARKER", "prepare", "claim", "open_run", "new_run_dir", "locate", "resume_config",
           "checkpoint", "prune", "rng_pack", "rng_unpack", "config_record"]

MARKER = "amer-run.json"  # {"run_id": ...}: this directory was created by amer train
RUN_FILES = (MARKER, "config.json", "log.jsonl", "tokenizer.json", "curves.png")


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    best_val: float = float("inf")
    run_id: str | None = None


class Target(NamedTuple):
    """Where a run goes: its directory and, when resuming, the checkpoint to restore (None: from step 0)."""

    run_dir: Path
    checkpoint: Path | None
    resume: bool


def _run_id(run_dir: Path) -> str | None:
    """The run id in ``run_dir``'s marker; None for a marker without one (added by hand to adopt a run)."""
    try:
        data = json_loads(read_file(run_dir / MARKER) or b"{}")
    except (OSError, ValueError):
        return None
    rid = data.get("run_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) else None


def _is_run_dir(path: Path) -> bool:
    return (path / MARKER).is_file()


def _is_checkpoint(path: Path) -> bool:
    return (path / "meta.json").exists() or (path / "model.safetensors").exists()


def locate(path: str | Path) -> Target:
    """The run directory and checkpoint ``--resume PATH`` means. PATH is a run directory amer created (its
    latest checkpoint, or step 0 when it has none) or a checkpoint inside one; anything else is refused."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if _is_run_dir(p):
        steps = list_checkpoints(p)
        if steps:
            return Target(p, steps[-1], True)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"no checkpoint and no config.json in {p}: nothing to resume; start a new run "
                                  f"with --run-name, or --overwrite to start this one afresh")
        return Target(p, None, True)
    if _is_checkpoint(p) and _is_run_dir(p.parent):
        return Target(p.parent, p, True)
    where = p.parent if _is_checkpoint(p) else p
    what = f"checkpoint {p} is not inside" if _is_checkpoint(p) else f"{p} is not"
    raise CheckpointError(f"{what} a run directory amer train created (no {MARKER} in {where}), so resume will "
                          f"not write there; pass a run directory amer train made, or one of its step_* checkpoints "
                          f"(a run of an older amer: add an empty {MARKER} to its directory)")


def resume_config(path: str | Path) -> dict[str, Any]:
    """The resolved config a resumed run starts from: its checkpoint's, or its config.json without one."""
    target = locate(path)
    if target.checkpoint is not None:
        meta = read_checkpoint(target.checkpoint, with_optimizer=False)[2]
        source, config = f"{meta['_path']}/meta.json", meta.get("config")
    else:
        source = str(target.run_dir / "config.json")
        try:
            config = json_loads(read_file(target.run_dir / "config.json"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{source}: not a readable JSON config ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{source}: config must be an object with a model section, got {config!r:.40}")
    return config


def _check_out_dir(out: Path) -> None:
    """Refuse an --out-dir that cannot hold run directories before any slow work (nothing is created yet)."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"--out-dir {out}: {probe} is a file, not a directory")


def new_run_dir(cfg: TrainConfig) -> Path:
    """``out_dir/run_name`` (default ``<preset>-<time>``). An existing non-empty one is refused unless it is a run
    directory amer created and ``--overwrite`` is given (its files are then replaced when the run starts)."""
    name = cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out_dir) / name
    _check_out_dir(Path(cfg.out_dir))
    if run_dir.is_symlink() and not run_dir.exists():
        raise ConfigError(f"run directory {run_dir} is a symbolic link to {run_dir.readlink()}, which does not "
                          "exist; choose another --run-name or remove the link")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file; choose another --run-name")
    if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        if not _is_run_dir(run_dir):
            raise ConfigError(f"{run_dir} already exists and was not created by amer train (no {MARKER}); "
                              "nothing in it is touched: choose another --run-name or --out-dir")
        if not cfg.overwrite:
            resumable = "its last checkpoint" if list_checkpoints(run_dir) else "step 0 (it has no checkpoint yet)"
            raise ConfigError(f"run directory {run_dir} already exists; pass --resume {run_dir} to continue it from "
                              f"{resumable}, --overwrite to start it afresh (its checkpoints and logs are deleted), "
                              "or --run-name NEW for a new run")
    return run_dir


def prepare(cfg: TrainConfig) -> Target:
    """The run's directory, checked before any slow work: a clash or a foreign directory fails at once."""
    return locate(cfg.resume) if cfg.resume else Target(new_run_dir(cfg), None, False)


def claim(cfg: TrainConfig) -> tuple[Target, RunLock]:
    """:func:`prepare`, then the run directory's lock (:mod:`amer.training.runlock`; a run still training there
    is refused, naming it), then :func:`prepare` again under the lock: another run may have created, finished
    or extended the directory in between. Rank 0 alone calls it under torchrun."""
    try:
        run_dir = prepare(cfg).run_dir
    except ConfigError:  # "already exists": when a run is still training there, that is what to say
        if cfg.run_name is not None and not cfg.resume:
            ensure_free(Path(cfg.out_dir) / cfg.run_name)
        raise
    try:
        lock = acquire(run_dir)
    except OSError as e:  # the place cannot hold a run (read-only, full, not a directory): before any work
        doing = "write to" if cfg.resume else "create"
        raise ConfigError(f"cannot {doing} run directory {run_dir}: {e.strerror or e}") from None
    try:
        return prepare(cfg), lock
    except BaseException:
        lock.release()
        raise


def _create(run_dir: Path, overwrite: bool) -> str:
    """Make ``run_dir`` (clearing amer's own files from it with ``overwrite``) and mark it; returns the run id."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite and _is_run_dir(run_dir):
            _clear(run_dir)
        run_id = uuid.uuid4().hex
        write_json(run_dir / MARKER, {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError as e:
        raise ConfigError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    return run_id


def _is_step_or_best(name: str) -> bool:
    return name == "best" or checkpoint_step(Path(name)) is not None


def _clear(run_dir: Path) -> None:
    """What ``--overwrite`` deletes: the checkpoints, logs, config and TensorBoard events amer wrote."""
    run_id = _run_id(run_dir)
    recover_dirs(run_dir, _is_step_or_best, CHECKPOINT_FILES)
    for ck in [*list_checkpoints(run_dir), run_dir / "best"]:
        if ck.is_dir() and _written_by(ck, run_id):
            remove_own_files(ck, CHECKPOINT_FILES)
    for p in [*own_temp_files(run_dir, lambda n: n in RUN_FILES), *run_dir.glob("events.out.tfevents.*")]:
        if p.is_file() and not p.is_symlink():
            p.unlink()
    for name in RUN_FILES:
        if not (run_dir / name).is_symlink():  # a link is not amer's (it never makes one): left alone
            (run_dir / name).unlink(missing_ok=True)


def open_run(target: Target, cfg: TrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer,
             batches: BatchIterator, stp_gen: torch.Generator, say: Callable[[str], None],
             stop_at: int | None = None) -> RunState:
    """Restore (resume) or create the run directory, then write its config (``cfg`` as resolved: see
    :mod:`amer.training.resolve`). Everything that can be refused is checked before the first byte is written."""
    run_dir, state = target.run_dir, RunState()
    for name in (*RUN_FILES, "best"):  # files amer rewrites: a link there would lead the write elsewhere
        refuse_link(run_dir / name)
    if target.resume:
        state.run_id = _run_id(run_dir)
        if target.checkpoint is not None:
            meta = restore(str(target.checkpoint), model, opt, batches, stp_gen, say)
            if state.run_id and meta.get("run_id") not in (None, state.run_id):
                raise CheckpointError(f"{meta['_path']} belongs to another run (run id {meta['run_id']}, "
                                      f"{run_dir / MARKER} has {state.run_id}); resume it from its own run directory")
            best = meta.get("best_val")
            state.step, state.best_val = meta["step"], float("inf") if best is None else float(best)
        for limit, flag in ((cfg.steps, "--steps"), (stop_at, "--stop-at")):
            if limit is not None and limit < state.step:
                more = (f"pass {flag} {state.step + 1} or more" if state.step < INT_MAX else
                        "and no step is left after it (2^63-1 is the last step amer counts)")
                raise ConfigError(f"{flag} {limit} is below the step of the checkpoint being resumed "
                                  f"({state.step}): nothing to train; {more}")
        # a run killed part-way may have left temporaries, or a best/ moved aside mid-swap: finish those first
        recover_dirs(run_dir, _is_step_or_best, CHECKPOINT_FILES)
        for p in own_temp_files(run_dir, lambda n: n in RUN_FILES):
            if p.is_file():
                p.unlink()
        say(f"resuming {target.checkpoint} at step {state.step}" if target.checkpoint is not None else
            f"no checkpoint in {run_dir}: starting it again from step 0 with its config.json")
        if state.step == min(cfg.steps, stop_at or cfg.steps):
            say(f"already at step {state.step}: nothing to train")
        write_json(run_dir / "config.json", config_record(cfg))
        return state
    state.run_id = _create(run_dir, cfg.overwrite)
    try:
        write_json(run_dir / "config.json", config_record(cfg))
    except BaseException:  # a new run that cannot write its config (a full disk) leaves nothing behind
        remove_own_files(run_dir, (MARKER, "config.json"))
        raise
    return state


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as ``config.json`` and every checkpoint's meta record it (what ``--resume`` starts
    from: a continued run does not resume again or overwrite)."""
    return {**to_dict(cfg), "resume": None, "overwrite": False}


def checkpoint(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: RunState,
               val: dict[str, float] | None, resolved: dict[str, Any], batches: BatchIterator,
               stp_gen: torch.Generator, keep_last: int, tokenizer: Any = None) -> None:
    """``step_NNNNNN/`` (and ``best/`` when the validation loss improved), keeping the last ``keep_last``.
    ``val`` None: a checkpoint between evaluations (a stop's), never ``best/``. A model with non-finite weights
    is never written."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # finite loss but an update produced inf/NaN weights
        raise TrainingError(f"step {state.step}: parameter {bad[0]} became non-finite; stopping without "
                            f"writing a checkpoint; lower --lr")
    is_best = val is not None and val["val/loss"] < state.best_val
    if val is not None:
        state.best_val = min(state.best_val, val["val/loss"])
    meta = {"config": resolved, "run_id": state.run_id, "step": state.step,
            "best_val": state.best_val if math.isfinite(state.best_val) else None, "val": val,
            "data_state": batches.state_dict(),
            "rng": {"torch": rng_pack(torch.get_rng_state()), "stp": rng_pack(stp_gen.get_state())}}
    json_text(meta)  # a non-finite figure fails here, before any file is written
    save_checkpoint(run_dir / f"step_{state.step:06d}", model, opt, meta, tokenizer=tokenizer)
    if is_best:
        save_checkpoint(run_dir / "best", model, None, meta, tokenizer=tokenizer)
    prune(run_dir, keep_last, state.run_id)


def _written_by(ck: Path, run_id: str | None) -> bool:
    """Whether checkpoint ``ck`` was written by run ``run_id`` (one copied in from another run was not; a link to
    a checkpoint was not written here either: amer never makes one)."""
    if ck.is_symlink():
        return False
    try:
        meta = json_loads(read_file(ck / "meta.json"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("run_id") in (None, run_id)


def prune(run_dir: Path, keep_last: int, run_id: str | None = None) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints of run ``run_id`` (newest by step number), file
    by file; a checkpoint another run wrote is left alone."""
    for old in [ck for ck in list_checkpoints(run_dir) if _written_by(ck, run_id)][:-keep_last]:
        fault_point("prune")
        remove_own_files(old, CHECKPOINT_FILES)
