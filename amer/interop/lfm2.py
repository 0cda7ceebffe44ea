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

from torch import Tensor

from amer.config import ModelConfig
from amer.interop.common import (
    Converted,
    attention_options,
    attention_weights,
    converter,
    dense_mlp_weights,
    layer_letters,
    shared_options,
)
from amer.interop.llama import _embeddings
from amer.interop.source import Source

__all__ = ["convert_lfm2", "lfm2_ff_width", "lfm2_letters", "shortconv_weights", "operator_weights", "W1W3W2"]

W1W3W2 = ("w1", "w3", "w2")  # LFM2's names of the gate, up and down projections


def lfm2_ff_width(c: dict[str, Any]) -> int:
    """The feed-forward width an LFM2 config gives (transformers' ``Lfm2MLP``)."""
    width = int(c.get("block_ff_dim") or c["intermediate_size"])  # the legacy key wins, as in the class
    if c.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        multiplier = c.get("block_ffn_dim_multiplier", 1.0)
        if multiplier is not None:
            width = int(multiplier * width)
            m = int(c.get("block_multiple_of", 256))
            width = m * ((width + m - 1) // m)
    return width


def lfm2_letters(src: Source) -> list[str]:
    """Each layer's letter: ``C`` for a ``conv`` layer, ``A`` for ``full_attention``."""
    types = src.cfg("layer_types")
    if types is None:  # the older form: the attention layers' indices
        L = int(src.config["num_hidden_layers"])
        attn = set(src.cfg("full_attn_idxs") or range(L))
        types = ["full_attention" if i in attn else "conv" for i in range(L)]
    return layer_letters(src, types, {"conv": "C", "full_attention": "A"})


def shortconv_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], bias: bool) -> None:
    """An LFM2 ``ShortConv`` (``pre`` ends in ``conv.``) into block ``blk``'s C mixer."""
    out = f"blocks.{blk}.mixer."
    state[out + "conv_weight"] = src.get(pre + "conv.weight").squeeze(1)  # (D, 1, K) -> (D, K)
    for name in ("in_proj", "out_proj"):
        state[f"{out}{name}.weight"] = src.get(f"{pre}{name}.weight")
        if bias:
            state[f"{out}{name}.bias"] = src.get(f"{pre}{name}.bias")
    if bias:
        state[out + "conv_bias"] = src.get(pre + "conv.bias")


def operator_weights(src: Source, i: int, letter: str, conv_bias: bool, state: dict[str, Tensor]) -> None:
    """Layer ``i``'s operator (``A``: attention with per-head q/k norms, ``C``: a short convolution) into block
    ``2 i``, with the norms of both of the layer's blocks (the feed-forward's weights are the caller's)."""
    pre, blk = f"model.layers.{i}.", 2 * i
    state[f"blocks.{blk}.norm.weight"] = src.get(pre + "operator_norm.weight")
    if letter == "A":
        attention_weights(src, pre + "self_attn.", blk, state, qk_norm=True, out_name="out_proj",
                          norm_names=("q_layernorm", "k_layernorm"))
    else:
        shortconv_weights(src, pre + "conv.", blk, state, conv_bias)
    state[f"blocks.{blk + 1}.norm.weight"] = src.get(pre + "ffn_norm.weight")


@converter("Lfm2ForCausalLM")
def convert_lfm2(src: Source) -> Converted:
    c = src.config
    letters = lfm2_letters(src)
    attn = {**attention_options(src), "qk_norm": True}
    cfg = ModelConfig(pattern="".join(x + "E" for x in letters), **shared_options(src, eps_key="norm_eps"),
                      attention=attn, moe={"n_experts": 1, "d_ff": lfm2_ff_width(c)},
                      shortconv={"l_cache": int(c.get("conv_L_cache", 3)), "bias": bool(c.get("conv_bias", False))})
    state = _embeddings(src, cfg, norm="model.embedding_norm.weight")
    for i, letter in enumerate(letters):
        operator_weights(src, i, letter, cfg.shortconv.bias, state)
        dense_mlp_weights(src, f"model.layers.{i}.feed_forward.", 2 * i + 1, state, names=W1W3W2)
    return Converted(cfg, state)
