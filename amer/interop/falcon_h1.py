"""Falcon-H1 (Zuo et al. 2025, arXiv 2507.22448): attention and Mamba-2 side by side in every layer.

A Falcon-H1 decoder layer is ``x + ssm_out * mamba(ssm_in * norm1(x)) + attn_out * attn(attn_in * norm1(x))`` then
``x + mlp(norm2(x))``: the parallel layer ``[AM]`` (one pre-norm, each branch's input and output multipliers its
block options ``input_multiplier`` / ``update_multiplier``) and an ``E`` block, so L layers are ``([AM]E)*L``.

Falcon-H1's other multipliers scale rows of a linear layer, so they are folded into the weights: the key multiplier
into the key rows of ``qkv``, the per-section muP vector (``ssm_multipliers``: z, x, B, C, dt) into the rows of the
Mamba input projection, the MLP's gate and down multipliers into ``w_gate_up``'s gate columns and ``w_down``. The
embedding and LM-head multipliers are the model's ``embed_scale`` and ``logit_scale``. The Mamba-2 output norm is
``mamba.norm``: Falcon-H1's ``mamba_rms_norm`` false has none, true gates after (``mamba_norm_before_gate``) or
before the norm; its inner width (``mamba_d_ssm``) is ``mamba.d_inner``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.config import ModelConfig
from amer.interop.common import (
    Converted,
    attention_options,
    attention_weights,
    converter,
    dense_mlp_weights,
    mamba_weights,
    mlp_bias,
    shared_options,
)
from amer.interop.llama import _embeddings
from amer.interop.source import Source, unsupported

__all__ = ["convert_falcon_h1", "falcon_h1_mamba", "mup_rows"]


def falcon_h1_mamba(src: Source) -> dict[str, Any]:
    """The M family's options for Falcon-H1's Mamba-2 mixer."""
    c = src.config
    d = int(c["hidden_size"])
    d_ssm = c.get("mamba_d_ssm")
    d_inner = int(d_ssm) if d_ssm is not None else int(c.get("mamba_expand", 2)) * d
    n_heads = int(c["mamba_n_heads"])
    head_dim = c.get("mamba_d_head")
    head_dim = d_inner // n_heads if head_dim in (None, "auto") else int(head_dim)
    if n_heads * head_dim != d_inner:
        raise unsupported(src.arch, f"mamba_n_heads x mamba_d_head ({n_heads} x {head_dim}) differ from the inner "
                          f"width {d_inner}")
    if not src.time_step_limit_is_open():
        raise unsupported(src.arch, f"time_step_limit={c.get('time_step_limit')!r} (amer's Mamba-2 does not clamp "
                          "the time step; supported: (0, inf))")
    if bool(c.get("mamba_proj_bias", False)) != bool(c.get("projectors_bias", False)):
        raise unsupported(src.arch, "mamba_proj_bias and projectors_bias differ (amer's Mamba-2 has one bias "
                          "setting for its input and output projections)")
    norm = "none"
    if c.get("mamba_rms_norm", False):
        norm = "before_gate" if c.get("mamba_norm_before_gate", True) else "gated"
    return {"d_state": int(c["mamba_d_state"]), "d_conv": int(c.get("mamba_d_conv", 4)), "expand": max(1, d_inner // d),
            "d_inner": d_inner, "head_dim": head_dim, "n_groups": int(c.get("mamba_n_groups", 1)),
            "chunk_size": int(c.get("mamba_chunk_size", 256)), "bias": bool(c.get("mamba_proj_bias", False)),
            "norm": norm, "input_multiplier": float(c.get("ssm_in_multiplier", 1.0)),
            "update_multiplier": float(c.get("ssm_out_multiplier", 1.0))}


def mup_rows(c: dict[str, Any], d_inner: int) -> Tensor:
    """Falcon-H1's per-row multipliers of the Mamba input projection's output ``[z | x | B | C | dt]``."""
    mults = c.get("ssm_multipliers") or [1.0] * 5
    gn = int(c.get("mamba_n_groups", 1)) * int(c["mamba_d_state"])
    sizes = [d_inner, d_inner, gn, gn, int(c["mamba_n_heads"])]
    return torch.cat([torch.full((n,), float(m)) for n, m in zip(sizes, mults)])


@converter("FalconH1ForCausalLM")
def convert_falcon_h1(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the E feed-forward and the Mamba-2 conv use silu")
    L = int(c["num_hidden_layers"])
    attn = attention_options(src)
    attn.update(input_multiplier=float(c.get("attention_in_multiplier", 1.0)),
                update_multiplier=float(c.get("attention_out_multiplier", 1.0)))
    mamba = falcon_h1_mamba(src)
    cfg = ModelConfig(pattern=f"([AM]E)*{L}", **shared_options(src), attention=attn, mamba=mamba,
                      moe={"n_experts": 1, "top_k": 1, "d_ff": int(c["intermediate_size"]), "bias": mlp_bias(src)},
                      embed_scale=float(c.get("embedding_multiplier", 1.0)),
                      logit_scale=float(c.get("lm_head_multiplier", 1.0)))
    state = _embeddings(src, cfg, norm="model.final_layernorm.weight")
    gate_mult, down_mult = (float(m) for m in (c.get("mlp_multipliers") or [1.0, 1.0]))
    key_mult = float(c.get("key_multiplier", 1.0))
    rows = mup_rows(c, mamba["d_inner"])
    n_q = attn["n_heads"] * attn["head_dim"]
    n_k = attn["n_kv_heads"] * attn["head_dim"]
    for i in range(L):
        pre, a, e = f"model.layers.{i}.", f"blocks.{3 * i}.", f"blocks.{3 * i + 2}."
        state[a + "norm.weight"] = src.get(pre + "input_layernorm.weight")
        attention_weights(src, pre + "self_attn.", 3 * i, state)
        for key in ("qkv.weight", "qkv.bias"):
            if a + "mixer." + key in state:  # the key multiplier scales the key rows
                t = state[a + "mixer." + key].clone()
                t[n_q:n_q + n_k] *= key_mult
                state[a + "mixer." + key] = t
        _falcon_mamba_weights(src, pre + "mamba.", 3 * i + 1, state, rows, mamba["norm"] != "none")
        state[e + "norm.weight"] = src.get(pre + "pre_ff_layernorm.weight")
        dense_mlp_weights(src, pre + "feed_forward.", 3 * i + 2, state, bias=cfg.moe.bias)
        # the MLP multipliers scale the gate's output and the down projection's, their biases included
        for key, down in (("w_gate_up", False), ("b_gate_up", False), ("w_down", True), ("b_down", True)):
            if e + "mixer." + key not in state:
                continue
            t = state[e + "mixer." + key].clone()  # gate_up: the gate's columns first
            if down:
                t *= down_mult
            else:
                t[..., : t.shape[-1] // 2] *= gate_mult
            state[e + "mixer." + key] = t
    return Converted(cfg, state)


def _falcon_mamba_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], rows: Tensor,
                          norm: bool) -> None:
    """Falcon-H1's Mamba-2 mixer, its muP row multipliers folded into the input projection."""
    mamba_weights(src, pre, blk, state, norm=norm)
    out = f"blocks.{blk}.mixer."
    state[out + "in_proj.weight"] = state[out + "in_proj.weight"] * rows[:, None]
    if out + "in_proj.bias" in state:
        state[out + "in_proj.bias"] = state[out + "in_proj.bias"] * rows
