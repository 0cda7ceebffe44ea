"""What the suites time: batches shaped like the training loader's, models, and the training step itself.

The step is :class:`amer.training.step.TrainStep`, the one ``amer train`` runs, so a benchmark measures
the real thing and not a copy that could drift from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from amer.config import ModelConfig, STPConfig, TrainConfig, from_dict, to_dict
from amer.families import families
from amer.model import HybridLM
from amer.stp import STPPolicy
from amer.tap import last_of_each_family
from amer.training.compile import compile_blocks
from amer.training.step import TrainStep

__all__ = ["STP_IN_FORCE", "STP_SPANS", "make_batch", "build_model", "family_config", "single_family_stacks",
           "OPTIMIZER_SETTINGS", "no_stp", "with_stp", "train_step"]

# A step far past any gate and ramp, so the STP coefficient is at its full weight.
STP_IN_FORCE = 10**9
STP_SPANS = (1, 4, 16)
_STP_GENERATOR_SEED = 1234
# What the suites that time a full step hand to the training loop's make_optimizer.
OPTIMIZER_SETTINGS = TrainConfig(lr=1e-4)


def make_batch(vocab: int, batch: int, seq_len: int, seed: int = 0, mean_doc: int = 96) -> dict[str, Tensor]:
    """Random tokens packed into documents of random length (mean ``mean_doc``), like the training loader's:
    ``{"tokens", "targets", "doc_ids"}``, each (batch, seq_len); ``doc_ids`` feeds the STP mask."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    starts = torch.rand(batch, seq_len, generator=g) < 1.0 / mean_doc
    starts[:, 0] = True
    return {"tokens": seq[:, :-1].contiguous(), "targets": seq[:, 1:].contiguous(),
            "doc_ids": starts.long().cumsum(1) - 1}


def build_model(cfg: ModelConfig, seed: int = 0, compile: bool = False) -> HybridLM:
    """The model in training mode; ``compile``: its blocks regionally compiled (``amer bench --compile``)."""
    torch.manual_seed(seed)
    model = HybridLM(cfg).train()
    if compile:
        compile_blocks(model)
    return model


def family_config(base: ModelConfig, pattern: str, **overrides: Any) -> ModelConfig:
    """``base``'s dimensions with another pattern (and overrides such as ``max_seq_len``)."""
    data = to_dict(base)
    data.update(pattern=pattern, **overrides)
    return from_dict(ModelConfig, data)


def single_family_stacks(base: ModelConfig, depth: int, **overrides: Any) -> dict[str, ModelConfig]:
    """One ``depth``-block stack per registered family at ``base``'s dimensions, keyed by family letter."""
    return {s.letter: family_config(base, s.letter * depth, **overrides) for s in families()}


def no_stp(model: HybridLM) -> STPPolicy:
    return STPPolicy(STPConfig(enabled=False), model.pattern)


def with_stp(model: HybridLM, n_spans: int) -> STPPolicy:
    cfg = STPConfig(enabled=True, weight=0.02, n_spans=n_spans, layers=last_of_each_family(model.pattern))
    return STPPolicy(cfg, model.pattern)


def train_step(model: HybridLM, batch: dict[str, Tensor], policy: STPPolicy,
               optimizer: torch.optim.Optimizer | None, *, taps: bool = True, hold_output: bool = False,
               grad_clip: float | None | str = "auto", documents: bool = True,
               fused_ce: bool = True, dtype: str = "float32") -> Callable[[], None]:
    """One call of the training step on ``batch`` with the STP coefficient in force. With an optimizer it
    is the full step (gradient clipping at 1.0 unless ``grad_clip`` says otherwise, the optimizer step);
    without, forward and backward only, with no gradient norm either, so that the figure is the model's
    own work. ``documents``: the model keeps packed documents apart (``--packing documents``); ``fused_ce``:
    the loss fuses LM head and cross-entropy (the training default) or takes the model's logits; ``dtype``: the
    step's autocast (``float32`` or ``bfloat16``)."""
    clip = (1.0 if optimizer is not None else None) if grad_clip == "auto" else grad_clip
    step = TrainStep(model, optimizer, policy, grad_clip=clip,
                     stp_generator=torch.Generator().manual_seed(_STP_GENERATOR_SEED), taps=taps,
                     hold_output=hold_output, documents=documents, fused_ce=fused_ce, dtype=dtype)
    batches = [batch]

    def run() -> None:
        step(batches, STP_IN_FORCE)

    return run
