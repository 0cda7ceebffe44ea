"""Safetensors checkpoints: written atomically, loaded with errors that name the bad file.

Layout of one checkpoint directory::

    step_000250/
        model.safetensors   weights (tied weights stored once)
        optim.safetensors   AdamW moments and step counts, flattened to named tensors
        meta.json           resolved config, step, RNG states, data position, amer version, metrics
        tokenizer.json      the run's tokenizer (Hugging Face format; absent in older checkpoints: bytes)

A checkpoint is written into a temporary sibling directory, fsynced, then renamed into place (or swapped
with the one it replaces, ``best/``), so an interrupted write never leaves a half checkpoint under a real
name and never touches the previous one. Removing a checkpoint removes these four files only. A pretrained
folder (:mod:`amer.hub`) reads like a checkpoint without optimizer state.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amer.config import ModelConfig, from_dict
from amer.errors import CheckpointError, InputError
from amer.fileio import fault_point, fsync_dir, json_text, remove_own_files, replace_dir, temp_sibling
from amer.fileread import json_loads, read_file
from amer.hub import read_pretrained_config
from amer.optimstate import checked_state_dict
from amer.version import __version__
from amer.weights import check_weights, load_tensors, model_from_weights, restore_model, save_tensors, state_tensors

__all__ = ["CheckpointError", "CHECKPOINT_FILES", "save_checkpoint", "load_checkpoint", "read_checkpoint",
           "find_checkpoint", "list_checkpoints", "read_meta", "state_tensors", "checkpoint_step", "restore_model",
           "restore_optimizer", "check_weights", "model_from_weights"]

CHECKPOINT_FILES = ("model.safetensors", "optim.safetensors", "meta.json", "tokenizer.json")  # all a checkpoint holds


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{pid}.{k}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict[str, Any], *, tokenizer: Any = None) -> Path:
    """Write ``path`` atomically (temporary directory, fsync, rename). Refuses non-finite weights.
    ``tokenizer`` (anything with ``to_json()``, see :mod:`amer.data`) is written as ``tokenizer.json``."""
    path = Path(path)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"refusing to write {path}: parameter {name} has non-finite values")
    tmp = temp_sibling(path)
    tmp.mkdir(parents=True)
    try:
        save_tensors(state_tensors(model), tmp / "model.safetensors")
        meta = dict(meta)
        if optimizer is not None:
            tensors, extra = _optim_tensors(optimizer)
            save_tensors(tensors, tmp / "optim.safetensors")
            meta["optimizer"] = extra
        meta.setdefault("amer_version", __version__)
        with open(tmp / "meta.json", "w") as f:
            f.write(json_text(meta, default=_json_default))
            f.flush()
            os.fsync(f.fileno())
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
        for fname in ("model.safetensors", "optim.safetensors", "tokenizer.json"):
            if (tmp / fname).exists():
                with open(tmp / fname, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        fault_point(f"checkpoint:{path.name}")
        replace_dir(tmp, path, CHECKPOINT_FILES)
    except BaseException:
        if tmp.exists():
            remove_own_files(tmp, CHECKPOINT_FILES)
        raise
    return path


def _json_default(o: Any) -> Any:
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_STEP_DIR = re.compile(r"^step_([0-9]{1,18})$")


def checkpoint_step(path: Path) -> int | None:
    """The step number in a checkpoint directory's name (``step_000250`` -> 250), or None."""
    m = _STEP_DIR.match(path.name)
    return int(m[1]) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step checkpoints of a run, oldest first: by step number, not by name (``step_1000000`` sorts after
    ``step_999999``)."""
    run_dir = Path(run_dir)
    found = [(step, p) for p in run_dir.glob("step_*")
             if (step := checkpoint_step(p)) is not None and p.is_dir() and (p / "meta.json").exists()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its latest step)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / "meta.json").exists() or (p / "model.safetensors").exists():
        return p
    steps = list_checkpoints(p)
    if not steps:
        raise CheckpointError(f"no checkpoint in {p}: expected step_*/ directories with meta.json and "
                              "model.safetensors")
    return steps[-1]


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta of a checkpoint, run directory (latest step) or pretrained folder, without reading any weights:
    ``meta["config"]["model"]`` is the model's config, ``meta["_path"]`` the checkpoint directory."""
    ckpt = find_checkpoint(path)
    meta_path = ckpt / "meta.json"
    if not meta_path.exists() and (ckpt / "config.json").is_file():  # a pretrained folder (amer.hub)
        config = read_pretrained_config(ckpt)
        return {"config": {"model": config["model"]}, "step": None, "pretrained": config, "_path": str(ckpt),
                "_file": "config.json"}
    if not meta_path.exists():
        raise CheckpointError(f"checkpoint {ckpt} is missing {meta_path.name}")
    try:
        meta = json_loads(read_file(meta_path))
    except ValueError as e:  # not JSON, not UTF-8, or nested thousands deep
        raise CheckpointError(f"{meta_path}: corrupt or truncated JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{meta_path}: cannot be read ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object with step, config and state, "
                              f"got a JSON {type(meta).__name__}")
    meta["_path"] = str(ckpt)
    return meta


Tensors = dict[str, torch.Tensor]


def read_checkpoint(path: str | Path, *, with_optimizer: bool = True) -> tuple[Tensors, Tensors | None, dict[str, Any]]:
    """(model tensors, optimizer tensors or None, meta) of a checkpoint, validating every file."""
    meta = read_meta(path)
    ckpt = Path(meta["_path"])
    weights = load_tensors(ckpt / "model.safetensors")
    optim = None
    if with_optimizer and (ckpt / "optim.safetensors").exists():
        optim = load_tensors(ckpt / "optim.safetensors")
    return weights, optim, meta


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                      model: nn.Module | None = None) -> None:
    """Load optimizer moments saved by :func:`save_checkpoint` (tensors named ``<param id>.<state key>``),
    after checking every tensor and group against the optimizer's parameters (see :mod:`amer.optimstate`):
    a wrong shape, dtype or group is a :class:`CheckpointError` naming the tensor and the file, never a
    crash inside the optimizer."""
    source = f"{meta.get('_path', 'checkpoint')}"
    opt.load_state_dict(checked_state_dict(opt, tensors, meta, source, model))


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """``(model, model_config)`` from a checkpoint, a run directory or a pretrained folder, in eval mode.

    >>> model, cfg = amer.load_checkpoint("checkpoints/my-run")   # latest step of the run
    """

    weights, _, meta = read_checkpoint(path, with_optimizer=False)
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{meta['_path']}/meta.json has no config.model section (the model's settings)")
    try:
        cfg = from_dict(ModelConfig, config["model"], where="model.")
    except InputError as e:  # named after the file the settings came from (a pretrained folder has no meta.json)
        raise CheckpointError(f"{meta['_path']}/{meta.get('_file', 'meta.json')}: {e}") from None
    model = model_from_weights(cfg, weights, meta["_path"], device)
    model.eval()
    return model, cfg
