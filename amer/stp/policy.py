"""The STP runtime policy: which taps are regularised, which loss form, how strongly and from when.

The loss kernels (:mod:`amer.stp.triple`, :mod:`amer.stp.span`) are pure math; what is regularised (the
tap selection), how strongly (weight, per-family weights) and from when (start step, linear ramp) is
decided here, from :class:`~amer.config.STPConfig`. The selection is resolved against the pattern once,
when the policy is built, so a selector that selects nothing fails before the first step rather than
silently training without STP, and no step parses it again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from amer.config import ConfigError, STPConfig
from amer.pattern import Pattern
from amer.stp.span import span_stp_per_layer
from amer.stp.triple import stp_per_layer
from amer.tap import SelectorError, TapSet, resolve_selector, tap_label, tap_names

__all__ = ["STPPolicy"]


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
        return [t.hidden for t in taps.at(self.positions)] if self.cfg.enabled else []

    def stp_loss(self, taps: TapSet, *, doc_ids: Tensor | None = None, generator: torch.Generator | None = None,
                 rows: slice | None = None, content: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted mean STP loss over the selected taps, per-tap losses). Same spans for every tap.
        ``doc_ids``: the batch's (B, T) document ids (or a bool validity mask), which keep spans inside one
        document. ``rows``: the taps hold these rows of the batch ``doc_ids`` describes (see
        :func:`~amer.stp.triple.stp_per_layer`). ``content``: the positions the span form may use as
        endpoints (see :mod:`amer.stp.span`; the triple form ignores it). ``stp.form`` picks the kernel."""
        hiddens = self.selected(taps)
        if self.cfg.form == "span":
            per_layer = span_stp_per_layer(hiddens, self.cfg.n_spans, mask=doc_ids, content=content,
                                           generator=generator, rows=rows)
        else:
            per_layer = stp_per_layer(hiddens, self.cfg.n_spans, mask=doc_ids, generator=generator, rows=rows)
        w = torch.tensor(self.tap_weights, dtype=per_layer.dtype, device=per_layer.device)
        loss = (per_layer * w).sum() / w.sum()
        return loss, dict(zip(self.names, per_layer.unbind(0)))

    def live_grad_norm(self, coeff: float, stp: Tensor, taps: TapSet) -> float:
        """L2 norm of the gradient the weighted STP term ``coeff * stp`` puts on the selected taps' hidden states.

        Zero while STP is gated off; non-zero proves the collector is live (the states are on the graph
        and the term reaches them). Differentiates only the small STP sub-graph, not the model.
        """
        hiddens = self.selected(taps)
        if not hiddens or coeff == 0.0 or not stp.requires_grad:
            return 0.0
        grads = torch.autograd.grad(coeff * stp, hiddens, retain_graph=True, allow_unused=True)
        sq = sum((g.float().square().sum() for g in grads if g is not None), torch.zeros(()))
        return float(sq.sqrt())
