"""Expert parallelism (``--parallel.ep N``), applied from outside the model as data parallelism is.

Every mixer that declares ``expert_params`` (weights stacked per expert along dim 0) and an ``expert_dispatch``
slot gets its experts split over the ``ep`` ranks of its expert-parallel group: each of those weights becomes
a DTensor sharded along the expert dimension on the ``ep`` mesh (rank ``r`` holds experts ``r * E / N`` to
``(r + 1) * E / N``), which FSDP2 leaves alone and DCP saves and reshards like any other shard, and the mixer's
``expert_dispatch`` runs its experts through the all-to-all of :mod:`amer.ops.moe_ep`. The router, the load
statistics (summed over the data-parallel group) and the capacity rule are untouched, so routing is one
process's; decoding never sees any of this (checkpoints hold whole experts).

Gradients. FSDP2 averages every other weight's gradient over the ``dp`` ranks. An expert's gradient arrives on
its rank through the all-to-all's backward already summed over the tokens of its expert-parallel group; when
``dp > ep`` the same experts live in ``dp / ep`` groups, whose gradients are summed over those replicas; the
sum is divided by ``dp``: the average, as for every other weight.

The expert-parallel groups are consecutive data-parallel ranks (the ``ep`` mesh dimension is the fastest), so
on a GPU node the all-to-all stays within the node while ``ep`` is at most the GPUs per node.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from amer.errors import ConfigError
from amer.ops.moe_ep import dropless_ep, padded_ep
from amer.training.distributed import Layout

__all__ = ["ExpertDispatch", "apply_expert_parallel", "expert_modules"]


class _ExpertGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the replicas of these experts and divides by ``dp``."""

    @staticmethod
    def forward(ctx, w: Tensor, replicas: Any, scale: float) -> Tensor:  # type: ignore[override]
        ctx.replicas, ctx.scale = replicas, scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if ctx.replicas is not None:
            dist.all_reduce(grad, group=ctx.replicas)
        return grad * ctx.scale, None, None


class ExpertDispatch:
    """What a mixer's ``expert_dispatch`` holds: runs its experts over the expert-parallel group."""

    def __init__(self, n_experts: int, layout: Layout) -> None:
        self.n_experts = n_experts
        self.group = layout.ep_mesh.get_group()
        self.replicas = layout.replica_group
        self.scale = 1.0 / layout.dp

    def _local(self, w: Tensor) -> Tensor:
        local = w.to_local() if hasattr(w, "to_local") else w
        return _ExpertGrad.apply(local, self.replicas, self.scale)

    def dropless(self, x: Tensor, idx: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor,
                 act: str = "silu") -> Tensor:
        return dropless_ep(x, idx, weights, self._local(w_gate_up), self._local(w_down), act,
                           n_experts=self.n_experts, group=self.group)

    def padded(self, buf: Tensor, w_gate_up: Tensor, w_down: Tensor, act: str = "silu") -> Tensor:
        return padded_ep(buf, self._local(w_gate_up), self._local(w_down), act, group=self.group)


def expert_modules(module: nn.Module) -> list[nn.Module]:
    """The mixers whose experts expert parallelism splits (more than one expert, declared ``expert_params``)."""
    out = []
    for m in module.modules():
        names = getattr(m, "expert_params", None)
        if names and hasattr(m, "expert_dispatch") and getattr(m, names[0]).shape[0] > 1:
            out.append(m)
    return out


def apply_expert_parallel(module: nn.Module, layout: Layout) -> list[nn.Parameter]:
    """Split the experts of every expert mixer in ``module`` (built on the meta device, before data-parallel
    wrapping) over the layout's ``ep`` ranks; returns the split parameters (for FSDP2 to leave alone)."""
    if layout.ep == 1:
        return []
    from torch.distributed.tensor import DTensor, Shard

    mesh = layout.ep_mesh
    split: list[nn.Parameter] = []
    for m in expert_modules(module):
        names = m.expert_params
        n = getattr(m, names[0]).shape[0]
        if n % layout.ep:
            raise ConfigError(f"--parallel.ep {layout.ep} must divide the {n} experts of {_where(module, m)}")
        for name in names:
            p = getattr(m, name)
            local = torch.empty((n // layout.ep, *p.shape[1:]), dtype=p.dtype, device=p.device)
            param = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False),
                                 requires_grad=p.requires_grad)
            setattr(m, name, param)
            split.append(param)
        m.expert_dispatch = ExpertDispatch(n, layout)
    return split


def _where(root: nn.Module, m: nn.Module) -> str:
    return next((name for name, sub in root.named_modules() if sub is m), "a block")
