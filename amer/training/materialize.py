"""Per-rank construction: every rank builds only what it owns, and initialises it as one process would.

The model is built on the meta device (no memory, no initialisation). The rank keeps its pipeline stage
(:class:`~amer.training.pipeline.StageModule`), expert parallelism splits its experts, FSDP2 shards what is
left, and only then does the rank allocate: ``to_empty`` gives it its own shards and nothing else. The
weights are filled one initialisation unit at a time (:meth:`amer.model.HybridLM.init_units`: the
embedding, each block, the final norm, the head): a meta copy of the unit, taken before sharding, is
given memory, initialised on the unit's own seed (:func:`amer.model.unit_seed`), and this rank's slice of
each tensor is copied into its shard; then the copy is dropped (a unit this rank holds whole, such as a
pipeline stage's blocks, is initialised in place). So the initial weights are those of
``HybridLM(cfg, seed=seed)`` whatever the layout, and the peak host memory at construction is this rank's
share plus, under sharding, one unit.

:func:`fill` is the one routine that puts a full tensor into a parameter whatever it became (a plain
tensor, an FSDP2 shard, an expert-parallel shard): restoring a single-file checkpoint under a sharded
layout uses it too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from amer.model import HybridLM, InitUnit, seeded

__all__ = ["RankUnit", "rank_units", "fill", "materialize"]


class RankUnit(NamedTuple):
    """An initialisation unit as this rank holds it: the unit (its module inside the rank's module) and an
    unsharded meta copy of that module, taken before any sharding."""

    unit: InitUnit
    template: nn.Module


def rank_units(model: HybridLM, held: nn.Module, extra: Iterable[InitUnit] = ()) -> list[RankUnit]:
    """The units of ``model`` (built on the meta device) whose module ``held`` (the rank's stage, or the model)
    contains, and ``extra`` units (a pipeline stage's copy of a tied embedding), each with its meta template.
    Call it before the module is split or sharded."""
    inside = {id(m) for m in held.modules()}
    units = [u for u in model.init_units() if id(u.module) in inside] + list(extra)
    return [RankUnit(u, copy.deepcopy(u.module)) for u in units]


def _slice(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``full`` in the layout of parameter ``like`` (a DTensor's local shard, or all)."""
    mesh = getattr(like, "device_mesh", None)
    if mesh is None:
        return full
    from torch.distributed.tensor import distribute_tensor

    # every rank holds the same full tensor, so each cuts its own shard: no communication (src_data_rank None)
    return distribute_tensor(full, mesh, like.placements, src_data_rank=None).to_local()


def _ties(module: nn.Module) -> list[tuple[str, str]]:
    """(name, first name) of every parameter that is another one (a head tied to the embedding)."""
    first: dict[int, str] = {}
    out = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return out


@torch.no_grad()
def fill(param: Tensor, full: Tensor) -> None:
    """Copy this rank's part of the full tensor ``full`` into ``param`` (plain, FSDP2 or expert-parallel)."""
    local = param.to_local() if hasattr(param, "to_local") else param
    part = _slice(full.to(device=local.device, dtype=local.dtype), param)
    if part.shape != local.shape:
        raise RuntimeError(f"a tensor of shape {tuple(full.shape)} gives this rank {tuple(part.shape)}, "
                           f"its parameter holds {tuple(local.shape)}")
    local.copy_(part)


def _initialise(name: str, module: nn.Module, unit: InitUnit, seed: int, device: torch.device,
                source: Callable[[str, nn.Module], bool] | None) -> None:
    if source is None or not source(name, module):
        with seeded(seed, name, device):
            unit.init(module)


def materialize(module: nn.Module, units: list[RankUnit], device: torch.device, seed: int,
                source: Callable[[str, nn.Module], bool] | None = None) -> None:
    """Allocate ``module``'s own shards on ``device`` and initialise them unit by unit (see the module
    docstring); then compute the buffers weights do not carry. ``source(name, template)``, when given, may
    fill a unit's template from elsewhere (a checkpoint) and return True, instead of initialising it."""
    ties = _ties(module)
    module.to_empty(device=device)
    for alias, first in ties:  # to_empty gives each name its own tensor; FSDP2 keeps shared ones shared already
        owner, _, attr = alias.rpartition(".")
        shared = module.get_parameter(first)
        if module.get_parameter(alias) is not shared:
            setattr(module.get_submodule(owner), attr, shared)
    for unit, template in units:
        if not any(hasattr(p, "device_mesh") for p in unit.module.parameters()):
            _initialise(unit.name, unit.module, unit, seed, device, source)  # whole here: initialised in place
            continue
        full = template.to_empty(device=device)
        _initialise(unit.name, full, unit, seed, device, source)
        values = dict(full.named_parameters())
        for name, p in unit.module.named_parameters():
            fill(p, values[name])
        buffers = dict(full.named_buffers())  # replicated, never sharded (a MoE block's expert bias)
        for name, b in unit.module.named_buffers():
            b.copy_(buffers[name])
        del values, buffers
        template.to_empty(device=torch.device("meta"))  # the full copy is dropped: one unit at a time
    for m in module.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers(device)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"per-rank construction left {left[0]!r} without data: its module has no init_buffers() "
                           "and belongs to no initialisation unit")
