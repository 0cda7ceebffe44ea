"""Held-out evaluation under torchrun: every rank evaluates its share of the rows with the weights it holds, and
the figures are reduced; no rank ever holds the whole model.

Data parallel (with or without experts split over ranks): :func:`amer.training.evaluate.evaluate` runs this
rank's rows of every batch through the sharded model and sums its numerators and denominators over the ranks.
Pipeline stages: the stage's schedule runs forward only (``schedule.eval``) over the rank's rows, cut into the
training microbatches; the last stage turns the logits into cross-entropy sums, every stage adds its taps'
share of the STP loss, and the sums are reduced over all ranks. STP spans are those one process draws for the
whole batch (every stage reads its microbatch's rows of them), so ``val/stp`` is one process's, as
``val/loss`` and ``val/bpb`` are.

Every rank reads the same padded batches (one batch shape: the pipeline's stages have static shapes, and the
rows must split evenly over the data-parallel ranks); padding rows carry no loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from amer.objective import cross_entropy
from amer.runtime import autocast
from amer.stp import STPPolicy, sample_patches, sample_spans
from amer.training.distributed import Layout
from amer.training.evaluate import SPAN_SEED, evaluate
from amer.training.step import _rows

__all__ = ["sharded_validate", "pipeline_evaluate"]


def _sum_over(group: Any) -> Any:
    def reduce(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    return reduce


def sharded_validate(scaled: Any, policy: STPPolicy, batches: Iterable[Mapping[str, Tensor]], *, dtype: str,
                     documents: bool, token_bytes: Tensor | None) -> dict[str, float]:
    """``{"val/loss", "val/bpb", "val/stp"}`` of the model the ranks hold together (every rank calls it and gets
    the same figures). ``scaled`` is :class:`amer.training.scaleout.Scaled`."""
    layout: Layout = scaled.layout
    if scaled.stage is None:
        res = evaluate(scaled.module, batches, stp={"stp": policy}, dtype=dtype, documents=documents,
                       token_bytes=token_bytes, shard=(layout.dp_rank, layout.dp) if layout.dp > 1 else None,
                       reduce=_sum_over(None))
    else:
        res = pipeline_evaluate(scaled.step_fn, policy, batches, dtype=dtype, documents=documents,
                                token_bytes=token_bytes)
    return {"val/loss": res["loss"], **({"val/bpb": res["bpb"]} if "bpb" in res else {}),
            **({"val/stp": res["stp/stp"]} if "stp/stp" in res else {})}


@torch.no_grad()
def pipeline_evaluate(step: Any, policy: STPPolicy, batches: Iterable[Mapping[str, Tensor]], *,
                      dtype: str = "float32", documents: bool = True, token_bytes: Tensor | None = None,
                      ignore_index: int = -100) -> dict[str, float]:
    """:func:`~amer.training.evaluate.evaluate`'s figures (``loss``, ``bpb``, ``stp/stp``) through the pipeline of
    :class:`~amer.training.pipeline_step.PipelineStep` ``step``: forward only, this rank's rows, reduced over all
    ranks."""
    lay, stage, schedule, m = step.layout, step.stage, step.schedule, step.microbatches
    stp_on = policy.enabled
    gen = torch.Generator().manual_seed(SPAN_SEED)
    saved_gen, stage.generator = stage.generator, gen
    table = None if token_bytes is None else token_bytes.to(device=lay.device, dtype=torch.float32)
    share = 1.0 / (lay.dp * lay.pp)  # figures every rank knows (the batch's real rows) are counted once overall
    sums = torch.zeros(6, dtype=torch.float64)  # ce nats, tokens, rows, text nats, text bytes, stp
    was_training, wanted = stage.training, stage.want_metrics
    stage.eval()
    stage.want_metrics = False  # the training figures (live STP gradient, curvature) are not evaluation's
    try:
        for raw in batches:
            batch = {k: v.to(lay.device) for k, v in raw.items()}
            full_ids = batch.get("doc_ids")
            B, T = batch["tokens"].shape
            n_real = float((full_ids >= 0).any(1).sum()) if full_ids is not None else float(B)
            rows = _rows(B, lay.dp_rank, lay.dp)
            local = {k: v[rows] for k, v in batch.items()}
            mb = (rows.stop - rows.start) // m
            spans = None
            if stp_on:
                mask = full_ids if full_ids is not None else torch.ones(B, T, dtype=torch.bool, device=lay.device)
                start = gen.get_state()
                spans = [(mask, slice(rows.start + i * mb, rows.start + (i + 1) * mb), start) for i in range(m)]
            doc = local.get("doc_ids") if documents else None
            stage.load(list(doc.tensor_split(m)) if doc is not None else [None] * m, spans)
            with autocast(dtype, lay.device):
                # the last stage is handed the targets: the schedule computes its training loss on them too
                target = {"target": local["targets"]} if stage.last else {}
                logits = schedule.eval(local["tokens"], **target) if stage.first else schedule.eval(**target)
            if stp_on:  # one draw for the whole batch, as one process makes
                gen.set_state(start)
                draw = sample_patches if policy.cfg.form == "span" else sample_spans
                draw(B, T, policy.cfg.n_spans, mask=mask, generator=gen, device=lay.device)
                sums[5] += sum(float(r.get("stp", 0.0)) for r in stage.records) * (mb / B) * n_real
            sums[2] += n_real * share
            if stage.last:
                targets = local["targets"]
                k = (targets != ignore_index).sum()
                sums[0] += float(cross_entropy(logits, targets, ignore_index)) * float(k)
                sums[1] += float(k)
                if table is not None:
                    flat = targets.flatten()
                    per_token = F.cross_entropy(logits.float().flatten(0, 1), flat, reduction="none",
                                                ignore_index=ignore_index)
                    known = (flat >= 0) & (flat < table.shape[0])
                    nbytes = torch.where(known, table[flat.clamp(0, table.shape[0] - 1)], 0.0)
                    sums[3] += float((per_token * (nbytes > 0)).sum())
                    sums[4] += float(nbytes.sum())
    finally:
        stage.generator, stage.want_metrics = saved_gen, wanted
        stage.train(was_training)
        stage.load([])
    dist.all_reduce(sums)
    ce_sum, n_tok, n_rows, text_nats, n_bytes, stp_sum = sums.tolist()
    res = {"loss": ce_sum / max(n_tok, 1), "tokens": float(round(n_tok))}
    if stp_on:
        res["stp/stp"] = stp_sum / max(n_rows, 1)
    if n_bytes:
        res["bpb"] = text_nats / math.log(2) / n_bytes
    return res
