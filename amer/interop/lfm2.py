"""LFM2 (Liquid AI 2025, ``Lfm2ForCausalLM``): gated short convolutions and attention, each layer followed by a
SwiGLU feed-forward.

A layer is ``x + operator(operator_norm(x))`` then ``x + feed_forward(ffn_norm(x))``, the operator a gated short
convolution (``conv`` in ``layer_types``) or grouped-query attention with per-head q/k RMSNorms
(``full_attention``): two amer blocks, ``CE`` or ``AE``. The options: ``shortconv.l_cache`` (``conv_L_cache``),
``shortconv.bias`` (``conv_bias``), ``attention.qk_norm``, and the feed-forward width LFM2 derives from
``intermediate_size`` (``block_auto_adjust_ff_dim``: two thirds, times ``block_ffn_dim_multiplier``, rounded up to
``block_multiple_of``). The final norm is LFM2's ``embedding_norm``.
"""

from __future__ import annotations

from typing import Any

from amer.config import ModelConfig
from amer.interop.common import (
    Converted,
    attention_options,
    attention_weights,
    converter,
    dense_mlp_weights,
    shared_options,
)
from amer.interop.llama import _embeddings
from amer.interop.source import Source, unsupported

__all__ = ["convert_lfm2", "lfm2_ff_width"]


def lfm2_ff_width(c: dict[str, Any]) -> int:
    """The feed-forward width an LFM2 config gives (transformers' ``Lfm2MLP``)."""
    width = int(c["intermediate_size"])
    if c.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        multiplier = c.get("block_ffn_dim_multiplier", 1.0)
        if multiplier is not None:
            width = int(multiplier * width)
            m = int(c.get("block_multiple_of", 256))
            width = m * ((width + m - 1) // m)
    return width


def _letters(src: Source) -> list[str]:
    L = int(src.config["num_hidden_layers"])
    types = src.cfg("layer_types")
    if types is None:  # the older form: the attention layers' indices
        attn = set(src.cfg("full_attn_idxs") or range(L))
        types = ["full_attention" if i in attn else "conv" for i in range(L)]
    if not isinstance(types, list) or len(types) != L:
        raise unsupported(src.arch, f"layer_types must list one type per layer ({L}), got {types!r}")
    bad = sorted({t for t in types if t not in ("conv", "full_attention")})
    if bad:
        raise unsupported(src.arch, f"layer type {bad[0]!r} (amer maps conv -> C, full_attention -> A)")
    return ["C" if t == "conv" else "A" for t in types]


@converter("Lfm2ForCausalLM")
def convert_lfm2(src: Source) -> Converted:
    c = src.config
    letters = _letters(src)
    attn = {**attention_options(src), "qk_norm": True}
    cfg = ModelConfig(pattern="".join(x + "E" for x in letters), **shared_options(src, eps_key="norm_eps"),
                      attention=attn, moe={"n_experts": 1, "d_ff": lfm2_ff_width(c)},
                      shortconv={"l_cache": int(c.get("conv_L_cache", 3)), "bias": bool(c.get("conv_bias", False))})
    state = _embeddings(src, cfg, norm="model.embedding_norm.weight")
    for i, letter in enumerate(letters):
        pre, blk = f"model.layers.{i}.", 2 * i
        state[f"blocks.{blk}.norm.weight"] = src.get(pre + "operator_norm.weight")
        if letter == "A":
            attention_weights(src, pre + "self_attn.", blk, state, qk_norm=True, out_name="out_proj",
                              norm_names=("q_layernorm", "k_layernorm"))
        else:
            conv, out = pre + "conv.", f"blocks.{blk}.mixer."
            state[out + "conv_weight"] = src.get(conv + "conv.weight").squeeze(1)  # (D, 1, K) -> (D, K)
            for name in ("in_proj.weight", "out_proj.weight") + (
                    ("in_proj.bias", "out_proj.bias") if cfg.shortconv.bias else ()):
                state[out + name] = src.get(conv + name)
            if cfg.shortconv.bias:
                state[out + "conv_bias"] = src.get(conv + "conv.bias")
        state[f"blocks.{blk + 1}.norm.weight"] = src.get(pre + "ffn_norm.weight")
        dense_mlp_weights(src, pre + "feed_forward.", blk + 1, state, names=("w1", "w3", "w2"))
    return Converted(cfg, state)
