"""Scale-out on torch.distributed: the process layout, data-parallel wrapping, and full states for checkpoints.

``torchrun --nproc-per-node N train.py --parallel.dp D --parallel.pp P`` (N = D x P) starts N processes;
:func:`setup` reads torchrun's environment, picks the backend (NCCL on CUDA, gloo on CPU) and lays the
ranks out as a (pp, dp) device mesh: the ranks of one pipeline stage form a data-parallel group, the
ranks of one data-parallel replica form a pipeline. A plain ``python train.py`` never gets here: it
runs with the single-process layout and no process group at all.

Data parallel is applied from outside the model (torchtitan style): :func:`wrap_data_parallel` shards
every block and then the root with FSDP2's ``fully_shard`` (parameters, gradients and optimizer state
split over the data-parallel ranks), or wraps the module in ``DistributedDataParallel``; either way the
gradients are averaged over the ranks, and MoE load statistics are summed over them.

Checkpoints stay in the single-process format: :func:`gather_state` assembles, on global rank 0, the
full model weights and the optimizer state keyed by parameter name, whatever the layout, and
:func:`host_copy` turns them into a plain model and optimizer that :func:`amer.checkpoint.save_checkpoint`
writes as it always does. Restoring goes the other way: every rank loads the single-process
checkpoint, keeps its stage's parameters, and shards them with :func:`load_optimizer_state`.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from amer.config import ParallelConfig
from amer.errors import ConfigError

__all__ = ["Layout", "setup", "teardown", "wrap_data_parallel", "unwrap", "mean_over", "gather_state",
           "host_copy", "named_optimizer_state", "load_optimizer_state"]


@dataclass
class Layout:
    """Where this process sits. The single-process layout has ``world == 1`` and no groups."""

    rank: int = 0
    world: int = 1
    dp: int = 1
    pp: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # DeviceMesh (pp, dp) when distributed

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def dp_group(self) -> Any:
        return None if self.mesh is None or self.dp == 1 else self.mesh["dp"].get_group()

    @property
    def pp_group(self) -> Any:
        return None if self.mesh is None or self.pp == 1 else self.mesh["pp"].get_group()


def launched() -> bool:
    """True inside a torchrun (or any torch.distributed launcher) process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(parallel: ParallelConfig, device: torch.device) -> Layout:
    """The layout for this process; initialises the process group under torchrun.

    Raises ConfigError (one line, exit 2) when ``--parallel.*`` asks for more than one process without
    torchrun, or when the world size is not ``dp * pp``.
    """
    if not launched():
        if parallel.world > 1:
            raise ConfigError(f"--parallel.dp {parallel.dp} --parallel.pp {parallel.pp} needs {parallel.world} "
                              f"processes: launch with torchrun --nproc-per-node {parallel.world} train.py ...")
        return Layout(device=device)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != parallel.world:
        raise ConfigError(f"torchrun started {world} processes but --parallel.dp {parallel.dp} x --parallel.pp "
                          f"{parallel.pp} = {parallel.world}; make them equal")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (parallel.pp, parallel.dp), mesh_dim_names=("pp", "dp"))
    return Layout(rank, world, parallel.dp, parallel.pp, device, mesh)


def teardown(layout: Layout, *, clean: bool = True) -> None:
    """End the process groups. After a clean finish the ranks do it in step: all wait, each destroys the
    sub-groups (mesh dimensions, the tied-weight groups), all wait again, then the default group goes. A rank
    that tears down a group while another still uses it aborts that rank (gloo: "terminate called without an
    active exception"). After an error there is no waiting: the other ranks may never come."""
    if not (layout.distributed and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
        default = dist.distributed_c10d._get_default_group()
        subgroups = [g for g in list(dist.distributed_c10d._world.pg_map) if g is not default]
        for g in subgroups:  # the same order on every rank: creation order
            dist.destroy_process_group(g)
        dist.barrier()
    dist.destroy_process_group()
    layout.mesh = None  # drop the last references to the groups now, not at interpreter exit
    gc.collect()


def wrap_data_parallel(module: nn.Module, layout: Layout, kind: str) -> nn.Module:
    """FSDP2 (each block, then the root) or DDP over the data-parallel group; MoE blocks learn the group.
    The module is returned unchanged when ``dp == 1``."""
    if layout.dp == 1:
        return module
    group = layout.dp_group
    for m in module.modules():
        if hasattr(m, "stats_group"):
            m.stats_group = group
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [layout.device.index] if layout.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, process_group=group)
    from torch.distributed.fsdp import fully_shard

    sub = layout.mesh["dp"]
    blocks = getattr(module, "blocks", None)
    for blk in (blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks or ()):
        fully_shard(blk, mesh=sub)
    fully_shard(module, mesh=sub)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) \
        else module


