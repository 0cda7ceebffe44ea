"""Restoring a training run from a checkpoint: everything in ``meta.json`` and ``optim.safetensors`` is checked
against the freshly built model, optimizer, batch order and generators before any of it is loaded, so a
damaged or foreign checkpoint is a :class:`~amer.errors.CheckpointError` naming the file and the key, never
a crash or a run that quietly continues from the wrong state."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from amer.checkpoint import read_checkpoint, restore_model, restore_optimizer
from amer.configio import INT_MAX
from amer.data import BatchIterator
from amer.errors import CheckpointError

__all__ = ["restore", "init_weights", "rng_pack", "rng_unpack", "check_meta"]


def rng_pack(state: torch.Tensor) -> str:
    """A generator state (uint8 tensor, ~5 kB for CPU Mersenne Twister) as hex: a list of ints made
    meta.json 100 kB and a noticeable part of every checkpoint write."""
    return state.cpu().numpy().tobytes().hex()


def rng_unpack(packed: Any, what: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """The generator state packed by :func:`rng_pack` (or an older list of ints); with ``like``, it must have
    that state's size (another generator's state would be refused by torch with a traceback)."""
    try:
        if isinstance(packed, str):
            data = bytes.fromhex(packed)
        elif isinstance(packed, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in packed):
            data = bytes(packed)
        else:
            raise TypeError
    except (ValueError, TypeError):
        raise CheckpointError(f"meta.json: rng.{what} is not a generator state (expected a hex string)") from None
    if like is not None and len(data) != like.numel():
        raise CheckpointError(f"meta.json: rng.{what} holds {len(data)} bytes, a generator state here has "
                              f"{like.numel()} (saved on another device or torch build?)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def check_meta(meta: dict[str, Any], batches: BatchIterator) -> None:
    """The training keys of a checkpoint's meta.json, by type, before anything is restored from them."""
    where = f"{meta.get('_path', 'checkpoint')}/meta.json"
    lacking = [k for k in ("step", "data_state", "rng", "config") if k not in meta]
    if lacking:
        raise CheckpointError(f"{where} lacks {lacking}: not a training checkpoint, so the run cannot be "
                              "resumed from it")
    step = meta["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= INT_MAX:
        raise CheckpointError(f"{where}: step must be a whole number in [0, 2^63-1], got {step!r:.40}")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{where}: config must be an object (the run's settings), got {meta['config']!r:.40}")
    expected = batches.state_dict()
    state = meta["data_state"]
    if not isinstance(state, dict) or set(state) != set(expected) or not all(
            type(state[k]) is type(v) for k, v in expected.items()):
        shape = ", ".join(f"{k}: {type(v).__name__}" for k, v in expected.items())
        raise CheckpointError(f"{where}: data_state must be {{{shape}}}, got {state!r:.80}")
    rng = meta["rng"]
    if not isinstance(rng, dict) or not {"torch", "stp"} <= set(rng):
        raise CheckpointError(f"{where}: rng must hold the 'torch' and 'stp' generator states, got {rng!r:.60}")
    best = meta.get("best_val")
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best)):
        raise CheckpointError(f"{where}: best_val must be a number or null, got {best!r}")


def restore(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, batches: BatchIterator,
            stp_gen: torch.Generator, say: Callable[[str], None]) -> dict[str, Any]:
    """Load weights, optimizer, data position and RNG states from checkpoint ``path``; returns its meta."""
    device = next(model.parameters()).device
    weights, optim, meta = read_checkpoint(path)
    check_meta(meta, batches)
    torch_state = rng_unpack(meta["rng"]["torch"], "torch", torch.get_rng_state())
    stp_state = rng_unpack(meta["rng"]["stp"], "stp", stp_gen.get_state())
    restore_model(model, {k: v.to(device) for k, v in weights.items()}, source=meta["_path"])
    if optim is not None:
        restore_optimizer(opt, optim, meta, model)
    else:
        say(f"note: {meta['_path']} has no optimizer state (e.g. best/); AdamW restarts from zero moments, "
            "so the run will not match an uninterrupted one")
    batches.load_state_dict(meta["data_state"])
    try:
        torch.set_rng_state(torch_state)
        stp_gen.set_state(stp_state)
    except RuntimeError as e:
        raise CheckpointError(f"{meta['_path']}/meta.json: rng is not a valid generator state "
                              f"({str(e).splitlines()[0]})") from None
    return meta


def init_weights(model: torch.nn.Module, path: str) -> dict[str, Any]:
    """Load the weights of checkpoint, run directory or pretrained folder ``path`` into ``model`` (``--init``):
    weights only; the optimizer, schedule, data order and generators start fresh. Returns the source's meta."""
    weights, _, meta = read_checkpoint(path, with_optimizer=False)
    device = next(model.parameters()).device
    restore_model(model, {k: v.to(device) for k, v in weights.items()}, source=f"--init {meta['_path']}")
    return meta
