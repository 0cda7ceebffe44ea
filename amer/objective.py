"""The training objective and the STP runtime policy, in one place.

``total = ce + moe_aux + coeff(step) * stp``. The STP kernel (:mod:`amer.stp`) is pure math; what
is regularised (the tap selection), how strongly (weight, per-family weights) and from when
(start step, linear ramp) is decided here, from :class:`~amer.config.STPConfig`. The selection is
resolved against the pattern when the policy is built, so a selector that selects nothing fails
before the first step rather than silently training without STP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from amer.config import ConfigError, STPConfig
from amer.model import ModelOutput
from amer.ops.linear_ce import linear_cross_entropy
from amer.pattern import Pattern
from amer.stp import stp_per_layer
from amer.stp_span import span_stp_per_layer
from amer.tap import SelectorError, TapSet, resolve_selector, tap_label, tap_names

__all__ = ["LossBreakdown", "STPPolicy", "cross_entropy"]


class LossBreakdown(NamedTuple):
    total: Tensor  # what backward() is called on
    ce: Tensor  # next-token cross-entropy
    aux: Tensor  # sum of the (already weighted) MoE auxiliary losses
    stp: Tensor  # the unweighted STP loss over the selected taps (0 when STP is off)
    coeff: float  # the STP coefficient in force at this step
    per_tap: dict[str, Tensor]  # unweighted STP loss of each selected tap, by tap name


def cross_entropy(logits: Tensor | ModelOutput, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy in fp32; ``ignore_index`` positions (e.g. prompts) are excluded.

    Given a model output instead of logits: its logits, or, when the model ran with ``head=False``
    (training), its head input, the LM head and the cross-entropy fused chunk by chunk
    (:mod:`amer.ops.linear_ce`): the same loss and gradients without ever holding the (B, T, V) logits."""
    if isinstance(logits, ModelOutput):
        if logits.logits is None:
            if logits.head is None:
                raise ValueError("the model output has neither logits nor a head input")
            hd = logits.head
            return linear_cross_entropy(hd.hidden, hd.weight, targets, logit_scale=hd.logit_scale,
                                        logit_softcap=hd.logit_softcap, ignore_index=ignore_index, dtype=hd.dtype)
        logits = logits.logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


class STPPolicy:
    """When and how strongly STP applies, and on which taps.

    >>> policy = STPPolicy(STPConfig(enabled=True, weight=0.1, start_step=100, ramp_steps=50, layers="final"), pattern)
    >>> policy.coefficient(99), policy.coefficient(125), policy.coefficient(1000)
    (0.0, 0.05, 0.1)
    """

    def __init__(self, cfg: STPConfig, pattern: Pattern) -> None:
        self.cfg = cfg
        self.pattern = pattern
        if cfg.enabled:
            try:
                self.positions = resolve_selector(cfg.layers or "", pattern)
            except SelectorError as e:
                raise ConfigError(f"stp.layers: {e}") from None
        else:
            self.positions = []
        names = tap_names(pattern)
        self.names = [names[p] for p in self.positions]
        self.selector = cfg.layers
        fw = cfg.family_weights or {}
        labels = [tap_label(n) for n in self.names]
        self.tap_weights = [float(fw.get(lab, 1.0)) for lab in labels]
        if cfg.enabled and sum(self.tap_weights) <= 0:
            raise ConfigError("stp.family_weights give every selected tap weight 0; at least one must be > 0")

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def coefficient(self, step: int) -> float:
        """0 before ``start_step``, a linear ramp over ``ramp_steps``, then ``weight``."""
        c = self.cfg
        if not c.enabled or step < c.start_step:
            return 0.0
        if c.ramp_steps > 0 and step < c.start_step + c.ramp_steps:
            return c.weight * (step - c.start_step + 1) / c.ramp_steps
        return c.weight

    def selected(self, taps: TapSet) -> list[Tensor]:
        """Hidden states of the selected taps (on the autograd graph), in depth order."""
        return [t.hidden for t in taps.select(self.selector)] if self.cfg.enabled else []

    def stp_loss(self, taps: TapSet, *, mask: Tensor | None = None, generator: torch.Generator | None = None,
                 rows: slice | None = None, content: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted mean STP loss over the selected taps, per-tap losses). Same spans for every tap.
        ``rows``: the taps hold these rows of the batch ``mask`` describes (see :func:`stp_per_layer`).
        ``content``: the positions the span form may use as endpoints (see :mod:`amer.stp_span`; the triple
        form ignores it). ``stp.form`` picks the kernel."""
        hiddens = self.selected(taps)
        if self.cfg.form == "span":
            per_layer = span_stp_per_layer(hiddens, self.cfg.n_spans, mask=mask, content=content,
                                           generator=generator, rows=rows)
        else:
            per_layer = stp_per_layer(hiddens, self.cfg.n_spans, mask=mask, generator=generator, rows=rows)
        w = torch.tensor(self.tap_weights, dtype=per_layer.dtype, device=per_layer.device)
        loss = (per_layer * w).sum() / w.sum()
        return loss, dict(zip(self.names, per_layer.unbind(0)))

    def loss(self, out: ModelOutput, targets: Tensor, step: int, *, mask: Tensor | None = None,
             generator: torch.Generator | None = None, ignore_index: int = -100,
             rows: slice | None = None, content: Tensor | None = None, gate: Tensor | None = None) -> LossBreakdown:
        """``ce + moe_aux + coeff * stp``. At coefficient 0 the STP term is not part of the graph at all,
        so loss and gradients equal plain cross-entropy plus the MoE losses exactly.

        ``gate``: the coefficient as a 0-dim tensor (compiled graphs, XLA): the STP term is then always in
        the graph, multiplied by it, so opening or ramping the gate changes an input, never the graph."""
        ce = cross_entropy(out, targets, ignore_index)
        aux = sum(out.aux_losses.values(), torch.zeros((), device=ce.device))
        total = ce + aux
        coeff = self.coefficient(step)
        if self.cfg.enabled and out.taps is not None:
            stp, per_tap = self.stp_loss(out.taps, mask=mask, generator=generator, rows=rows, content=content)
            if gate is not None:
                total = total + gate.to(stp.dtype) * stp
            elif coeff > 0:
                total = total + coeff * stp
        else:
            stp, per_tap = torch.zeros((), device=ce.device), {}
        return LossBreakdown(total, ce, aux, stp, coeff, per_tap)

    def live_grad_norm(self, breakdown: LossBreakdown, taps: TapSet) -> float:
        """L2 norm of the gradient the weighted STP term puts on the selected taps' hidden states.

        Zero while STP is gated off; non-zero proves the collector is live (the states are on the graph
        and the term reaches them). Differentiates only the small STP sub-graph, not the model.
        """
        hiddens = self.selected(taps)
        if not hiddens or breakdown.coeff == 0.0 or not breakdown.stp.requires_grad:
            return 0.0
        grads = torch.autograd.grad(breakdown.coeff * breakdown.stp, hiddens, retain_graph=True, allow_unused=True)
        sq = sum((g.float().square().sum() for g in grads if g is not None), torch.zeros(()))
        return float(sq.sqrt())
