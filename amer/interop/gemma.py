"""RecurrentGemma (Griffin, De et al. 2024, arXiv 2402.19427): recurrent and local-attention layers.

Each layer is ``x + temporal(norm1(x))`` then ``x + mlp(norm2(x))``: ``RE`` or ``AE`` in amer. Its
recurrent block is amer's ``R`` block; what RecurrentGemma adds is expressed by options: biases on
every projection (``recurrent.bias``, ``moe.bias``, ``attention.out_bias``), a first input without the
RG-LRU normaliser (``recurrent.normalise_first``), ``(1 + w)`` RMSNorm gains (``norm_offset``),
embeddings scaled by sqrt(d) (``embed_scale``), a GeGLU MLP (``moe.activation``), logit soft-capping
(``logit_softcap``) and local multi-query attention with half-width rotary (``attention.window``,
``attention.rope_fraction``).
"""

from __future__ import annotations

import math

import torch

from amer.config import ModelConfig
from amer.interop.common import (
    Converted,
    attention_options,
    attention_weights,
    converter,
    dense_mlp_weights,
    tied_embeddings,
)
from amer.interop.source import Source, unsupported

__all__ = ["convert_recurrent_gemma", "embed_scale"]

# transformers' activations that compute the tanh GeLU (gelu_fast to 1e-12 in float64)
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh", "gelu_accurate")


def embed_scale(d_model: int) -> float:
    """RecurrentGemma's embedding multiplier: sqrt(d) held as a bfloat16 constant (its reference implementation's)."""
    return float(torch.tensor(math.sqrt(d_model), dtype=torch.bfloat16).float())


@converter("RecurrentGemmaForCausalLM")
def convert_recurrent_gemma(src: Source) -> Converted:
    c = src.config
    L, d = int(c["num_hidden_layers"]), int(c["hidden_size"])
    act = c.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in GELU_TANH:
        raise unsupported(src.arch, f"hidden_activation={act!r} (amer's R gate and GeGLU use the tanh GeLU)")
    kinds = (list(c.get("block_types") or ["recurrent", "recurrent", "attention"]) * L)[:L]
    bad = sorted({k for k in kinds if k not in ("recurrent", "attention")})
    if bad:
        raise unsupported(src.arch, f"block type {bad[0]!r} (supported: recurrent, attention)")
    letters = ["R" if k == "recurrent" else "A" for k in kinds]
    n_heads = int(c["num_attention_heads"])
    width = int(c.get("lru_width") or d)
    attn = attention_options(src, window=int(c.get("attention_window_size") or c.get("sliding_window") or 2048))
    attn.update(head_dim=d // n_heads, out_bias=True)
    attn["qkv_bias"] = bool(c.get("attention_bias", False))
    cfg = ModelConfig(pattern="".join(x + "E" for x in letters), d_model=d, vocab_size=int(c["vocab_size"]),
                      max_seq_len=int(c.get("max_position_embeddings") or 1 << 20),
                      tie_embeddings=tied_embeddings(src), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                      norm_offset=1.0, embed_scale=embed_scale(d), logit_softcap=c.get("logits_soft_cap") or None,
                      attention=attn,
                      recurrent={"lru_width": width, "n_heads": n_heads, "d_conv": int(c.get("conv1d_width", 4)),
                                 "c": 8.0, "bias": True, "normalise_first": False},
                      moe={"n_experts": 1, "d_ff": int(c["intermediate_size"]) // 2, "activation": "gelu_tanh",
                           "bias": True})
    state = {"embed.weight": src.get("model.embed_tokens.weight"), "norm.weight": src.get("model.final_norm.weight")}
    state["lm_head.weight"] = state["embed.weight"] if cfg.tie_embeddings else src.get("lm_head.weight")
    if cfg.tie_embeddings:
        src.get("lm_head.weight", optional=True)
    for i, letter in enumerate(letters):
        pre, blk = f"model.layers.{i}.", 2 * i
        state[f"blocks.{blk}.norm.weight"] = src.get(pre + "temporal_pre_norm.weight")
        t = pre + "temporal_block."
        if letter == "A":
            attention_weights(src, t, blk, state)
        else:
            _recurrent_weights(src, t, blk, state)
        state[f"blocks.{blk + 1}.norm.weight"] = src.get(pre + "channel_pre_norm.weight")
        m = pre + "mlp_block."
        dense_mlp_weights(src, m, blk + 1, state, bias=True)
    return Converted(cfg, state)


def _recurrent_weights(src: Source, pre: str, blk: int, state: dict[str, torch.Tensor]) -> None:
    """linear_y (the GeLU gate branch), linear_x (the recurrence branch), the conv, the RG-LRU gates and
    ``recurrent_param`` (log a = -c softplus(recurrent_param) r, so amer's Lambda is its negation)."""
    out = f"blocks.{blk}.mixer."
    state[out + "in_proj.weight"] = torch.cat([src.get(pre + "linear_y.weight"), src.get(pre + "linear_x.weight")])
    state[out + "in_proj.bias"] = torch.cat([src.get(pre + "linear_y.bias"), src.get(pre + "linear_x.bias")])
    state[out + "out_proj.weight"] = src.get(pre + "linear_out.weight")
    state[out + "out_proj.bias"] = src.get(pre + "linear_out.bias")
    state[out + "conv_weight"] = src.get(pre + "conv_1d.weight").squeeze(1)
    state[out + "conv_bias"] = src.get(pre + "conv_1d.bias")
    lru = pre + "rg_lru."
    state[out + "gate_weight"] = torch.cat([src.get(lru + "recurrent_gate_weight"), src.get(lru + "input_gate_weight")],
                                           dim=-1)
    state[out + "gate_bias"] = torch.cat([src.get(lru + "recurrent_gate_bias"), src.get(lru + "input_gate_bias")],
                                         dim=-1)
    state[out + "Lambda"] = -src.get(lru + "recurrent_param")
