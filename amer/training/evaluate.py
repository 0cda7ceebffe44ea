"""Held-out evaluation, the only one in amer: cross-entropy over target tokens and the STP loss of any
number of tap selections, with spans fixed by a seed so every model and every evaluation see the same ones."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from amer import xla
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
    gens = {k: torch.Generator(xla.host_generator_device(device)).manual_seed(SPAN_SEED) for k in stp}
    was_training = model.training
    model.eval()
    ce_sum, n_tok, n_rows = 0.0, 0, 0
    stp_sum = dict.fromkeys(stp, 0.0)
    for raw in batches:
        batch = {k: v.to(device) for k, v in raw.items()}
        with autocast(dtype, device):
            out = model(batch["tokens"], taps=taps, doc_ids=batch.get("doc_ids") if documents else None)
        # one read-back per batch (one compiled graph on XLA): CE, target count, real rows, STP losses
        figures = [cross_entropy(out.logits, batch["targets"], ignore_index), (batch["targets"] != ignore_index).sum(),
                   (batch["doc_ids"] >= 0).any(1).sum() if "doc_ids" in batch else torch.tensor(batch["tokens"].shape[0])]
        for name, policy in stp.items():  # padding rows (document id -1) hold no span: they add nothing
            loss, _ = policy.stp_loss(out.taps, mask=batch.get("doc_ids"), generator=gens[name],
                                      content=batch.get("stp_content"))
            figures.append(loss)
        ce, k, rows, *stps = torch.stack([f.float().to(device) for f in figures]).tolist()
        k, rows = int(k), int(rows)
        ce_sum += ce * k
        n_tok += k
        n_rows += rows
        for name, loss in zip(stp, stps):
            stp_sum[name] += loss * rows
        if visit is not None:
            visit(out, batch)
    model.train(was_training)
    res = {"loss": ce_sum / max(n_tok, 1), "tokens": float(n_tok)}
    res.update({f"stp/{name}": v / max(n_rows, 1) for name, v in stp_sum.items()})
    return res
