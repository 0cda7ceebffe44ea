"""MiniMax's lightning attention from transformers checkpoints: the N family's options and weights of
``MiniMaxLightningAttention``, and the block options of MiniMax's residual factors.

A MiniMax decoder layer is ``h = norm1(x); x = a1 h + b1 attn(h); h = norm2(x); x = a2 h + b2 moe(h)``: two amer
blocks with ``residual_normed`` and the alpha / beta factors as ``residual_multiplier`` / ``update_multiplier``
(:func:`minimax_block_options`). The decay rates MiniMax stores as buffers (``slope_rate`` and the per-block decays
derived from it) are checked against the N block's rule at the layer's depth, not copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.blocks.lightning import lightning_slopes
from amer.interop.source import Source, unsupported

__all__ = ["lightning_options", "lightning_weights", "minimax_block_options"]

OUTPUT_NORM_EPS = 1e-6  # MiniMaxLightningAttention builds its norm without passing rms_norm_eps
DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def lightning_options(src: Source) -> dict[str, Any]:
    """The N family's options from a MiniMax config (depth counts decoder layers: two blocks each)."""
    c = src.config
    n_heads = int(c["num_attention_heads"])
    act = src.require("hidden_act", ("silu",), "silu", "amer's lightning attention applies silu to q, k, v")
    return {"n_heads": n_heads, "head_dim": int(c.get("head_dim") or int(c["hidden_size"]) // n_heads),
            "activation": act, "decay_exponent": 8.0, "depth_decay": True, "depth_stride": 2, "output_gate": True,
            "norm_eps": OUTPUT_NORM_EPS}


def lightning_weights(src: Source, pre: str, blk: int, layer: int, state: dict[str, Tensor]) -> None:
    """Decoder layer ``layer``'s lightning attention (``pre`` ends in ``self_attn.``) into block ``blk``'s N mixer;
    a stored ``slope_rate`` must be the rate amer derives for that depth."""
    c = src.config
    out = f"blocks.{blk}.mixer."
    state[out + "qkv_proj.weight"] = src.get(pre + "qkv_proj.weight")
    state[out + "gate_proj.weight"] = src.get(pre + "output_gate.weight")
    state[out + "norm.weight"] = src.get(pre + "norm.weight")
    state[out + "out_proj.weight"] = src.get(pre + "out_proj.weight")
    stored = [src.get(pre + name, optional=True) for name in DECAY_BUFFERS]  # derived from slope_rate: read, not kept
    if stored[0] is not None:
        want = lightning_slopes(int(c["num_attention_heads"]), 8.0, (layer, int(c["num_hidden_layers"])))
        if not torch.allclose(stored[0].flatten(), want, rtol=1e-6, atol=0):
            raise unsupported(src.arch, f"{pre}slope_rate {stored[0].flatten().tolist()} is not MiniMax's rule at "
                              f"layer {layer} ({want.tolist()}); amer derives the decay rates")


def minimax_block_options(src: Source, kind: str) -> dict[str, Any]:
    """Block options of MiniMax's ``kind`` sub-layer ("linear_attn", "full_attn" or "mlp"): its alpha / beta
    factors, the residual taken from the normed input."""
    c = src.config
    return {"residual_normed": True, "residual_multiplier": float(c.get(f"{kind}_alpha_factor", 1.0)),
            "update_multiplier": float(c.get(f"{kind}_beta_factor", 1.0))}