def mean_over(values: dict[str, float], layout: Layout, group: Any = None) -> dict[str, float]:
    """The mean of each figure over the ranks of ``group`` (all ranks when None); identity in one process."""
    if not layout.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    n = dist.get_world_size(group)
    return {k: float(v) / n for k, v in zip(keys, t.tolist())}


# ----------------------------------------------------------------------------------------------
# full states


def named_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"state": {param name: {...}}, "param_groups": [...]}`` with full (unsharded) CPU tensors.
    Collective under FSDP2: every rank of the data-parallel group must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # not cpu_offload: that keeps the tensors on global rank 0 only, and a pipeline stage's own first rank
    # is not rank 0; every rank of the group gets the full tensors and moves them to the host itself
    named = get_optimizer_state_dict(unwrap(module), optimizer, options=StateDictOptions(full_state_dict=True))
    named["state"] = {k: {n: _host(v) for n, v in st.items()} for k, st in named.get("state", {}).items()}
    return named


def _host(v: Any) -> Any:
    if not torch.is_tensor(v):
        return v
    v = v.full_tensor() if hasattr(v, "full_tensor") else v
    return v.detach().cpu()


def _model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(unwrap(module), options=StateDictOptions(full_state_dict=True))
    return {k: _host(v) for k, v in state.items()}


def gather_state(module: nn.Module, optimizer: torch.optim.Optimizer | None, layout: Layout,
                 skip: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The full weights and the named optimizer state of the whole model, on global rank 0 (None elsewhere).

    Every rank calls it. With pipeline stages each stage contributes its own parameters (``skip`` names
    copies that are not the model's own, such as a tied head on the last stage); names are the full
    model's, so the result is what one process holding the whole model would have.
    """
    weights = {k: v for k, v in _model_state(module).items() if k not in skip}
    optim = named_optimizer_state(module, optimizer) if optimizer is not None else {"state": {}, "param_groups": []}
    optim = {"state": {k: v for k, v in optim.get("state", {}).items() if k not in skip},
             "param_groups": optim.get("param_groups", [])}
    if layout.pp == 1:
        return (weights, optim) if layout.main else None
    parts: list[Any] = [None] * layout.pp if layout.main else []
    mine = (weights, optim) if layout.dp_rank == 0 else None
    group = layout.pp_group if layout.dp_rank == 0 else None
    if layout.dp_rank == 0:
        dist.gather_object(mine, parts if layout.main else None, dst=0, group=group)
    if not layout.main:
        return None
    full_w: dict[str, torch.Tensor] = {}
    full_o: dict[str, Any] = {"state": {}, "param_groups": parts[0][1]["param_groups"]}
    for w, o in parts:
        full_w.update(w)
        full_o["state"].update(o["state"])
    return full_w, full_o


def host_copy(model_factory: Any, weights: dict[str, torch.Tensor], optim: dict[str, Any],
              make_optimizer: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A plain single-process model and optimizer holding a gathered state, ready for ``save_checkpoint``."""
    model = model_factory()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"gathered state does not fit the model: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    opt = make_optimizer(model)
    by_name = dict(model.named_parameters())
    for name, st in optim["state"].items():
        if name in by_name:
            opt.state[by_name[name]] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    return model, opt


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any],
                         aliases: dict[str, str] | None = None) -> None:
    """Load a named full optimizer state into ``optimizer`` of ``module`` (sharding it under FSDP2); entries
    for parameters this module does not hold (other pipeline stages) are ignored. ``aliases`` maps a
    parameter of ``module`` that is a copy (a pipeline stage's tied head) to the name whose state it takes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    aliases = aliases or {}
    own = {n for n, _ in unwrap(module).named_parameters()}
    state = {k: v for k, v in named["state"].items() if k in own}
    for alias, src in aliases.items():
        if alias in own and src in named["state"]:
            state[alias] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in named["state"][src].items()}
    groups = []
    for g in named["param_groups"]:
        params = [p for p in g["params"] if p in own]
        params += [a for a, src in aliases.items() if a in own and src in g["params"]]
        groups.append({**g, "params": params})
    set_optimizer_state_dict(unwrap(module), optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
