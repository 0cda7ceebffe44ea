"""Pipeline stages at the pattern's ``|`` marks, with the STP gradient seam.

``--parallel.pp S`` runs stage ``s`` of an ``S``-stage pattern (``AEME|AEMR``) on the processes of pipeline
rank ``s``, through ``torch.distributed.pipelining`` (``PipelineStage`` and its GPipe / 1F1B schedules).
The embedding lives on the first stage, the final norm and LM head on the last; a stage keeps the full
model's parameter names (``blocks.5.mixer...``), so checkpoints and tap names are global.

The seam. An auxiliary loss computed on an intermediate stage (STP on its taps, its blocks' auxiliary
losses such as MoE balancing) has no path to the loss the schedule backpropagates from: the schedule only sends
gradients
with respect to the activation a stage handed on. Computed and added to a log, it would be monitoring,
not training. :class:`AuxSeam` attaches the stage's weighted auxiliary loss to the activation it sends
downstream: its forward returns the activation unchanged, its backward passes the incoming gradient
through and gives the auxiliary loss the gradient ``scale``, so when the schedule runs this stage's
backward the auxiliary gradient rejoins the main stream. ``scale`` is ``1 / grad_accum``: the schedule
divides every gradient by the number of microbatches itself, as it does for the cross-entropy. The last
stage applies the same seam to its logits. Summed over the stages, the result is the gradient of
``ce + aux + coeff * stp`` that one process computes for the same microbatches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from amer.analysis.trajectory import token_curvature
from amer.blocks import DocIds, residual_layer
from amer.model import HybridLM, final_logits, scale_embedding
from amer.stp import STPPolicy, sample_patches, sample_spans, span_stp_per_layer, stp_per_layer
from amer.tap import tap_names, tap_positions

__all__ = ["AuxSeam", "StageModule", "stage_layers"]

# Tests flip this to show the seam is what carries the auxiliary gradient (the negative control).
_SEAM_ENABLED = True


class AuxSeam(torch.autograd.Function):
    """Forward-neutral: returns ``h``; backward returns the incoming gradient for ``h`` and ``scale`` for
    the scalar ``aux``, which then backpropagates into the parameters and taps that produced it."""

    @staticmethod
    def forward(ctx, h: Tensor, aux: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        ctx.aux_meta = (aux.dtype, aux.device)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:  # type: ignore[override]
        g_aux = None
        if ctx.needs_input_grad[1]:
            dtype, device = ctx.aux_meta
            g_aux = torch.full((), ctx.scale, dtype=dtype, device=device)
        return grad, g_aux, None


def stage_layers(model: HybridLM, n_stages: int) -> list[list[int]]:
    """Block indices of each stage, from the pattern's ``|`` marks; they must give ``n_stages`` stages."""
    from amer.errors import ConfigError

    pattern = model.pattern
    if pattern.n_stages != n_stages:
        marks = pattern.n_stages - 1
        raise ConfigError(
            f"--parallel.pp {n_stages} needs a pattern with {n_stages - 1} stage mark(s) '|', but "
            f"{pattern.letters!r} has {marks} ({pattern.n_stages} stage{'s' if pattern.n_stages > 1 else ''}); "
            f"cut it with '|', e.g. {_even_split(pattern.letters, n_stages)!r}")
    if n_stages > 1 and model.reads_embedding:  # the embedding output would have to travel with the stream
        raise ConfigError(f"--parallel.pp {n_stages}: {pattern.letters!r} has blocks whose mixers read the embedding "
                          "output (reads_embedding); pipeline stages pass the residual stream only: use pp 1")
    return [[layer.index for layer in pattern.stage_layers(s)] for s in range(n_stages)]


