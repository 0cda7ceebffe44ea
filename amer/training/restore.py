"""Restoring a training run from a checkpoint: everything in ``meta.json`` and ``optim.safetensors`` is checked
against the freshly built model, optimizer, batch order and generators before any of it is loaded, so a
damaged or foreign checkpoint is a :class:`~amer.errors.CheckpointError` naming the file and the key, never
a crash or a run that quietly continues from the wrong state."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from amer import sharded
from amer.checkpoint import check_weights, read_checkpoint, read_meta, restore_model, restore_optimizer
from amer.configio import INT_MAX
from amer.data import BatchIterator
from amer.errors import CheckpointError
from amer.optimstate import checked_state_dict
from amer.weights import check_finite, load_tensors

__all__ = ["restore", "restore_position", "restore_sharded", "read_position", "unit_source", "named_optimizer_state",
           "init_weights", "rng_pack", "rng_unpack", "check_meta"]


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
    """Load weights, optimizer, data position and RNG states from checkpoint ``path`` (single-file or sharded)
    into one process's model; returns its meta."""
    meta = read_meta(path)
    check_meta(meta, batches)
    rng_states(meta, stp_gen)  # checked before anything is loaded
    if sharded.is_sharded(meta["_path"]):
        restore_sharded(Path(meta["_path"]), model, opt, say)
    else:
        device = next(model.parameters()).device
        weights, optim, meta = read_checkpoint(path)
        restore_model(model, {k: v.to(device) for k, v in weights.items()}, source=meta["_path"])
        if optim is not None:
            restore_optimizer(opt, optim, meta, model)
        else:
            _no_optimizer(meta["_path"], say)
    restore_position(meta, batches, stp_gen)
    return meta


def _no_optimizer(where: str, say: Callable[[str], None]) -> None:
    say(f"note: {where} has no optimizer state (e.g. best/); AdamW restarts from zero moments, "
        "so the run will not match an uninterrupted one")


def restore_sharded(folder: Path, module: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    say: Callable[[str], None], *, aliases: dict[str, str] | None = None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state, when it has some and ``opt`` is given) into
    ``module``, whatever layout wrote it (collective under torchrun: every rank calls it with its own share)."""
    with_opt = opt is not None and sharded.has_optimizer(folder)
    if opt is not None and not with_opt:
        _no_optimizer(str(folder), say)
    state = sharded.state_dicts(module, opt if with_opt else None, aliases=aliases)
    sharded.load(folder, state)
    sharded.apply(module, opt if with_opt else None, state, aliases=aliases)


def rng_states(meta: dict[str, Any], stp_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's torch and STP generator states, checked against this process's."""
    return (rng_unpack(meta["rng"]["torch"], "torch", torch.get_rng_state()),
            rng_unpack(meta["rng"]["stp"], "stp", stp_gen.get_state()))


def restore_position(meta: dict[str, Any], batches: BatchIterator, stp_gen: torch.Generator) -> None:
    """The data position and the generator states of a (checked) checkpoint meta."""
    torch_state, stp_state = rng_states(meta, stp_gen)
    batches.load_state_dict(meta["data_state"])
    try:
        torch.set_rng_state(torch_state)
        stp_gen.set_state(stp_state)
    except RuntimeError as e:
        raise CheckpointError(f"{meta['_path']}/meta.json: rng is not a valid generator state "
                              f"({str(e).splitlines()[0]})") from None


def init_weights(model: torch.nn.Module, path: str) -> dict[str, Any]:
    """Load the weights of checkpoint, run directory or pretrained folder ``path`` into ``model`` (``--init``):
    weights only; the optimizer, schedule, data order and generators start fresh. Returns the source's meta."""
    weights, _, meta = read_checkpoint(path, with_optimizer=False)
    device = next(model.parameters()).device
    restore_model(model, {k: v.to(device) for k, v in weights.items()}, source=f"--init {meta['_path']}")
    return meta


def read_position(path: str, batches: BatchIterator, stp_gen: torch.Generator) -> dict[str, Any]:
    """Restore only the data position and generator states of checkpoint ``path`` (its meta checked first); the
    weights are restored by every rank into its own share (under torchrun)."""
    meta = read_meta(path)
    check_meta(meta, batches)
    restore_position(meta, batches, stp_gen)
    return meta


def unit_source(folder: Path, model: torch.nn.Module) -> Callable[[str, torch.nn.Module], bool]:
    """Initialisation units filled from the single-file weights of ``folder`` (a checkpoint or pretrained folder)
    instead of their seeds, read one tensor at a time (see :func:`amer.training.materialize.materialize`).
    ``model`` (built on the meta device) is what the file must match, names and shapes."""
    from safetensors import safe_open

    path = folder / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        f = safe_open(str(path), framework="pt")
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (no __iter__)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
    check_weights(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, str(folder))

    @torch.no_grad()
    def source(unit: str, template: torch.nn.Module) -> bool:
        for name, t in template.state_dict(keep_vars=True).items():  # weights and saved buffers (an expert bias)
            value = f.get_tensor(f"{unit}.{name}")
            check_finite({f"{unit}.{name}": value}, str(folder))  # read one at a time: checked as they come
            t.copy_(value)
        return True

    return source


def named_optimizer_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The AdamW state of a single-file checkpoint keyed by parameter name (``{"state": {name: {...}},
    "param_groups": [...]}``), checked against ``optimizer`` of ``model`` (the whole model, on the meta device:
    the parameter order one process had) first."""
    weights_meta = read_meta(folder)
    tensors = load_tensors(folder / "optim.safetensors")
    sd = checked_state_dict(optimizer, tensors, weights_meta, str(folder), model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {names[pid]: st for pid, st in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
