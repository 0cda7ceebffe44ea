"""A run directory: created fresh or resumed, its config, its checkpoints (with everything needed to
continue bit-identically: optimizer, RNG states, data position) and their pruning."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from amer.checkpoint import list_checkpoints, read_checkpoint, restore_model, restore_optimizer, save_checkpoint
from amer.config import TrainConfig, to_dict
from amer.data import BatchIterator
from amer.errors import CheckpointError, ConfigError, TrainingError

__all__ = ["RunState", "new_run_dir", "resume", "checkpoint", "rng_pack", "rng_unpack"]


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    best_val: float = float("inf")


def new_run_dir(cfg: TrainConfig) -> Path:
    """``out_dir/run_name`` (default ``<preset>-<time>``); an existing non-empty one is refused, never reused."""
    name = cfg.run_name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already exists; pass --resume {run_dir} to continue it "
                          "or --run-name NEW for a new run (nothing is overwritten)")
    return run_dir


def resume(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, batches: BatchIterator,
           stp_gen: torch.Generator, say: Callable[[str], None]) -> tuple[Path, RunState]:
    """Load weights, optimizer, data position and RNG states from a checkpoint; returns its run directory."""
    device = next(model.parameters()).device
    weights, optim, meta = read_checkpoint(path)
    lacking = [k for k in ("step", "data_state", "rng") if k not in meta]
    if lacking:
        raise CheckpointError(f"{meta['_path']}/meta.json lacks {lacking}: not a training checkpoint, "
                              "so the run cannot be resumed from it")
    restore_model(model, {k: v.to(device) for k, v in weights.items()}, source=meta["_path"])
    if optim is not None:
        restore_optimizer(opt, optim, meta)
    else:
        say(f"note: {meta['_path']} has no optimizer state (e.g. best/); AdamW restarts from zero moments, "
            "so the run will not match an uninterrupted one")
    batches.load_state_dict(meta["data_state"])
    torch.set_rng_state(rng_unpack(meta["rng"]["torch"], "torch"))
    stp_gen.set_state(rng_unpack(meta["rng"]["stp"], "stp"))
    run_dir = Path(meta["_path"]).parent
    for stale in run_dir.glob(".tmp-*"):  # a checkpoint write killed part-way (never under a real name)
        shutil.rmtree(stale, ignore_errors=True)
    say(f"resuming {meta['_path']} at step {meta['step']}")
    return run_dir, RunState(meta["step"], meta.get("best_val", float("inf")))


def write_config(run_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """``config.json``: the resolved config (what ``--resume`` starts from)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**to_dict(cfg), "resume": None}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    return resolved


def checkpoint(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: RunState,
               val: dict[str, float], resolved: dict[str, Any], batches: BatchIterator, stp_gen: torch.Generator,
               keep_last: int) -> None:
    """``step_NNNNNN/`` (and ``best/`` when the validation loss improved), keeping the last ``keep_last``.
    A model with non-finite weights is never written."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # finite loss but an update produced inf/NaN weights
        raise TrainingError(f"step {state.step}: parameter {bad[0]} became non-finite; stopping without "
                            f"writing a checkpoint; lower --lr")
    is_best = val["val/loss"] < state.best_val
    state.best_val = min(state.best_val, val["val/loss"])
    meta = {"config": resolved, "step": state.step, "best_val": state.best_val, "val": val,
            "data_state": batches.state_dict(),
            "rng": {"torch": rng_pack(torch.get_rng_state()), "stp": rng_pack(stp_gen.get_state())}}
    save_checkpoint(run_dir / f"step_{state.step:06d}", model, opt, meta)
    if is_best:
        save_checkpoint(run_dir / "best", model, None, meta)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def rng_pack(state: torch.Tensor) -> str:
    """A generator state (uint8 tensor, ~5 kB for CPU Mersenne Twister) as hex: a list of ints made
    meta.json 100 kB and a noticeable part of every checkpoint write."""
    return state.cpu().numpy().tobytes().hex()


def rng_unpack(packed: str | list[int], what: str) -> torch.Tensor:
    try:
        data = bytes.fromhex(packed) if isinstance(packed, str) else bytes(packed)
    except (ValueError, TypeError):
        raise CheckpointError(f"meta.json: rng.{what} is not a generator state") from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
