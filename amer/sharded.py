"""Sharded weights and optimizer state through ``torch.distributed.checkpoint`` (DCP).

A run under ``torchrun`` saves what each rank holds, in parallel, into one folder: every rank writes its own
shard file (``__<rank>_0.distcp``) and rank 0 writes the index (``.metadata``) once all have finished. Nothing is
gathered on one host. Loading reshards: DCP reads, for every tensor a rank holds (a whole tensor, an FSDP2
shard, a pipeline stage's blocks, an expert-parallel slice), exactly the bytes that land in it, so a folder
written under one layout loads under any other, one process included (:func:`load`, :func:`read_weights`).

The state is ``{"model": {name: tensor}, "optim": {...}}`` with the full model's parameter names, and the
optimizer state flattened per parameter (``state.<name>.exp_avg``, ``param_groups.<name>.lr``:
``StateDictOptions(flatten_optimizer_state_dict=True)``), so pipeline stages holding different parameters
write different keys. A weight tied to another (the head to the embedding) is stored once, under the first
name; a pipeline stage's copy of it is read from and written as that name.

The checkpoint directory around it (``meta.json`` written last as the commit, the temporary name, pruning) is
:mod:`amer.checkpoint`'s.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amer.errors import CheckpointError
from amer.fileio import fault_point

__all__ = ["INDEX", "is_sharded", "has_optimizer", "shard_files", "state_dicts", "apply", "write", "load",
           "read_weights"]

INDEX = ".metadata"  # DCP's index of every tensor and where its bytes are, written last by rank 0
_SHARD_FILE = re.compile(r"^(\.metadata|__\d+_\d+\.distcp)$")


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` holds DCP shards (rather than ``model.safetensors``)."""
    return (Path(path) / INDEX).is_file()


def shard_files(*folders: Path) -> list[str]:
    """The names of the DCP files in ``folders`` (what deleting a sharded checkpoint removes)."""
    names: set[str] = set()
    for folder in folders:
        if Path(folder).is_dir():
            names.update(p.name for p in Path(folder).iterdir() if _SHARD_FILE.match(p.name))
    return sorted(names)


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _copies(module: nn.Module) -> dict[str, str]:
    """Names of parameters that are another one (tied) -> the first name of that parameter."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _renamed(d: dict[str, Any], key_of: Any) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        k2 = key_of(k)
        if k2 is not None:
            out[k2] = v
    return out


def state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                aliases: dict[str, str] | None = None, skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` of ``module`` (and ``optimizer``) under the full model's names, ready for
    :func:`write` or :func:`load` (the tensors are the module's own: loading writes into them). ``aliases`` maps a
    parameter that is a copy of another (a pipeline stage's tied head) to the name it is read as; ``skip`` leaves
    parameters out (such a copy, when writing: the original is written by the stage that holds it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    aliases = {**(aliases or {})}
    left_out = {*_copies(module), *skip}  # a tied weight is stored once, under its first name

    def rename(fqn: str) -> str | None:
        return None if fqn in left_out else aliases.get(fqn, fqn)

    if optimizer is None:
        model = get_model_state_dict(module, options=_options())
        return {"model": _renamed(model, rename)}
    model, optim = get_state_dict(module, optimizer, options=_options())

    def rename_optim(key: str) -> str | None:
        for prefix in ("state.", "param_groups."):
            if key.startswith(prefix):
                fqn, _, field = key[len(prefix):].rpartition(".")
                new = rename(fqn)
                return None if new is None else f"{prefix}{new}.{field}"
        return key

    return {"model": _renamed(model, rename), "optim": _renamed(optim, rename_optim)}


def apply(module: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any], *,
          aliases: dict[str, str] | None = None) -> None:
    """Put a loaded :func:`state_dicts` back: the optimizer state into ``optimizer`` (the model's tensors were
    loaded in place already); tied weights are tied again by the module itself."""
    if optimizer is None or "optim" not in state:
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    back = {v: k for k, v in (aliases or {}).items()}

    def original(key: str) -> str:
        for prefix in ("state.", "param_groups."):
            if key.startswith(prefix):
                fqn, _, field = key[len(prefix):].rpartition(".")
                return f"{prefix}{back.get(fqn, fqn)}.{field}"
        return key

    set_optimizer_state_dict(module, optimizer, {original(k): v for k, v in state["optim"].items()},
                             options=_options())


class _Writer:
    """A ``FileSystemWriter`` that can stop the process (``AMER_FAULT_AT``) after this rank wrote its shard
    and before the checkpoint is committed: what a ``kill -9`` of one rank mid-save leaves behind."""

    @staticmethod
    def make(folder: Path, fault: str) -> Any:
        from torch.distributed.checkpoint import FileSystemWriter

        class Writer(FileSystemWriter):
            def write_data(self, plan: Any, planner: Any) -> Any:
                done = super().write_data(plan, planner)
                done.wait()
                fault_point(fault)
                return done

        return Writer(str(folder), sync_files=True, overwrite=False)


def write(folder: Path, state: dict[str, Any], *, fault: str = "") -> None:
    """Every rank writes its shards of ``state`` into ``folder`` (collective; rank 0 writes the index last)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank() if dist.is_initialized() else 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=_Writer.make(folder, f"{fault}:rank{rank}"), no_dist=not dist.is_initialized())


def load(folder: Path, state: dict[str, Any]) -> None:
    """Read ``state``'s tensors (in place, resharded to what this rank holds) from ``folder``. Collective under
    torchrun; a single process reads without a process group. A missing key is a CheckpointError."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # one process reading is what no_dist says, not a surprise worth a warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    except (dcp.CheckpointException, RuntimeError, KeyError, ValueError, OSError) as e:
        # DCP gathers every rank's error into one exception: its last line names the cause
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{folder}: cannot read the sharded state ({lines[-1] if lines else type(e).__name__})") \
            from None


def _index(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(folder)).read_metadata()
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{folder / INDEX}: corrupt or unreadable index of a sharded checkpoint ({e})") from None


def has_optimizer(folder: Path) -> bool:
    """Whether the sharded checkpoint in ``folder`` holds optimizer state (``best/`` holds weights only)."""
    return any(k.startswith("optim.") for k in _index(folder).state_dict_metadata)


def read_weights(folder: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The full model weights stored in ``folder``, consolidated in this process (one copy, on the host):
    what ``amer export``, ``amer sample`` and ``load_checkpoint`` read from a sharded checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = _index(folder)
    want = None if names is None else set(names)
    model: dict[str, torch.Tensor] = {}
    for key, item in meta.state_dict_metadata.items():
        if not key.startswith("model.") or not isinstance(item, TensorStorageMetadata):
            continue
        name = key[len("model."):]
        if want is None or name in want:
            model[name] = torch.empty(item.size, dtype=item.properties.dtype)
    if not model:
        raise CheckpointError(f"{folder}: the sharded checkpoint holds no model weights")
    load(folder, {"model": model})
    return model
