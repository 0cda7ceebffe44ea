"""The training step of one pipeline stage: the schedule over microbatches, then what :class:`TrainStep`
does after backward, across stages (the non-finite guard, the tied embedding, the global gradient norm,
the optimizer step, the figures for the log).

It is called exactly like :class:`amer.training.step.TrainStep` (global batches in, a
:class:`~amer.training.step.StepOutput` out, the same on every rank), so the training loop does not
care which of the two it holds. One micro-batch of the loop is cut into ``--parallel.microbatches``
pipeline microbatches; the cross-entropy and the seam both scale by ``1 / grad_accum`` and the schedule
divides by the number of microbatches, so a step equals one process accumulating the same microbatches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from amer.objective import LossBreakdown, cross_entropy
from amer.runtime import autocast
from amer.tap import tap_label
from amer.training.distributed import Layout, clip_grad_norm
from amer.training.pipeline import StageModule
from amer.training.step import StepOutput, _rows

__all__ = ["PipelineStep"]


def _local(t: Tensor) -> Tensor:
    """The shard this rank holds (FSDP2 parameters and gradients are DTensors)."""
    return t.to_local() if hasattr(t, "to_local") else t


class PipelineStep:
    """One optimizer step of a pipeline stage (every rank of the pipeline calls it with the same batches)."""

    def __init__(self, stage: StageModule, module: nn.Module, optimizer: torch.optim.Optimizer | None,
                 layout: Layout, *, microbatches: int = 1, schedule: str = "1f1b", grad_accum: int = 1,
                 grad_clip: float | None = 1.0, dtype: str = "float32",
                 keep_gradients: bool = False, rows: int, seq_len: int) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.stage, self.module, self.optimizer, self.layout = stage, module, optimizer, layout
        self.microbatches, self.grad_accum, self.grad_clip, self.dtype = microbatches, grad_accum, grad_clip, dtype
        self.keep_gradients = keep_gradients  # tests read .grad after the step
        # Static stage metadata (the shapes every microbatch has): without it the schedule would infer them by
        # running a real forward and backward first, drawing STP spans and consuming document ids.
        if rows % microbatches:
            raise ValueError(f"--parallel.microbatches {microbatches} does not divide the {rows} rows per rank")
        mb, dev = rows // microbatches, layout.device
        d_model, vocab = stage.width, stage.vocab
        hidden = torch.empty(mb, seq_len, d_model, device=dev)
        # a later stage's input needs a gradient: that is what it sends back upstream
        inp = (torch.empty(mb, seq_len, dtype=torch.long, device=dev) if stage.first
               else torch.empty(mb, seq_len, d_model, device=dev, requires_grad=True))
        out = torch.empty(mb, seq_len, vocab, device=dev,
                          dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32) if stage.last else hidden
        self.pstage = PipelineStage(module, layout.pp_rank, layout.pp, dev, input_args=(inp,), output_args=(out,),
                                    input_grads=(None,) if stage.first else (hidden,),
                                    output_grads=(None,) if stage.last else (hidden,), group=layout.pp_group)
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        # every stage gets the loss function: the schedule runs backward only when it has one
        self.schedule = cls(self.pstage, n_microbatches=microbatches, loss_fn=self._loss)
        self.tie_group = self._tie_group()
        self.share_groups = self._share_groups()

    def _tie_group(self) -> Any:
        """The process group of this replica's first and last stage, when the embedding and head are tied
        (every rank creates every such group, as ``new_group`` requires)."""
        lay = self.layout
        tied = self.stage.tied_embed or self.stage.tied_copy
        flags = torch.tensor([int(tied)])
        dist.all_reduce(flags)
        if not int(flags):
            return None
        mine = None
        for d in range(lay.dp):
            g = dist.new_group([d, (lay.pp - 1) * lay.dp + d])
            if lay.dp_rank == d and (self.stage.first or self.stage.last):
                mine = g
        return mine

    def _share_groups(self) -> dict[str, Any]:
        """Per shared block used on several stages: the process group of this replica's stages that hold it."""
        lay, mine = self.layout, {}
        for name, stages in self.stage.shared_ties():
            for d in range(lay.dp):
                g = dist.new_group([s * lay.dp + d for s in stages])
                if lay.dp_rank == d and lay.pp_rank in stages:
                    mine[name] = g
        return mine

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return cross_entropy(logits, targets) / self.grad_accum

    def __call__(self, micro_batches: Iterable[Mapping[str, Tensor]], step: int, *, lr: float | None = None,
                 metrics: bool = False) -> StepOutput:
        lay, stage = self.layout, self.stage
        if lr is not None and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        stage.step, stage.seam_scale, stage.want_metrics = step, 1.0 / self.grad_accum, metrics
        batches = iter(micro_batches)
        losses: list[Tensor] = []
        figures: list[dict[str, float]] = []
        for _ in range(self.grad_accum):
            batch = {k: v.to(lay.device) for k, v in next(batches).items()}
            if lay.dp > 1:
                rows = _rows(batch["tokens"].shape[0], lay.dp_rank, lay.dp)
                batch = {k: v[rows] for k, v in batch.items()}
            doc = batch.get("doc_ids")
            stage.load(list(doc.tensor_split(self.microbatches)) if doc is not None else [None] * self.microbatches)
            with autocast(self.dtype, lay.device):
                # return_outputs=False: the last stage would otherwise keep every microbatch's logits until the end
                if stage.first:
                    self.schedule.step(batch["tokens"], target=batch["targets"] if stage.last else None,
                                       return_outputs=False)
                elif stage.last:
                    self.schedule.step(target=batch["targets"], losses=losses, return_outputs=False)
                else:
                    self.schedule.step(return_outputs=False)
            figures.append(stage.summary())
        local = {k: sum(f.get(k, 0.0) for f in figures) / len(figures) for k in {k for f in figures for k in f}}
        # one loss per microbatch, each already divided by grad_accum: their mean over the microbatches
        ce = sum(float(x.detach()) for x in losses) / self.microbatches if stage.last else 0.0
        coeff = stage.policy.coefficient(step) if stage.policy.enabled else 0.0
        aux = sum(v for k, v in local.items() if k.startswith("aux/"))
        totals = torch.tensor([ce, aux, local.get("stp", 0.0), local.get("stp/live_grad_sq", 0.0)], dtype=torch.float64)
        dist.all_reduce(totals)
        ce, aux, stp, live_sq = (float(v) / lay.dp for v in totals)
        finite = torch.tensor([float(torch.isfinite(totals).all())])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        parts = LossBreakdown(torch.tensor(ce + aux + coeff * stp), torch.tensor(ce), torch.tensor(aux),
                              torch.tensor(stp), coeff, {})
        if not float(finite):
            self._zero()
            return StepOutput(False, parts, skipped_reason="non-finite loss")
        self._sum_tied_gradients()
        gnorm = self._clip()
        if gnorm is not None and not torch.isfinite(gnorm):
            self._zero()
            return StepOutput(False, parts, gnorm, "non-finite gradient")
        if self.optimizer is not None:
            self.optimizer.step()
        self._zero()
        logged: dict[str, float] = {}
        if metrics:
            logged = self._gather_figures(local, live_sq)
            parts = parts._replace(per_tap={k[4:]: torch.tensor(v) for k, v in logged.items()
                                            if k.startswith("stp/") and k.count("/") == 1 and k[4:] in
                                            stage.policy.names})
        return StepOutput(True, parts, gnorm, None, logged)

    def _zero(self) -> None:
        if self.keep_gradients:
            return
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.module.zero_grad(set_to_none=True)

    def _sum_tied_gradients(self) -> None:
        """The tied embedding's gradient is the sum of the first stage's (input) and the last's (head); a shared
        block's on several stages is the sum of its uses' on each."""
        groups = [(self.tie_group, self.stage.tied_parameters())] if self.tie_group is not None else []
        groups += [(g, list(self.stage.shared[name].parameters())) for name, g in self.share_groups.items()]
        for group, params in groups:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(_local(p.grad), group=group)

    def _clip(self) -> Tensor | None:
        """Global L2 norm over every stage and shard (the head's tied copy counted once, as the embedding) and
        clip."""
        if self.grad_clip is None:
            return None
        copies = {id(p) for p in self.stage.tied_parameters()} if self.stage.tied_copy else set()
        copies |= {id(p) for p in self.stage.shared_copies()}
        params = [p for p in self.module.parameters() if id(p) not in copies]
        also = [p for p in self.module.parameters() if id(p) in copies]
        limit = self.grad_clip if self.grad_clip > 0 else float("inf")
        return clip_grad_norm(params, limit, self.layout, over_stages=True, also=also)

    def _gather_figures(self, local: dict[str, float], live_sq: float) -> dict[str, float]:
        """Every stage's per-tap figures under their global names, on every rank (logged by rank 0)."""
        mine = {k: v for k, v in local.items() if k.startswith(("stp/", "curv/")) and k != "stp/live_grad_sq"}
        parts: list[Any] = [None] * self.layout.world
        dist.all_gather_object(parts, mine)
        out: dict[str, float] = {}
        counts: dict[str, int] = {}
        for p in parts:  # every replica's stages: a figure is the mean over the data-parallel ranks' rows
            for k, v in p.items():
                out[k] = out.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        out = {k: v / counts[k] for k, v in out.items()}
        per_tap = {k: v for k, v in out.items()}
        for prefix in ("stp/", "curv/tok/"):
            by_label: dict[str, list[float]] = {}
            for k, v in per_tap.items():
                if k.startswith(prefix) and "/" not in k[len(prefix):]:
                    by_label.setdefault(tap_label(k[len(prefix):]), []).append(v)
            for label, vals in by_label.items():
                out[f"{prefix}{label}"] = sum(vals) / len(vals)
        for k in [k for k in out if k.startswith("curv/tok/") and tap_label(k[9:]) != k[9:]]:
            del out[k]  # one figure per family, as one process logs it
        out["stp/live_grad_norm"] = live_sq ** 0.5
        return out
