"""Held-out evaluation, the only one in amer: cross-entropy over target tokens (and, given the tokenizer's bytes
per token, bits per byte) and the STP loss of any number of tap selections, with spans fixed by a seed so every
model and every evaluation see the same ones."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from amer import xla
from amer.objective import cross_entropy
from amer.runtime import autocast
from amer.stp import STPPolicy
from amer.training.step import _rows

__all__ = ["evaluate"]

SPAN_SEED = 1234  # STP spans in evaluation: the same for every run, so held-out STP is comparable


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Mapping[str, Tensor]], *,
             stp: Mapping[str, STPPolicy] | None = None, dtype: str = "float32", ignore_index: int = -100,
             visit: Callable[[Any, Mapping[str, Tensor]], None] | None = None,
             taps: bool | str | list[int] | None = None, documents: bool = True,
             token_bytes: Tensor | None = None, shard: tuple[int, int] | None = None,
             reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """``{"loss": CE per target token, "tokens": n, "stp/<name>": mean STP per row, ...}`` over ``batches``.

    Given ``token_bytes`` (the bytes of text each id stands for, 0 for special tokens: the tokenizer's
    ``token_bytes()``), also ``"bpb"`` (when some target is text): the CE of the targets that are text, in bits, per
    byte of that text
    (special targets such as EOS are left out of both sums). Unlike the CE it compares models with different
    tokenizers.

    ``stp`` maps a name to an enabled policy (its selection, spans and family weights are used, not its
    gate); ``visit(output, batch)`` sees every forward, e.g. to collect final hidden states. ``taps`` is
    what the forward records: by default only what the STP selections need (holding every block's state
    would cost memory for nothing); a ``visit`` that reads other taps asks for them. ``documents``: the
    model sees the batches' ``doc_ids`` (packed documents kept apart), as in training.

    Sharded (data parallel): ``shard=(index, count)`` runs rows ``index * b : (index + 1) * b`` of every batch
    (STP spans drawn for the whole batch, as one process draws them) and ``reduce`` sums the figures' numerators
    and denominators over the ranks (a float64 vector, e.g. an all-reduce), so every rank returns what one
    process evaluating all the rows returns.
    """
    device = next(model.parameters()).device
    stp = {k: p for k, p in (stp or {}).items() if p.enabled}
    if taps is None:  # the selections' tap positions, resolved once by the policies
        needed = sorted({pos for p in stp.values() for pos in p.positions})
        taps = needed if needed else False
    gens = {k: torch.Generator(xla.host_generator_device(device)).manual_seed(SPAN_SEED) for k in stp}
    was_training = model.training
    model.eval()
    sums = torch.zeros(5 + len(stp), dtype=torch.float64)  # ce nats, tokens, rows, text nats, text bytes, stp
    table = None if token_bytes is None else token_bytes.to(device=device, dtype=torch.float32)
    share = 1.0 if shard is None else 1.0 / shard[1]
    for raw in batches:
        batch = {k: v.to(device) for k, v in raw.items()}
        full_ids, content, rows = batch.get("doc_ids"), batch.get("stp_content"), None
        # real rows of the whole batch (padding rows have document id -1): the weight of its STP mean
        n_real = (full_ids >= 0).any(1).sum() if full_ids is not None else torch.tensor(batch["tokens"].shape[0])
        if shard is not None:
            rows = _rows(batch["tokens"].shape[0], *shard)
            if full_ids is None:  # spans are drawn for the whole batch: it needs the whole batch's (validity) mask
                full_ids = torch.ones(batch["tokens"].shape, dtype=torch.bool, device=device)
            batch = {k: v[rows] for k, v in batch.items()}
        with autocast(dtype, device):
            out = model(batch["tokens"], taps=taps, doc_ids=batch.get("doc_ids") if documents else None)
        # one read-back per batch (one compiled graph on XLA): CE, target count, real rows, STP losses
        targets = batch["targets"]
        k = (targets != ignore_index).sum()
        figures = [cross_entropy(out.logits, targets, ignore_index) * k, k, n_real * share]
        text: list[Tensor] = []
        if table is not None:  # the nats of the targets that are text, and the bytes of that text
            flat = targets.flatten()
            per_token = F.cross_entropy(out.logits.float().flatten(0, 1), flat, reduction="none",
                                        ignore_index=ignore_index)
            known = (flat >= 0) & (flat < table.shape[0])
            nbytes = torch.where(known, table[flat.clamp(0, table.shape[0] - 1)], 0.0)
            text = [(per_token * (nbytes > 0)).sum(), nbytes.sum()]
        else:
            text = [torch.zeros(()), torch.zeros(())]
        for name, policy in stp.items():  # padding rows (document id -1) hold no span: they add nothing
            # with rows, a rank's loss is its share: the mean over the ranks' shares is the batch's loss
            loss, _ = policy.stp_loss(out.taps, doc_ids=full_ids, generator=gens[name], content=content, rows=rows)
            figures.append(loss * n_real * share)
        values = torch.stack([f.float().to(device) for f in figures[:3] + text + figures[3:]])
        sums += values.cpu().double()
        if visit is not None:
            visit(out, batch)
    model.train(was_training)
    if reduce is not None:
        sums = reduce(sums)
    ce_sum, n_tok, n_rows, text_nats, n_bytes, *stp_sums = sums.tolist()
    res = {"loss": ce_sum / max(n_tok, 1), "tokens": float(round(n_tok))}
    res.update({f"stp/{name}": v / max(n_rows, 1) for name, v in zip(stp, stp_sums)})
    if n_bytes:  # absent, not NaN, when no target is text: a NaN would read as a diverged model
        res["bpb"] = text_nats / math.log(2) / n_bytes
    return res
