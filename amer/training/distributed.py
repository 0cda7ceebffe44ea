"""Scale-out on torch.distributed: the process layout, data-parallel wrapping, and gradient norms over shards.

``torchrun --nproc-per-node N train.py --parallel.dp D --parallel.pp P`` (N = D x P) starts N processes;
:func:`setup` reads torchrun's environment, picks the backend (NCCL on CUDA, gloo on CPU) and lays the
ranks out as a (pp, dp) device mesh: the ranks of one pipeline stage form a data-parallel group, the
ranks of one data-parallel replica form a pipeline. ``--parallel.ep E`` splits each data-parallel group
into groups of E consecutive ranks that share out the experts (a (pp, dp / E, ep) mesh whose last two
dimensions, flattened, are the data-parallel one). A plain ``python train.py`` never gets here: it runs
with the single-process layout and no process group at all.

Data parallel is applied from outside the model (torchtitan style): :func:`wrap_data_parallel` shards
every block and then the root with FSDP2's ``fully_shard`` (parameters, gradients and optimizer state
split over the data-parallel ranks), or wraps the module in ``DistributedDataParallel``; either way the
gradients are averaged over the ranks, and MoE load statistics are summed over them. Expert weights that
expert parallelism has already split (:mod:`amer.training.expert_parallel`) are left out of FSDP.

Nothing here gathers a model on one host: each rank builds its share (:mod:`amer.training.materialize`),
checkpoints are sharded (:mod:`amer.sharded`) and evaluation is reduced (:mod:`amer.training.sharded_eval`).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from amer.config import ParallelConfig
from amer.errors import ConfigError

__all__ = ["Layout", "setup", "teardown", "wrap_data_parallel", "unwrap", "mean_over", "grad_norm",
           "clip_grad_norm", "local_tensor", "load_optimizer_state"]


@dataclass
class Layout:
    """Where this process sits. The single-process layout has ``world == 1`` and no groups."""

    rank: int = 0
    world: int = 1
    dp: int = 1
    pp: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # DeviceMesh (pp, dp), or (pp, dprep, ep) with "dp" flattened from the last two
    ep: int = 1

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
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def dp_group(self) -> Any:
        return None if self.mesh is None or self.dp == 1 else self.mesh["dp"].get_group()

    @property
    def pp_group(self) -> Any:
        return None if self.mesh is None or self.pp == 1 else self.mesh["pp"].get_group()

    @property
    def ep_mesh(self) -> Any:
        return None if self.mesh is None or self.ep == 1 else self.mesh["ep"]

    @property
    def replica_group(self) -> Any:
        """The ranks holding the same experts (one per expert-parallel group); None when there is one."""
        return None if self.mesh is None or self.ep == 1 or self.dp == self.ep else self.mesh["dprep"].get_group()


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

    if parallel.ep == 1:
        mesh = init_device_mesh(device.type, (parallel.pp, parallel.dp), mesh_dim_names=("pp", "dp"))
    else:
        mesh = init_device_mesh(device.type, (parallel.pp, parallel.dp // parallel.ep, parallel.ep),
                                mesh_dim_names=("pp", "dprep", "ep"))
        mesh["dprep", "ep"]._flatten("dp")  # FSDP2 shards the non-expert weights over all of dp
    return Layout(rank, world, parallel.dp, parallel.pp, device, mesh, parallel.ep)


def teardown(layout: Layout, *, clean: bool = True) -> None:
    """End the process groups of a run (see ``end_process_groups``)."""
    if not (layout.distributed and dist.is_initialized()):
        return
    layout.mesh = None  # drop the last references to the groups now (collected below), not at interpreter exit
    end_process_groups(clean=clean)


def end_process_groups(*, clean: bool = True) -> None:
    """After a clean finish the ranks end the groups in step: all wait, each destroys the sub-groups (mesh
    dimensions, the tied-weight groups), all wait again, then the default group goes. A rank that tears down a
    group while another still uses it, or leaves sub-groups to interpreter exit, aborts that rank (gloo:
    "terminate called without an active exception"). After an error there is no waiting: the other ranks may
    never come."""
    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
        default = dist.distributed_c10d._get_default_group()
        subgroups = [g for g in list(dist.distributed_c10d._world.pg_map) if g is not default]
        for g in subgroups:  # the same order on every rank: creation order
            dist.destroy_process_group(g)
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # the groups' last references go now, not at interpreter exit


def wrap_data_parallel(module: nn.Module, layout: Layout, kind: str, ignored: Iterable[nn.Parameter] = ()) -> nn.Module:
    """FSDP2 (each block, then the root) or DDP over the data-parallel group; MoE blocks learn the group.
    ``ignored``: parameters FSDP2 leaves alone (expert weights already split by expert parallelism). The
    module is returned unchanged when ``dp == 1``."""
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
    skip = set(ignored) or None
    blocks = getattr(module, "blocks", None)
    for blk in (blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks or ()):
        # A parallel layer's branches run through Block.update, which FSDP2's gather-on-forward hooks do not see,
        # and a shared block runs at several depths: both stay in the root unit, gathered for the whole forward.
        layer = getattr(blk, "layer", None)
        if getattr(layer, "branch", None) is None and getattr(layer, "share", None) is None:
            fully_shard(blk, mesh=sub, ignored_params=skip)
    fully_shard(module, mesh=sub, ignored_params=skip)
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
# gradient norms over shards


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part this rank holds (FSDP2 and expert-parallel parameters and gradients are DTensors)."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_norm(params: Iterable[nn.Parameter], layout: Layout, *, over_stages: bool = False) -> torch.Tensor:
    """The global L2 norm of the gradients of ``params``: a sharded gradient (a DTensor split over a mesh) counts
    its shard once per rank of that mesh, a replicated one once; ``over_stages`` adds the other pipeline stages'.
    Collective: every rank calls it with its own parameters."""
    buckets: dict[Any, torch.Tensor] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        group = None
        mesh = getattr(g, "device_mesh", None)
        if mesh is not None and any(pl.is_shard() for pl in g.placements):
            group = mesh.get_group()
        sq = local_tensor(g).detach().double().square().sum()
        buckets[group] = buckets.get(group, torch.zeros((), dtype=torch.float64, device=sq.device)) + sq
    total = torch.zeros(1, dtype=torch.float64, device=layout.device)
    for group, sq in buckets.items():
        sq = sq.reshape(1).to(layout.device)
        if group is not None:
            dist.all_reduce(sq, group=group)
        total = total + sq
    if over_stages and layout.pp > 1:
        dist.all_reduce(total, group=layout.pp_group)
    return total.sqrt()[0].float()


def clip_grad_norm(params: Iterable[nn.Parameter], limit: float, layout: Layout, *, over_stages: bool = False,
                   also: Iterable[nn.Parameter] = ()) -> torch.Tensor:
    """Clip the gradients of ``params`` (and ``also``: copies left out of the norm, such as a tied head's) to the
    global norm ``limit``; returns the norm before clipping. As ``torch.nn.utils.clip_grad_norm_``, for
    parameters sharded over several meshes."""
    params = list(params)
    norm = grad_norm(params, layout, over_stages=over_stages)
    if torch.isfinite(norm) and limit < float("inf"):
        scale = min(1.0, limit / (float(norm) + 1e-6))
        if scale < 1.0:
            for p in [*params, *also]:
                if p.grad is not None:
                    local_tensor(p.grad).mul_(scale)
    return norm


# ----------------------------------------------------------------------------------------------
# a full optimizer state into a sharded optimizer (resuming a single-file checkpoint)


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
