"""Matmul FLOPs of a training step, counted from the model's own structure.

The model is built on the meta device (shapes, no storage, no initialisation work) and every block's
mixer reports its forward multiply-adds (:meth:`amer.blocks.common.Mixer.flops`), so a new family
is counted as soon as it is registered, and a count cannot disagree with the shapes the model has.
"""

from __future__ import annotations

import torch

from amer.config import ModelConfig
from amer.model import HybridLM

__all__ = ["forward_macs", "training_flops"]


def forward_macs(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward multiply-adds of one sequence of ``seq_len`` tokens, by ``"{letter}/{term}"`` and
    ``"lm_head"``, keys in order of first appearance along the stack."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    macs: dict[str, float] = {}
    for blk in model.blocks:
        for term, value in blk.mixer.flops(seq_len).items():
            key = f"{blk.layer.family}/{term}"
            macs[key] = macs.get(key, 0.0) + value
    # the tied head counts once, as a matmul; the embedding lookup is not one
    macs["lm_head"] = float(seq_len * model.lm_head.weight.numel())
    return macs


def training_flops(cfg: ModelConfig, batch: int, seq_len: int) -> dict[str, float]:
    """Matmul FLOPs of one training step (forward + backward) of ``cfg`` at ``batch x seq_len``, by term,
    plus ``"total"``.

    The usual MFU convention: useful matmul work only (elementwise ops, norms, softmax, depthwise convs,
    the scans' decay algebra and the optimizer are left out; what each mixer counts is in its ``flops``).
    A multiply-add is 2 FLOPs, and training costs 3 forwards (backward takes the gradient with respect to
    both operands); flash-attention's backward recomputation is not counted.
    """
    flops = {k: 2.0 * 3.0 * v * batch for k, v in forward_macs(cfg, seq_len).items()}
    flops["total"] = sum(flops.values())
    return flops
