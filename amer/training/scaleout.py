"""What :func:`amer.training.loop.train` does differently under torchrun, in one place.

The loop itself stays the single-process loop. Rank 0 owns the run directory: it creates or restores
the run exactly as one process does (with the full model and optimizer), then :func:`start` hands every
rank the same starting point (weights, optimizer state, data position, STP generator, step) and builds
what this rank trains: the whole model or its pipeline stage, wrapped for data parallelism, with its own
optimizer holding its share of the restored state, and the step that runs it. At every evaluation,
:func:`host_copy` gathers the full model and optimizer state into a plain model on rank 0, which
evaluates it and writes the checkpoint in the single-process format, so any layout resumes any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from amer.config import TrainConfig
from amer.model import HybridLM
from amer.stp import STPPolicy
from amer.training import distributed as D
from amer.training.optim import make_optimizer
from amer.training.pipeline import StageModule
from amer.training.pipeline_step import PipelineStep
from amer.training.step import TrainStep

__all__ = ["Scaled", "start", "host_copy", "share", "on_main", "NullLogger", "describe"]


@dataclass
class Scaled:
    layout: D.Layout
    module: nn.Module  # what this rank trains (wrapped)
    optimizer: torch.optim.Optimizer
    step_fn: Any  # TrainStep or PipelineStep
    stage: StageModule | None


def share(layout: D.Layout, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (CPU objects, pickled)."""
    box = [obj if layout.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(layout: D.Layout, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result on every rank; an error it raises is raised on every rank (so a refused
    run directory stops all processes with the same one-line message instead of leaving them waiting)."""
    if not layout.distributed:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if layout.main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            error = e
    result, error = share(layout, (result, error) if layout.main else None)
    if error is not None:
        raise error
    return result


class NullLogger:
    """The run log of ranks other than 0: they compute the same figures, rank 0 writes them."""

    def log(self, step: int, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _agree(ok: bool) -> bool:
    """Every rank's verdict: a step is skipped everywhere when any rank saw a non-finite loss."""
    t = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def start(cfg: TrainConfig, layout: D.Layout, model: HybridLM, opt: torch.optim.Optimizer, policy: STPPolicy,
          stp_gen: torch.Generator, batches: Any, state: Any) -> tuple[Scaled, Any]:
    """Everyone starts from rank 0's (possibly restored) state; returns what this rank trains and the state."""
    # only a restored optimizer has state to hand on (reading an empty one would initialise it with a step)
    named = D.named_optimizer_state(model, opt) if layout.main and opt.state else None
    payload = share(layout, ({k: v.cpu() for k, v in model.state_dict().items()}, named, batches.state_dict(),
                             stp_gen.get_state(), state) if layout.main else None)
    weights, named, position, gen_state, state = payload
    if not layout.main:
        model.load_state_dict(weights)
        batches.load_state_dict(position)
        stp_gen.set_state(gen_state)
    documents = cfg.packing == "documents"
    stage = None
    module: nn.Module = model
    if layout.pp > 1:
        stage = StageModule(model, layout.pp_rank, layout.pp, policy, documents=documents, stp_generator=stp_gen)
        module = stage
    module = D.wrap_data_parallel(module, layout, cfg.parallel.data)
    optimizer = make_optimizer(module, cfg)
    if named is not None and named.get("state"):
        tied = {"lm_head.weight": "embed.weight"} if stage is not None and stage.tied_copy else {}
        D.load_optimizer_state(module, optimizer, named, aliases=tied)
    if stage is not None:
        rows = cfg.batch_size // layout.dp
        step_fn: Any = PipelineStep(stage, module, optimizer, layout, microbatches=cfg.parallel.n_microbatches,
                                    schedule=cfg.parallel.schedule, grad_accum=cfg.grad_accum,
                                    grad_clip=cfg.grad_clip, dtype=cfg.dtype,
                                    sharded=layout.dp > 1 and cfg.parallel.data == "fsdp", rows=rows,
                                    seq_len=cfg.seq_len)
    else:
        step_fn = _Averaged(TrainStep(module, optimizer, policy, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                                      dtype=cfg.dtype, stp_generator=stp_gen, documents=documents,
                                      shard=(layout.dp_rank, layout.dp) if layout.dp > 1 else None, agree=_agree),
                            layout)
    return Scaled(layout, module, optimizer, step_fn, stage), state


class _Averaged:
    """A data-parallel :class:`TrainStep` whose logged figures are the means over the ranks (each rank's
    loss is its own share's); the gradient norm is already global."""

    def __init__(self, step: TrainStep, layout: D.Layout) -> None:
        self.step, self.layout = step, layout

    def __call__(self, micro_batches: Any, step: int, *, lr: float | None = None, metrics: bool = False) -> Any:
        res = self.step(micro_batches, step, lr=lr, metrics=metrics)
        if not metrics or not res.applied:
            return res
        parts = res.loss
        figures = {"total": float(parts.total.detach()), "ce": float(parts.ce.detach()),
                   "aux": float(parts.aux.detach()), "stp": float(parts.stp.detach()),
                   **{f"m:{k}": v for k, v in res.metrics.items()},
                   **{f"t:{k}": float(v) for k, v in parts.per_tap.items()},
                   **{f"a:{k}": float(v.detach()) for k, v in parts.aux_parts.items()}}
        mean = D.mean_over(figures, self.layout, self.layout.dp_group)
        parts = parts._replace(total=torch.tensor(mean["total"]), ce=torch.tensor(mean["ce"]),
                               aux=torch.tensor(mean["aux"]), stp=torch.tensor(mean["stp"]),
                               per_tap={k[2:]: torch.tensor(v) for k, v in mean.items() if k.startswith("t:")},
                               aux_parts={k[2:]: torch.tensor(v) for k, v in mean.items() if k.startswith("a:")})
        res.loss, res.metrics = parts, {k[2:]: v for k, v in mean.items() if k.startswith("m:")}
        return res


def host_copy(scaled: Scaled, cfg: TrainConfig) -> tuple[HybridLM, torch.optim.Optimizer] | None:
    """The full model and optimizer state as a plain single-process model on rank 0 (None on the others).
    Every rank calls it."""
    skip = scaled.stage.extra_state_names() if scaled.stage is not None else ()
    gathered = D.gather_state(scaled.module, scaled.optimizer, scaled.layout, skip=skip)
    if gathered is None:
        return None
    weights, named = gathered
    return D.host_copy(lambda: HybridLM(cfg.model), weights, named, lambda m: make_optimizer(m, cfg))


def describe(cfg: TrainConfig, layout: D.Layout, stage_info: Callable[[], Any] | None = None) -> str:
    """One line for the log: the layout and what runs where."""
    p = cfg.parallel
    parts = [f"{layout.world} processes ({layout.device.type}, {'nccl' if layout.device.type == 'cuda' else 'gloo'})"]
    if layout.dp > 1:
        parts.append(f"data parallel x{layout.dp} ({p.data}), {cfg.batch_size // layout.dp} rows per rank")
    if layout.pp > 1:
        parts.append(f"pipeline x{layout.pp} at '|' ({p.schedule}, {p.n_microbatches} microbatches)")
    return "scale-out: " + "; ".join(parts)
