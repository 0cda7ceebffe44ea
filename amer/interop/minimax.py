"""MiniMax-Text-01 (MiniMax 2025, arXiv 2501.08313): lightning attention layers, softmax attention layers and a
Mixtral-style MoE in every layer, with post-norm residual factors.

A decoder layer is ``h = norm1(x); x = a1 h + b1 mixer(h); h = norm2(x); x = a2 h + b2 moe(h)``: two amer blocks
whose residual is the normed input (``residual_normed``) and whose alpha / beta factors are the block options
``residual_multiplier`` / ``update_multiplier`` (:func:`amer.interop.lightning.minimax_block_options`). The mixer is
lightning attention (the N family) for ``linear_attention`` layers and the A family (GQA with RoPE, an optional
sliding window) for ``full_attention`` ones, so the pattern reads e.g. ``(N E N E N E A E)*10``; each family's table
carries the factors of its kind of layer. The router is a softmax top-k renormalised to one (Mixtral's, top-1 included).
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
    experts_weights,
    shared_options,
)
from amer.interop.deepseek import runs
from amer.interop.lightning import lightning_options, lightning_weights, minimax_block_options
from amer.interop.llama import _embeddings
from amer.interop.source import Source, unsupported

__all__ = ["convert_minimax"]

MIXERS = {"linear_attention": "N", "full_attention": "A"}


def _units(letters: list[str]) -> str:
    """The layers' pattern with its shortest repeating unit written once: ``(NENENEAE)*10``, else runs of layers."""
    n = len(letters)
    for size in range(1, n // 2 + 1):
        if n % size == 0 and letters == letters[:size] * (n // size):
            return f"({''.join(x + 'E' for x in letters[:size])})*{n // size}"
    return runs([x + "E" for x in letters])


@converter("MiniMaxForCausalLM")
def convert_minimax(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the experts are SwiGLU and lightning attention uses silu")
    L = int(c["num_hidden_layers"])
    types = c.get("layer_types")
    if not isinstance(types, list) or len(types) != L or any(t not in MIXERS for t in types):
        raise unsupported(src.arch, f"layer_types must list linear_attention / full_attention for each of the {L} "
                          f"layers, got {types!r}")
    E, k = int(c.get("num_local_experts") or c.get("num_experts") or 0), int(c.get("num_experts_per_tok", 2))
    if E < 1:
        raise unsupported(src.arch, "no experts (num_local_experts)")
    moe = {"n_experts": E, "top_k": k, "d_ff": int(c["intermediate_size"]), "renormalize_top1": True,
           "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.001)), **minimax_block_options(src, "mlp")}
    tables: dict[str, Any] = {"moe": moe}
    if "linear_attention" in types:
        tables["lightning"] = {**lightning_options(src), **minimax_block_options(src, "linear_attn")}
    if "full_attention" in types:
        window = c.get("sliding_window")
        # MiniMax's default RoPE turns the whole head (a partial_rotary_factor in the config is not read)
        tables["attention"] = {**attention_options(src, window=None if window is None else int(window)),
                               "rope_fraction": 1.0,
                               **minimax_block_options(src, "full_attn")}
    letters = [MIXERS[t] for t in types]
    cfg = ModelConfig(pattern=_units(letters), **shared_options(src), **tables)
    state = _embeddings(src, cfg)
    for i, letter in enumerate(letters):
        pre, a, e = f"model.layers.{i}.", 2 * i, 2 * i + 1
        state[f"blocks.{a}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        if letter == "N":
            lightning_weights(src, pre + "self_attn.", a, i, state)
        else:
            attention_weights(src, pre + "self_attn.", a, state)
        state[f"blocks.{e}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        _experts(src, pre, e, E, state)
    return Converted(cfg, state)


def _experts(src: Source, pre: str, blk: int, n_experts: int, state: dict[str, Tensor]) -> None:
    """The router and experts of layer ``pre``: ``block_sparse_moe.`` with per-expert w1 / w3 / w2 as MiniMax
    stores them, or ``mlp.`` with the fused tensors."""
    moe = pre + ("block_sparse_moe." if src.has(pre + "block_sparse_moe.gate.weight") else "mlp.")
    experts_weights(src, moe, blk, n_experts, state)
