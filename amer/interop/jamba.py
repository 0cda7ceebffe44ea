"""Jamba (AI21 2024, Lieber et al., arXiv 2403.19887): Mamba-1 and attention layers, each followed by a feed-forward
that is routed every ``expert_layer_period`` layers and dense elsewhere.

A layer is ``x + mixer(input_layernorm(x))`` then ``x + ffn(pre_ff_layernorm(x))``: two amer blocks, the mixer an S
block (Mamba-1 with weighted RMSNorms on dt, B and C: ``mamba1.dt_bc_norm = "weighted"``) or an A block without
position encoding (``attention.rope_fraction = 0``; the Mamba layers carry the order), the feed-forward an E block
with Jamba's router (softmax top-k, raw weights: ``moe.renormalize = false``) or the variant ``E.dense``. Which
layers are attention and which route is periodic (``attn_layer_period`` / ``offset``, ``expert_layer_period`` /
``offset``), so the pattern is its repeating unit, e.g. ``(S E.dense S E S E.dense S E A E.dense S E S E.dense S E)*4``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from amer.config import ModelConfig
from amer.interop.common import Converted, attention_options, attention_weights, converter, shared_options
from amer.interop.llama import _embeddings
from amer.interop.moe import compact_pattern, ffn_table, ffn_weights, routed_weights, router_options
from amer.interop.source import Source, unsupported

__all__ = ["convert_jamba", "jamba_layers", "mamba1_weights"]


def jamba_layers(src: Source) -> tuple[list[str], list[bool]]:
    """Each layer's mixer (``S`` or ``A``) and whether its feed-forward routes, from the periods and offsets (or the
    ``layers_block_type`` list, where a config writes one)."""
    c = src.config
    L = int(c["num_hidden_layers"])
    types = c.get("layers_block_type")
    if types is None:
        period, offset = int(c.get("attn_layer_period", 8)), int(c.get("attn_layer_offset", 4))
        types = ["attention" if i % period == offset else "mamba" for i in range(L)]
    if not isinstance(types, list) or len(types) != L or set(types) - {"attention", "mamba"}:
        raise unsupported(src.arch, f"layers_block_type must list 'attention' / 'mamba' per layer ({L}), got {types!r}")
    period, offset = int(c.get("expert_layer_period", 2)), int(c.get("expert_layer_offset", 1))
    routed = int(c.get("num_experts") or 1) > 1
    return ["A" if t == "attention" else "S" for t in types], [routed and i % period == offset for i in range(L)]


def mamba1_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor]) -> None:
    """A Jamba Mamba mixer (``pre`` ends in ``mamba.``) into block ``blk``'s S mixer, its dt/B/C norms included."""
    out = f"blocks.{blk}.mixer."
    state[out + "conv_weight"] = src.get(pre + "conv1d.weight").squeeze(1)  # (E, 1, K) -> (E, K)
    for name in ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"):
        state[out + name] = src.get(pre + name)
    for name in ("conv1d.bias", "in_proj.bias", "out_proj.bias"):
        b = src.get(pre + name, optional=True)
        if b is not None:
            state[out + name.replace("conv1d.", "conv_")] = b
    for n in ("dt", "b", "c"):
        state[f"{out}{n}_norm.weight"] = src.get(f"{pre}{n}_layernorm.weight")


@converter("JambaForCausalLM")
def convert_jamba(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the experts are SwiGLU and the Mamba conv is followed by silu")
    mixers, sparse = jamba_layers(src)
    d = int(c["hidden_size"])
    rank = c.get("mamba_dt_rank", "auto")
    mamba1: dict[str, Any] = {
        "d_state": int(c.get("mamba_d_state", 16)), "d_conv": int(c.get("mamba_d_conv", 4)),
        "expand": int(c.get("mamba_expand", 2)), "dt_rank": math.ceil(d / 16) if rank == "auto" else int(rank),
        "conv_bias": bool(c.get("mamba_conv_bias", True)), "bias": bool(c.get("mamba_proj_bias", False)),
        "dt_bc_norm": "weighted", "dt_bc_norm_eps": float(c.get("rms_norm_eps", 1e-6))}
    # Jamba's attention has no position encoding
    attn = {**attention_options(src), "rope_fraction": 0.0}
    routed = router_options(src, d_ff="intermediate_size", renormalize=False) if any(sparse) else None
    moe, ffn = ffn_table(routed, int(c["intermediate_size"]), sparse)
    shared = shared_options(src)
    shared["max_seq_len"] = int(c.get("max_position_embeddings") or 1 << 18)
    cfg = ModelConfig(pattern=compact_pattern([b for pair in zip(mixers, ffn) for b in pair]), **shared,
                      attention=attn, mamba1=mamba1, moe=moe)
    state = _embeddings(src, cfg, norm="model.final_layernorm.weight")
    for i, (mixer, routes) in enumerate(zip(mixers, sparse)):
        pre, blk = f"model.layers.{i}.", 2 * i
        state[f"blocks.{blk}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        if mixer == "S":
            mamba1_weights(src, pre + "mamba.", blk, state)
        else:
            attention_weights(src, pre + "self_attn.", blk, state)
        state[f"blocks.{blk + 1}.norm.weight"] = src.get(pre + "pre_ff_layernorm.weight")
        if routes:
            state[f"blocks.{blk + 1}.mixer.router.weight"] = src.get(pre + "feed_forward.router.weight")
            routed_weights(src, pre + "feed_forward.experts.", blk + 1, cfg.moe.n_experts, state)
        else:
            ffn_weights(src, pre + "feed_forward.", blk + 1, state)
    return Converted(cfg, state)
