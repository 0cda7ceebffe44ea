"""Held-out evaluation, the only one in amer: cross-entropy over target tokens and the STP loss of any
number of tap selections, with spans fixed by a seed so every model and every evaluation see the same ones."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from amer.objective import STPPolicy, cross_entropy
from amer.runtime import autocast

__all__ = ["evaluate"]

SPAN_SEED = 1234  # STP spans in evaluation: the same for every run, so held-out STP is comparable


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Mapping[str, Tensor]], *,
             stp: Mapping[str, STPPolicy] | None = None, dtype: str = "float32", ignore_index: int = -100,
             visit: Callable[[Any, Mapping[str, Tensor]], None] | None = None,
             taps: bool | str | None = None, documents: bool = True) -> dict[str, float]:
    """``{"loss": CE per target token, "tokens": n, "stp/<name>": mean STP per row, ...}`` over ``batches``.

    ``stp`` maps a name to an enabled policy (its selection, spans and family weights are used, not its
    gate); ``visit(output, batch)`` sees every forward, e.g. to collect final hidden states. ``taps`` is
    what the forward records: by default only what the STP selections need (holding every block's state
    would cost memory for nothing); a ``visit`` that reads other taps asks for them. ``documents``: the
    model sees the batches' ``doc_ids`` (packed documents kept apart), as in training.
    """
    device = next(model.parameters()).device
    stp = {k: p for k, p in (stp or {}).items() if p.enabled}
    if taps is None:
        needed = list(dict.fromkeys(name for p in stp.values() for name in p.names))
        taps = ",".join(needed) if needed else False
    gens = {k: torch.Generator(device).manual_seed(SPAN_SEED) for k in stp}
    was_training = model.training
    model.eval()
    ce_sum, n_tok, n_rows = 0.0, 0, 0
    stp_sum = dict.fromkeys(stp, 0.0)
    for raw in batches:
        batch = {k: v.to(device) for k, v in raw.items()}
        with autocast(dtype, device):
            out = model(batch["tokens"], taps=taps, doc_ids=batch.get("doc_ids") if documents else None)
        k = int((batch["targets"] != ignore_index).sum())
        ce_sum += float(cross_entropy(out.logits, batch["targets"], ignore_index)) * k
        n_tok += k
        rows = batch["tokens"].shape[0]
        n_rows += rows
        for name, policy in stp.items():
            stp_sum[name] += float(policy.stp_loss(out.taps, mask=batch.get("doc_ids"), generator=gens[name])[0]) * rows
        if visit is not None:
            visit(out, batch)
    model.train(was_training)
    res = {"loss": ce_sum / max(n_tok, 1), "tokens": float(n_tok)}
    res.update({f"stp/{name}": v / max(n_rows, 1) for name, v in stp_sum.items()})
    return res
