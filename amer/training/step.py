"""One optimizer step, the only one in amer: ``amer train``, ``amer bench`` and the experiments all run it.

Per micro-batch: forward (recording the taps it is asked for, every block by default, on the graph), ``ce + moe_aux + coeff * stp`` from the
:class:`~amer.objective.STPPolicy`, a non-finite guard, the log figures read from the taps when asked,
then the model output is dropped and ``loss / grad_accum`` is backpropagated. After the last micro-batch:
gradient clipping, a second non-finite guard on the gradient norm, the optimizer step, zeroed gradients.
A skipped step applies nothing and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from amer.analysis.metrics import training_metrics
from amer.objective import LossBreakdown, STPPolicy
from amer.runtime import autocast

__all__ = ["StepOutput", "TrainStep"]


@dataclass
class StepOutput:
    applied: bool  # False: the step was skipped and nothing was applied
    loss: LossBreakdown  # of the last micro-batch run
    grad_norm: Tensor | None = None  # before clipping; None when skipped early or not clipping
    skipped_reason: str | None = None  # "non-finite loss" | "non-finite gradient"
    metrics: dict[str, float] = field(default_factory=dict)  # log figures, when asked for


class TrainStep:
    """Everything a step needs, fixed for a run; call it once per optimizer step.

    ``optimizer=None`` runs forward and backward only (gradients are then dropped), for benchmarks.
    ``grad_clip`` clips the global norm (0 computes the norm without clipping, None skips the norm and
    its guard). ``taps`` is what the forward records (``True`` every block, as training does).
    ``hold_output`` keeps the model output alive through backward (a benchmark of what releasing saves).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, policy: STPPolicy, *,
                 grad_accum: int = 1, grad_clip: float | None = 1.0, dtype: str = "float32",
                 stp_generator: torch.Generator | None = None, taps: bool | str = True,
                 hold_output: bool = False) -> None:
        self.model, self.optimizer, self.policy = model, optimizer, policy
        self.grad_accum, self.grad_clip, self.dtype = grad_accum, grad_clip, dtype
        self.stp_generator = stp_generator
        self.taps, self.hold_output = taps, hold_output
        self.device = next(model.parameters()).device

    def __call__(self, micro_batches: Iterable[Mapping[str, Tensor]], step: int, *, lr: float | None = None,
                 metrics: bool = False) -> StepOutput:
        """``micro_batches`` yields ``grad_accum`` batches of ``tokens``, ``targets`` (and ``doc_ids``, the
        packed-document ids that keep STP triples inside one document). ``step`` sets the STP coefficient."""
        if lr is not None and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        batches = iter(micro_batches)
        logged: dict[str, float] = {}
        parts: LossBreakdown | None = None
        held: list[Any] = []
        for micro in range(self.grad_accum):
            batch = {k: v.to(self.device) for k, v in next(batches).items()}
            mask = batch.get("doc_ids")
            with autocast(self.dtype, self.device):
                out = self.model(batch["tokens"], taps=self.taps)
            parts = self.policy.loss(out, batch["targets"], step, mask=mask, generator=self.stp_generator)
            if not torch.isfinite(parts.total):
                self._drop_gradients()
                return StepOutput(False, parts, skipped_reason="non-finite loss")
            if metrics and micro == self.grad_accum - 1:  # read the taps now: they are released before backward
                logged = self._metrics(parts, out, mask)
            loss = parts.total / self.grad_accum
            if self.hold_output:
                held.append(out)
            # Autograd frees each saved activation once its node has run; a live output (logits, taps)
            # would pin the residual stream until the step ends.
            del out
            loss.backward()
        held.clear()
        assert parts is not None
        gnorm = None
        if self.grad_clip is not None:
            limit = self.grad_clip if self.grad_clip > 0 else float("inf")
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
            if not torch.isfinite(gnorm):
                self._drop_gradients()
                return StepOutput(False, parts, gnorm, "non-finite gradient", logged)
        if self.optimizer is not None:
            self.optimizer.step()
        self._drop_gradients()
        return StepOutput(True, parts, gnorm, None, logged)

    def _drop_gradients(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)

    def _metrics(self, parts: LossBreakdown, out: Any, mask: Tensor | None) -> dict[str, float]:
        """What the log shows besides the losses: proof STP is live, per-family curvature, MoE figures."""
        logged = {"stp/live_grad_norm": self.policy.live_grad_norm(parts, out.taps) if out.taps is not None else 0.0}
        if out.taps is not None and len(out.taps) == len(self.model.blocks) + 2:
            logged.update(training_metrics(out.taps, parts.per_tap, mask=mask))
        logged.update({k: float(v) for k, v in out.stats.items() if k.count("/") == 1})
        return logged