def _even_split(letters: str, n: int) -> str:
    flat = letters.replace("|", "")
    k = max(1, len(flat) // n)
    return "|".join(flat[i * k: (i + 1) * k if i < n - 1 else len(flat)] for i in range(n))


class StageModule(nn.Module):
    """One pipeline stage of a :class:`HybridLM`: its blocks (and the embedding / head at the ends), its
    share of the STP loss and the blocks' auxiliary losses, attached through :class:`AuxSeam`.

    Document ids, the STP span mask and the STP step do not travel between stages: every rank reads the
    same global batch, so the caller hands each stage its microbatches' ids (:meth:`load`) before the
    schedule runs, and the stage takes them in microbatch order (both schedules run a stage's forwards
    in that order). Every stage draws STP spans from an identically seeded generator, so all stages use
    the spans one process would.
    """

    def __init__(self, model: HybridLM, stage: int, n_stages: int, policy: STPPolicy, *, documents: bool = True,
                 stp_generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.stage, self.n_stages = stage, n_stages
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.layers = [model.pattern.layers[i] for i in stage_layers(model, n_stages)[stage]]
        self.n_blocks = len(model.blocks)
        self.policy, self.documents, self.generator = policy, documents, stp_generator
        self.embed = model.embed if self.first else None
        self.model_cfg = model.cfg  # embedding and logit scaling (amer.model.scale_embedding, final_logits)
        self.blocks = nn.ModuleDict({str(layer.index): model.blocks[layer.index] for layer in self.layers})
        uses: dict[str, set[int]] = {}
        for layer in model.pattern.layers:
            if layer.share is not None:
                uses.setdefault(layer.share, set()).add(layer.stage)
        # a shared block is held by every stage that uses it; on several stages its copies form a tied-gradient
        # group (their gradients are summed after backward, as the tied embedding's are)
        self.shared_stages = {name: sorted(stages) for name, stages in sorted(uses.items())}
        self.shared = nn.ModuleDict({name: model.shared[name] for name, stages in self.shared_stages.items()
                                     if stage in stages})
        self.norm = model.norm if self.last else None
        self.tied_copy = False
        self.tied_embed = self.first and not self.last and model.cfg.tie_embeddings
        if self.last and model.cfg.tie_embeddings and not self.first:
            # The head's weight is the embedding's, which lives on the first stage: the last stage keeps a
            # copy whose gradient is summed with the embedding's after each backward (Megatron's approach).
            self.lm_head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False,
                                     device=model.embed.weight.device, dtype=model.embed.weight.dtype)
            with torch.no_grad():
                self.lm_head.weight.copy_(model.embed.weight)
            self.lm_head.weight._no_weight_decay = True  # type: ignore[attr-defined]
            self.tied_copy = True
        else:
            self.lm_head = model.lm_head if self.last else None
        self.where = tap_positions(model.pattern)
        self.residual = [specs for specs in model.pattern.residual_layers if specs[0].stage == stage]
        own = {0} if self.first else set()
        own |= {self.where.block[layer.index] for layer in self.layers}
        own |= {self.where.layer[specs[0].depth] for specs in self.residual}
        if self.last:
            own.add(self.where.final)
        self.stp_taps = [(k, pos) for k, pos in enumerate(policy.positions) if pos in own]
        self.tap_names = tap_names(model.pattern)
        self.width, self.vocab = model.cfg.d_model, model.cfg.vocab_size
        self.step = 0
        self.seam_scale = 1.0
        self.want_metrics = False
        self._pending: list[Tensor | None] = []
        self._spans: list[tuple[Tensor, slice, Tensor]] = []
        self.records: list[dict[str, Tensor]] = []

    def load(self, doc_ids: list[Tensor | None], spans: list[tuple[Tensor, slice, Tensor]] | None = None) -> None:
        """The document ids of the microbatches the next schedule step will run, in order. ``spans`` (evaluation):
        per microbatch, the whole batch's document ids, the microbatch's rows in it and the generator state to
        draw from, so every microbatch of every rank reads its rows of the spans one process draws for the batch."""
        self._pending = list(doc_ids)
        self._spans = list(spans or [])
        self.records = []

    def forward(self, x: Tensor) -> Tensor:
        doc_ids = self._pending.pop(0) if self._pending else None
        docs = DocIds(doc_ids) if self.documents and doc_ids is not None else None
        hiddens: dict[int, Tensor] = {}
        if self.first:
            x = scale_embedding(self.model_cfg, self.embed(x))
            hiddens[0] = x
        aux = torch.zeros((), device=x.device)
        record: dict[str, Tensor] = {}
        for specs in self.residual:
            blocks = [self.blocks[str(layer.index)] for layer in specs]
            x, branch_taps, outs = residual_layer(blocks, x, [None] * len(blocks), docs)
            for layer, hid in zip(specs, branch_taps):
                hiddens[self.where.block[layer.index]] = hid
            hiddens[self.where.layer[specs[0].depth]] = x
            for k, v in ((k, v) for out in outs for k, v in out.aux.items()):
                aux = aux + v
                record[f"aux/{k}"] = record.get(f"aux/{k}", torch.zeros(())) + v.detach().float()
        if self.last:
            h = self.norm(x)
            hiddens[self.where.final] = h
            x = final_logits(self.model_cfg, self.lm_head(h))
        if self.want_metrics:  # token curvature of every tap this stage holds, under its global name
            for pos, hid in hiddens.items():
                record[f"curv/tok/{self.tap_names[pos]}"] = token_curvature(hid.detach(), mask=doc_ids).float()
        aux = aux + self._stp(hiddens, doc_ids, record)
        self.records.append(record)
        if not _SEAM_ENABLED:
            return x
        return AuxSeam.apply(x, aux, self.seam_scale)

    def _stp(self, hiddens: dict[int, Tensor], doc_ids: Tensor | None, record: dict[str, Tensor]) -> Tensor:
        """This stage's share of ``coeff * stp``: its selected taps' weighted losses over the weight of the
        whole selection, so the shares of all stages add up to the single-process loss."""
        policy = self.policy
        some = next(iter(hiddens.values()))
        zero = torch.zeros((), device=some.device)
        if not policy.enabled:
            return zero
        span = policy.cfg.form == "span"  # the span form (amer.stp.span), without a content mask here
        mask, rows = doc_ids, None
        if self._spans:
            mask, rows, state = self._spans.pop(0)
            self.generator.set_state(state)
        if not self.stp_taps:  # draw the spans anyway: every stage's generator stays where one process's is
            n = some.shape[0] if mask is None else mask.shape[0]
            (sample_patches if span else sample_spans)(n, some.shape[1], policy.cfg.n_spans,
                                                       mask=mask, generator=self.generator, device=some.device)
            return zero
        states = [hiddens[pos] for _, pos in self.stp_taps]
        per_layer = (span_stp_per_layer if span else stp_per_layer)(states, policy.cfg.n_spans, mask=mask,
                                                                     generator=self.generator, rows=rows)
        w = torch.tensor([policy.tap_weights[k] for k, _ in self.stp_taps], dtype=per_layer.dtype,
                         device=per_layer.device)
        share = (per_layer * w).sum() / sum(policy.tap_weights)
        record["stp"] = share.detach()
        for (k, _), v in zip(self.stp_taps, per_layer.detach()):
            record[f"stp/{policy.names[k]}"] = v
        coeff = policy.coefficient(self.step)
        if coeff == 0.0:  # gated off: not part of the graph at all, as in one process
            return zero
        if self.want_metrics:
            grads = torch.autograd.grad(coeff * share, states, retain_graph=True, allow_unused=True)
            record["stp/live_grad_sq"] = sum((g.float().square().sum() for g in grads if g is not None),
                                             torch.zeros(()))
        return coeff * share

    def summary(self) -> dict[str, float]:
        """Mean of each recorded figure over the microbatches of the last step (detached floats)."""
        out: dict[str, float] = {}
        for rec in self.records:
            for k, v in rec.items():
                out[k] = out.get(k, 0.0) + float(v) / len(self.records)
        return out

    def tied_parameters(self) -> list[nn.Parameter]:
        """The embedding (first stage) or its copy in the head (last stage), when the two are tied."""
        if self.tied_copy:
            return [self.lm_head.weight]
        return [self.embed.weight] if self.tied_embed else []

    def shared_ties(self) -> list[tuple[str, list[int]]]:
        """(name, stages) of every shared block used on more than one stage, in name order (the same list on every
        rank, so every rank creates the groups in one order)."""
        return [(name, stages) for name, stages in self.shared_stages.items() if len(stages) > 1]

    def shared_copies(self) -> list[nn.Parameter]:
        """The parameters of shared blocks this stage holds that an earlier stage holds too: the global gradient
        norm counts them there, once."""
        return [p for name, stages in self.shared_stages.items() if name in self.shared and stages[0] != self.stage
                for p in self.shared[name].parameters()]

    def extra_state_names(self) -> tuple[str, ...]:
        """Parameter names that are copies, not the model's own (left out of checkpoints)."""
        return ("lm_head.weight",) if self.tied_copy else ()
