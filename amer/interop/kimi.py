"""Kimi Linear (Kimi Team 2025, arXiv 2510.26692): Kimi Delta Attention layers, a few MLA layers without position
encoding, and a DeepSeek-style MoE.

A decoder layer is ``x + mixer(norm1(x))`` then ``x + ffn(norm2(x))``: the mixer is KDA (the G family with its
per-channel decay gate, a low-rank output gate through a sigmoid) for ``linear_attention`` layers and MLA without
RoPE (the D family with ``rope = false``) for ``full_attention`` ones; the feed-forward is dense for the first
``first_k_dense_replace`` layers (``mlp_layer_types`` "dense": the E variant ``dense``) and the MoE otherwise. The
layer types come from ``layer_types`` (as transformers writes them) or from the model's own ``linear_attn_config``
(``kda_layers`` and ``full_attn_layers``, counted from 1).

Checkpoint layout of a KDA layer (``self_attn.``): ``q_proj``, ``k_proj``, ``v_proj``, their depthwise convolutions
``q_conv1d`` / ``k_conv1d`` / ``v_conv1d`` (or one ``conv1d``), ``b_proj``, the decay gate's ``f_a_proj`` /
``f_b_proj`` / ``A_log`` / ``dt_bias`` (under ``forget_gate.`` in memory), the output gate ``g_a_proj`` / ``g_b_proj``,
``o_norm``, ``o_proj``; the feed-forward is ``block_sparse_moe.`` (or ``mlp.``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.config import ModelConfig
from amer.interop.common import Converted, converter, dense_mlp_weights, shared_options
from amer.interop.deepseek import deepseek_moe_options, moe_table, moe_weights, runs
from amer.interop.llama import _embeddings
from amer.interop.mla import mla_options, mla_weights
from amer.interop.source import Source, unsupported

__all__ = ["convert_kimi_linear", "kda_options", "kda_weights"]

MIXERS = {"linear_attention": "G", "full_attention": "D"}


def _linear(c: dict[str, Any], key: str, own: str, default: int) -> int:
    """A KDA size: the model's ``linear_attn_config`` entry, or the flat key transformers writes (the class reads
    them in that order)."""
    value = (c.get("linear_attn_config") or {}).get(own)
    return int(value if value is not None else c.get(key) or default)


def kda_options(src: Source) -> dict[str, Any]:
    """The G family's options of ``KimiLinearDeltaAttention``."""
    c = src.config
    d = _linear(c, "linear_head_dim", "head_dim", 128)
    return {"n_k_heads": _linear(c, "linear_num_heads", "num_heads", 32), "head_k_dim": d, "head_v_dim": d,
            "d_conv": _linear(c, "linear_conv_kernel_dim", "short_conv_kernel_size", 4), "gate": "channel",
            "gate_rank": d, "output_gate": "sigmoid", "out_gate_rank": d,
            "norm_eps": float(c.get("rms_norm_eps", 1e-5))}


def kda_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor]) -> None:
    """A KDA layer (``pre`` ends in ``self_attn.``) into block ``blk``'s G mixer: ``in_proj`` rows are
    ``[q; k; v; g_a; b; f_a]``, the low-rank gates' second halves ``out_gate_proj`` and ``gate_proj``."""
    out = f"blocks.{blk}.mixer."
    fg = pre + "forget_gate." if src.has(pre + "forget_gate.f_a_proj.weight") else pre
    state[out + "in_proj.weight"] = torch.cat([src.get(pre + n + ".weight") for n in
                                               ("q_proj", "k_proj", "v_proj", "g_a_proj", "b_proj")]
                                              + [src.get(fg + "f_a_proj.weight")])
    state[out + "out_gate_proj.weight"] = src.get(pre + "g_b_proj.weight")
    state[out + "gate_proj.weight"] = src.get(fg + "f_b_proj.weight")
    if src.has(pre + "conv1d.weight"):
        conv = src.get(pre + "conv1d.weight")
    else:
        conv = torch.cat([src.get(f"{pre}{n}_conv1d.weight") for n in "qkv"])
    state[out + "conv_weight"] = conv[:, 0]
    state[out + "A_log"] = src.get(fg + "A_log").flatten()
    state[out + "dt_bias"] = src.get(fg + "dt_bias").flatten()
    state[out + "norm_weight"] = src.get(pre + "o_norm.weight")
    state[out + "out_proj.weight"] = src.get(pre + "o_proj.weight")


def _layer_types(src: Source, L: int) -> list[str]:
    c = src.config
    types = c.get("layer_types")
    own = c.get("linear_attn_config") or {}
    if types is None and "kda_layers" in own and "full_attn_layers" in own:
        number = {**{i: "linear_attention" for i in own["kda_layers"]},
                  **{i: "full_attention" for i in own["full_attn_layers"]}}
        types = [number.get(i + 1) for i in range(L)]
    elif types is None:  # the class's default: MLA on every fourth layer from the fifth
        types = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(L)]
    if not isinstance(types, list) or len(types) != L or any(t not in MIXERS for t in types):
        raise unsupported(src.arch, f"layer_types must list linear_attention / full_attention for each of the {L} "
                          f"layers (or linear_attn_config its kda_layers and full_attn_layers), got {types!r}")
    return types


def _sparse(src: Source, L: int) -> list[bool]:
    c = src.config
    kinds = c.get("mlp_layer_types")
    if kinds is None:  # the class's default (it never reads moe_layer_freq)
        k = int(c.get("first_k_dense_replace", 1))
        kinds = ["dense" if i < k else "sparse" for i in range(L)]
    if not isinstance(kinds, list) or len(kinds) != L or any(t not in ("dense", "sparse") for t in kinds):
        raise unsupported(src.arch, f"mlp_layer_types must list dense / sparse for each of the {L} layers, got "
                          f"{kinds!r}")
    return [t == "sparse" for t in kinds]


@converter("KimiLinearForCausalLM")
def convert_kimi_linear(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "KDA's convolution and the feed-forwards use silu")
    src.require("moe_router_activation_func", ("sigmoid",), "sigmoid", "the router scores are sigmoids")
    L = int(c["num_hidden_layers"])
    types, sparse = _layer_types(src, L), _sparse(src, L)
    routed = deepseek_moe_options(src)
    moe, ffn = moe_table(routed, int(c["intermediate_size"]), sparse)
    tables: dict[str, Any] = {"moe": moe}
    if "linear_attention" in types:
        tables["deltanet"] = kda_options(src)
    if "full_attention" in types:
        tables["mla"] = mla_options(src, rope=False)
    shared = shared_options(src)
    shared["max_seq_len"] = int(c.get("model_max_length") or shared["max_seq_len"])
    cfg = ModelConfig(pattern=runs([f"{MIXERS[t]} {e}" for t, e in zip(types, ffn)]), **shared, **tables)
    state = _embeddings(src, cfg)
    for i, kind in enumerate(types):
        pre, a, e = f"model.layers.{i}.", 2 * i, 2 * i + 1
        state[f"blocks.{a}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        if kind == "linear_attention":
            kda_weights(src, pre + "self_attn.", a, state)
        else:
            mla_weights(src, pre + "self_attn.", a, state)
        state[f"blocks.{e}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        ffn_pre = pre + ("mlp." if src.has(pre + "mlp.down_proj.weight") or src.has(pre + "mlp.gate.weight")
                         else "block_sparse_moe.")
        if sparse[i]:
            moe_weights(src, ffn_pre, e, routed, state)
        else:
            dense_mlp_weights(src, ffn_pre, e, state)
    return Converted(cfg, state)
