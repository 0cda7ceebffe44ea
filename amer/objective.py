"""The training objective: ``total = ce + sum(aux) + coeff(step) * stp``, assembled from a model output.

Cross-entropy is here (fused with the LM head when the model ran without it); the auxiliary losses are
whatever the blocks returned, each named by its family (the E block's ``moe_lb`` and ``moe_z``...), summed;
the STP term, its coefficient and its taps come from :class:`~amer.stp.policy.STPPolicy`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from amer.model import ModelOutput
from amer.ops.linear_ce import linear_cross_entropy
from amer.stp.policy import STPPolicy

__all__ = ["LossBreakdown", "cross_entropy", "total_loss"]


class LossBreakdown(NamedTuple):
    total: Tensor  # what backward() is called on
    ce: Tensor  # next-token cross-entropy
    aux: Tensor  # sum of the (already weighted) auxiliary losses of the blocks
    stp: Tensor  # the unweighted STP loss over the selected taps (0 when STP is off)
    coeff: float  # the STP coefficient in force at this step
    per_tap: dict[str, Tensor]  # unweighted STP loss of each selected tap, by tap name
    aux_parts: dict[str, Tensor] = {}  # each auxiliary loss by the name its family gave it


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


def total_loss(policy: STPPolicy, out: ModelOutput, targets: Tensor, step: int, *, doc_ids: Tensor | None = None,
               generator: torch.Generator | None = None, ignore_index: int = -100, rows: slice | None = None,
               content: Tensor | None = None, gate: Tensor | None = None) -> LossBreakdown:
    """``ce + sum(aux) + coeff * stp``. At coefficient 0 the STP term is not part of the graph at all, so loss
    and gradients equal plain cross-entropy plus the auxiliary losses exactly.

    ``doc_ids``, ``generator``, ``rows``, ``content``: as :meth:`STPPolicy.stp_loss` takes them. ``gate``: the
    coefficient as a 0-dim tensor (compiled graphs, XLA): the STP term is then always in the graph, multiplied
    by it, so opening or ramping the gate changes an input, never the graph."""
    ce = cross_entropy(out, targets, ignore_index)
    aux = sum(out.aux_losses.values(), torch.zeros((), device=ce.device))
    total = ce + aux
    coeff = policy.coefficient(step)
    if policy.enabled and out.taps is not None:
        stp, per_tap = policy.stp_loss(out.taps, doc_ids=doc_ids, generator=generator, rows=rows, content=content)
        if gate is not None:
            total = total + gate.to(stp.dtype) * stp
        elif coeff > 0:
            total = total + coeff * stp
    else:
        stp, per_tap = torch.zeros((), device=ce.device), {}
    return LossBreakdown(total, ce, aux, stp, coeff, per_tap, dict(out.aux_losses))
