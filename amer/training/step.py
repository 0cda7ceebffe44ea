"""One optimizer step, the only one in amer: ``amer train``, ``amer bench`` and the experiments all run it.

Per micro-batch: forward (recording the taps it is asked for, every block by default, on the graph),
``ce + aux + coeff * stp`` (:func:`~amer.objective.total_loss` with the run's :class:`~amer.stp.STPPolicy`),
a non-finite guard, the log figures read from the taps when asked,
then the model output is dropped and ``loss / grad_accum`` is backpropagated. After the last micro-batch:
gradient clipping, a second non-finite guard on the gradient norm, the optimizer step, zeroed gradients.
A skipped step applies nothing and says why.

On XLA (``--device xla``) the same step cuts one compiled graph per micro-step (forward + backward) and one
for clipping and the optimizer, and reads nothing back inside the step: the STP gate goes in as a tensor,
the log figures (losses, gradient norm, the blocks' statistics) stay on the device and are read only when asked
for, and the non-finite guard is a tensor too: a non-finite step applies a zero gradient (weight decay and
the moment decay of AdamW still act) and comes back with ``finite`` False when its figures are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from amer import xla
from amer.analysis.metrics import training_metrics
from amer.objective import LossBreakdown, total_loss
from amer.runtime import autocast
from amer.stp import STPPolicy

__all__ = ["StepOutput", "TrainStep"]


@dataclass
class StepOutput:
    applied: bool  # False: the step was skipped and nothing was applied
    loss: LossBreakdown  # means over the micro-batches of the step (per-tap STP: the last micro-batch's)
    grad_norm: Tensor | None = None  # before clipping; None when skipped early or not clipping
    skipped_reason: str | None = None  # "non-finite loss" | "non-finite gradient"
    metrics: dict[str, float] = field(default_factory=dict)  # log figures, when asked for
    finite: bool | None = None  # XLA, when metrics were read: whether the applied step was finite


class TrainStep:
    """Everything a step needs, fixed for a run; call it once per optimizer step.

    ``optimizer=None`` runs forward and backward only (gradients are then dropped), for benchmarks.
    ``grad_clip`` clips the global norm (0 computes the norm without clipping, None skips the norm and
    its guard). ``taps`` is what the forward records (``True`` every block, as training does).
    ``hold_output`` keeps the model output alive through backward (a benchmark of what releasing saves).
    ``documents`` passes a batch's ``doc_ids`` to the model, so no block sees across a packed document
    boundary (``--packing documents``); False runs blocks straight through (``--packing none``).
    ``shard=(index, count)`` (data parallel): each micro-batch is a *global* batch and this rank runs rows
    ``index * b : (index + 1) * b`` of it (``b = rows / count``); STP spans are drawn for the global batch
    so every rank regularises exactly what one process would. ``agree(ok)`` turns a rank's "loss is
    finite" into the verdict of all ranks, so they skip a step together. ``fused_ce`` (default): the model
    skips its LM head and the loss fuses head and cross-entropy chunk by chunk, never holding the logits.
    ``clip(params, limit)`` clips and returns the global norm (default ``torch.nn.utils.clip_grad_norm_``;
    scale-out passes one that knows parameters sharded over several meshes).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, policy: STPPolicy, *,
                 grad_accum: int = 1, grad_clip: float | None = 1.0, dtype: str = "float32",
                 stp_generator: torch.Generator | None = None, taps: bool | str = True,
                 hold_output: bool = False, documents: bool = True, shard: tuple[int, int] | None = None,
                 agree: Callable[[bool], bool] | None = None, fused_ce: bool = True,
                 clip: Callable[[list[torch.nn.Parameter], float], Tensor] | None = None) -> None:
        self.model, self.optimizer, self.policy = model, optimizer, policy
        self.fused_ce = fused_ce
        self.grad_accum, self.grad_clip, self.dtype = grad_accum, grad_clip, dtype
        self.stp_generator = stp_generator
        self.taps, self.hold_output, self.documents = taps, hold_output, documents
        self.shard, self.agree = shard, agree or (lambda ok: ok)
        self.clip = clip or torch.nn.utils.clip_grad_norm_
        self.device = next(model.parameters()).device
        self.xla = xla.is_xla(self.device)
        if self.xla and optimizer is not None:
            xla.prime_optimizer(optimizer)

    def __call__(self, micro_batches: Iterable[Mapping[str, Tensor]], step: int, *, lr: float | None = None,
                 metrics: bool = False) -> StepOutput:
        """``micro_batches`` yields ``grad_accum`` batches of ``tokens``, ``targets`` (and ``doc_ids``, the
        packed-document ids that keep STP triples inside one document; ``stp_content``, the span form's allowed
        endpoints). ``step`` sets the STP coefficient."""
        if lr is not None and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        batches = iter(micro_batches)
        logged: dict[str, float] = {}
        parts: LossBreakdown | None = None
        sums = torch.zeros(4, device=self.device)  # total, ce, aux, stp over the micro-batches, for the log
        held: list[Any] = []
        # XLA: the gate is an input. A (1,) host tensor, not a scalar: torch_xla shares one device buffer among
        # equal scalars, so a gate of 0 would alias another 0 in the graph and compile a different graph.
        gate = torch.tensor([self.policy.coefficient(step)]).to(self.device).reshape(()) if self.xla else None
        stats: dict[str, Tensor] = {}
        for micro in range(self.grad_accum):
            batch = {k: v.to(self.device) for k, v in next(batches).items()}
            # STP spans are drawn for the whole (global) batch; the model sees this rank's rows
            batch_doc_ids, content, rows = batch.get("doc_ids"), batch.get("stp_content"), None
            if self.shard is not None:
                rows = _rows(batch["tokens"].shape[0], *self.shard)
                batch = {k: v[rows] for k, v in batch.items()}
            doc_ids = batch.get("doc_ids")
            with autocast(self.dtype, self.device):
                out = self.model(batch["tokens"], taps=self.taps, doc_ids=doc_ids if self.documents else None,
                                 head=not self.fused_ce)
            parts = total_loss(self.policy, out, batch["targets"], step, doc_ids=batch_doc_ids,
                               generator=self.stp_generator, rows=rows, content=content, gate=gate)
            if self.xla:  # kept every step (same graph outputs every step), read only on log steps
                stats = {k: v for k, v in out.stats.items() if k.count("/") == 1}
            elif not self.agree(bool(torch.isfinite(parts.total))):
                self._drop_gradients()
                return StepOutput(False, parts, skipped_reason="non-finite loss")
            if metrics and micro == self.grad_accum - 1 and not self.xla:  # read the taps now: released before backward
                logged = self._metrics(parts, out, doc_ids)
            sums += torch.stack([parts.total.detach(), parts.ce.detach(), parts.aux.detach(),
                                 parts.stp.detach()]).float()
            loss = parts.total / self.grad_accum
            if self.hold_output:
                held.append(out)
            # Autograd frees each saved activation once its node has run; a live output (logits, taps)
            # would pin the residual stream until the step ends.
            del out
            loss.backward()
            xla.sync(self.device)  # XLA: the micro-step's graph ends here
        held.clear()
        assert parts is not None
        if self.grad_accum > 1:
            total, ce, aux, stp = (sums / self.grad_accum).unbind(0)
            parts = parts._replace(total=total, ce=ce, aux=aux, stp=stp)
        gnorm = None
        if self.grad_clip is not None:
            limit = self.grad_clip if self.grad_clip > 0 else float("inf")
            gnorm = self.clip(list(self.model.parameters()), limit)
            if not self.xla and not torch.isfinite(gnorm):
                self._drop_gradients()
                return StepOutput(False, parts, gnorm, "non-finite gradient", logged)
        if self.xla:
            return self._apply_xla(parts, gnorm, sums, stats, metrics)
        if self.optimizer is not None:
            self.optimizer.step()
        self._drop_gradients()
        return StepOutput(True, parts, gnorm, None, logged)

    def _apply_xla(self, parts: LossBreakdown, gnorm: Tensor | None, sums: Tensor, stats: dict[str, Tensor],
                   metrics: bool) -> StepOutput:
        """The optimizer graph: a non-finite loss or gradient zeroes the gradient (tensor-space guard), then
        the step is applied; figures are read back (one transfer) only when ``metrics`` asks."""
        finite = torch.isfinite(sums).all()
        if gnorm is not None:
            finite = finite & torch.isfinite(gnorm)
        for p in self.model.parameters():
            if p.grad is not None:  # where, not a multiply: NaN * 0 is NaN
                p.grad.copy_(torch.where(finite, p.grad, torch.zeros((), dtype=p.grad.dtype, device=p.grad.device)))
        if self.optimizer is not None:
            self.optimizer.step()
        self._drop_gradients()
        xla.sync(self.device)
        if not metrics:
            return StepOutput(True, parts, gnorm)
        logged = {k: float(v) for k, v in stats.items()}
        return StepOutput(True, parts, gnorm, None, logged, finite=bool(finite))

    def _drop_gradients(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)

    def _metrics(self, parts: LossBreakdown, out: Any, doc_ids: Tensor | None) -> dict[str, float]:
        """What the log shows besides the losses: proof STP is live, per-family curvature, the blocks' own
        figures (e.g. MoE load)."""
        live = self.policy.live_grad_norm(parts.coeff, parts.stp, out.taps) if out.taps is not None else 0.0
        logged = {"stp/live_grad_norm": live}
        if out.taps is not None and len(out.taps) == len(out.taps.pattern.layers) + 2:
            logged.update(training_metrics(out.taps, parts.per_tap, doc_ids=doc_ids))
        logged.update({k: float(v) for k, v in out.stats.items() if k.count("/") == 1})
        return logged


def _rows(n: int, index: int, count: int) -> slice:
    """Rows of a global batch of ``n`` that data-parallel rank ``index`` of ``count`` runs."""
    if n % count:
        raise ValueError(f"a global batch of {n} rows does not split evenly over {count} data-parallel ranks")
    b = n // count
    return slice(index * b, (index + 1) * b)
