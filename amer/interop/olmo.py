"""OLMo 2 (Team OLMo 2024, "2 OLMo 2 Furious", arXiv 2501.00656) and OLMo-Hybrid (``OlmoHybridForCausalLM``).

OLMo 2: each layer is ``x + post_attn_norm(attn(x))`` then ``x + post_ffw_norm(mlp(x))``: no norm before a sub-layer,
one after it. That is two amer blocks, ``A`` then ``E``, with ``norm_placement = "post"``. OLMo 2's q/k norms span all
heads at once (an RMSNorm over the whole query and key projections): ``attention.qk_norm_scope = "projection"``.

OLMo-Hybrid: gated DeltaNet layers with a few attention layers, each followed by a SwiGLU feed-forward. A
``linear_attention`` layer is pre-norm, ``x + G(input_layernorm(x))`` then ``x + mlp(post_attention_layernorm(x))``:
``G E``. A ``full_attention`` layer is post-norm as in OLMo 2: ``A E.post``, where the attention family's table and
the E variant ``post`` set ``norm_placement = "post"``. Its attention normalises the whole query and key projections
as OLMo 2's does and has no position encoding at all when the config gives no ``rope_theta`` (the released
checkpoints: ``attention.rope_fraction 0``). The DeltaNet layers use ``deltanet.allow_neg_eigval``
(``linear_allow_neg_eigval``) and an output norm epsilon of 1e-5 (fixed there).
"""

from __future__ import annotations

from typing import Any

import torch

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

__all__ = ["convert_olmo2", "convert_olmo_hybrid", "deltanet_options"]

_OUTPUT_NORM_EPS = 1e-5  # OLMo-Hybrid's gated output norm (fla's default), whatever rms_norm_eps says


def deltanet_options(src: Source) -> dict[str, Any]:
    c = src.config
    heads = int(c["num_attention_heads"])
    n_k = int(c.get("linear_num_key_heads") or heads)
    dk = int(c.get("linear_key_head_dim") or int(0.75 * int(c["hidden_size"]) / n_k))
    return {"n_k_heads": n_k, "n_v_heads": int(c.get("linear_num_value_heads") or heads), "head_k_dim": dk,
            "head_v_dim": int(c.get("linear_value_head_dim") or 2 * dk),
            "d_conv": int(c.get("linear_conv_kernel_dim", 4)),
            "allow_neg_eigval": bool(c.get("linear_allow_neg_eigval", True)), "norm_eps": _OUTPUT_NORM_EPS}


def _letters(src: Source) -> list[str]:
    types = src.cfg("layer_types")
    if types is None:  # the config's default: attention in every fourth layer
        L = int(src.config["num_hidden_layers"])
        types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(L)]
        if "full_attention" not in types:
            types[-1] = "full_attention"
    return layer_letters(src, types, {"linear_attention": "G", "full_attention": "A"})


@converter("Olmo2ForCausalLM")
def convert_olmo2(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the E feed-forward is SwiGLU")
    L = int(c["num_hidden_layers"])
    attn = {**attention_options(src), "qk_norm": True, "qk_norm_scope": "projection"}
    cfg = ModelConfig(pattern=f"(AE)*{L}", **shared_options(src), norm_placement="post", attention=attn,
                      moe={"n_experts": 1, "d_ff": int(c["intermediate_size"])})
    state = _embeddings(src, cfg)
    for i in range(L):
        pre, a, e = f"model.layers.{i}.", 2 * i, 2 * i + 1
        attention_weights(src, pre + "self_attn.", a, state, qk_norm=True)
        state[f"blocks.{a}.post_norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        dense_mlp_weights(src, pre + "mlp.", e, state)
        state[f"blocks.{e}.post_norm.weight"] = src.get(pre + "post_feedforward_layernorm.weight")
    return Converted(cfg, state)


@converter("OlmoHybridForCausalLM")
def convert_olmo_hybrid(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the E feed-forward is SwiGLU and the DeltaNet conv uses silu")
    letters = _letters(src)
    params = c.get("rope_parameters") or {}
    nope = params.get("rope_theta", c.get("rope_theta")) is None  # no RoPE at all: the released checkpoints
    attn = {**(attention_options(src) if not nope else _nope_attention(src)), "qk_norm": True,
            "qk_norm_scope": "projection", "norm_placement": "post"}
    moe = {"n_experts": 1, "d_ff": int(c["intermediate_size"]), "variants": {"post": {"norm_placement": "post"}}}
    cfg = ModelConfig(pattern=" ".join("G E" if x == "G" else "A E.post" for x in letters), **shared_options(src),
                      attention=attn, moe=moe, deltanet=deltanet_options(src))
    state = _embeddings(src, cfg)
    for i, letter in enumerate(letters):
        pre, blk = f"model.layers.{i}.", 2 * i
        if letter == "G":
            state[f"blocks.{blk}.norm.weight"] = src.get(_either(src, pre, "attention_layer_norm", "input_layernorm"))
            _deltanet_weights(src, pre + "linear_attn.", blk, state)
            state[f"blocks.{blk + 1}.norm.weight"] = src.get(_either(src, pre, *_FFN_NORM))
        else:
            attention_weights(src, pre + "self_attn.", blk, state, qk_norm=True)
            state[f"blocks.{blk}.post_norm.weight"] = src.get(_either(src, pre, *_FFN_NORM))
            state[f"blocks.{blk + 1}.post_norm.weight"] = src.get(pre + "post_feedforward_layernorm.weight")
        dense_mlp_weights(src, pre + "mlp.", blk + 1, state)
    return Converted(cfg, state)


# the checkpoints' own names, then the names transformers gives them in memory (its loader renames one to the other;
# an attention layer's norm after the attention is the one stored as feedforward_layer_norm)
_FFN_NORM = ("feedforward_layer_norm", "post_attention_layernorm")


def _either(src: Source, pre: str, stored: str, renamed: str) -> str:
    return f"{pre}{stored}.weight" if src.has(f"{pre}{stored}.weight") else f"{pre}{renamed}.weight"


def _nope_attention(src: Source) -> dict[str, Any]:
    c = src.config
    n_heads = int(c["num_attention_heads"])
    bias = bool(c.get("attention_bias", False))
    return {"n_heads": n_heads, "n_kv_heads": int(c.get("num_key_value_heads") or n_heads),
            "head_dim": int(c.get("head_dim") or int(c["hidden_size"]) // n_heads), "rope_fraction": 0.0,
            "qkv_bias": bias, "out_bias": bias}


def _deltanet_weights(src: Source, pre: str, blk: int, state: dict[str, torch.Tensor]) -> None:
    """Separate q, k, v, output-gate (g), beta (b) and decay (a) projections into G's one ``in_proj``."""
    out = f"blocks.{blk}.mixer."
    state[out + "in_proj.weight"] = torch.cat([src.get(f"{pre}{n}_proj.weight") for n in "qkvgba"])
    if src.has(pre + "q_conv1d.weight"):  # the checkpoints keep one conv per q, k, v; transformers concatenates them
        conv = torch.cat([src.get(f"{pre}{n}_conv1d.weight") for n in "qkv"])
    else:
        conv = src.get(pre + "conv1d.weight")
    state[out + "conv_weight"] = conv.squeeze(1)  # (C, 1, K) -> (C, K)
    for name in ("A_log", "dt_bias"):
        state[out + name] = src.get(pre + name)
    state[out + "norm_weight"] = src.get(pre + "o_norm.weight")
    state[out + "out_proj.weight"] = src.get(pre + "o_proj.weight")
