"""Llama-style decoders: Llama, Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k norm), Mixtral.

Each decoder layer is ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``: two amer blocks, ``A`` then
``E`` (one expert for the dense feed-forward, Mixtral's routed experts otherwise), so L layers become
the pattern ``(AE)*L``.
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
    experts_weights,
    shared_options,
)
from amer.interop.source import Source, unsupported

__all__ = ["convert_llama", "convert_mixtral", "layer_window"]


def layer_window(src: Source) -> int | None:
    """The one sliding window every layer uses (None: full attention). Layers that differ are refused: amer
    has one attention config per model."""
    c = src.config
    window = c.get("sliding_window")
    if "use_sliding_window" in c and not c["use_sliding_window"]:
        window = None
    kinds = set(c.get("layer_types") or [])
    if kinds - {"full_attention", "sliding_attention"}:
        raise unsupported(src.arch, f"layer_types {sorted(kinds)} (expected full_attention / sliding_attention)")
    if len(kinds) == 2:
        raise unsupported(src.arch, "layers mix full and sliding-window attention (amer's A blocks share one "
                          "attention.window)")
    if kinds == {"full_attention"}:
        window = None
    return None if window is None else int(window)


def _common_checks(src: Source) -> None:
    src.require("hidden_act", ("silu",), "silu", "the E feed-forward is SwiGLU")
    src.require("mlp_bias", (False,), False, "the E feed-forward has no biases")


@converter("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
def convert_llama(src: Source) -> Converted:
    c = src.config
    _common_checks(src)
    L = int(c["num_hidden_layers"])
    attn = attention_options(src, window=layer_window(src))
    qk_norm = src.arch == "Qwen3ForCausalLM"
    if src.arch == "Qwen2ForCausalLM":  # Qwen2: biases on q, k, v only
        attn.update(qkv_bias=True, out_bias=False)
    attn["qk_norm"] = qk_norm
    cfg = ModelConfig(pattern=f"(AE)*{L}", **shared_options(src), attention=attn,
                      moe={"n_experts": 1, "top_k": 1, "d_ff": int(c["intermediate_size"])})
    state = _embeddings(src, cfg)
    for i in range(L):
        pre = f"model.layers.{i}."
        state[f"blocks.{2 * i}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        attention_weights(src, pre + "self_attn.", 2 * i, state, qk_norm=qk_norm)
        state[f"blocks.{2 * i + 1}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        dense_mlp_weights(src, pre + "mlp.", 2 * i + 1, state)
    return Converted(cfg, state)


@converter("MixtralForCausalLM")
def convert_mixtral(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the experts are SwiGLU")
    L, E = int(c["num_hidden_layers"]), int(c["num_local_experts"])
    k = int(c.get("num_experts_per_tok", 2))
    moe: dict[str, Any] = {"n_experts": E, "top_k": k, "d_ff": int(c["intermediate_size"]), "renormalize_top1": True,
                           "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.01))}
    cfg = ModelConfig(pattern=f"(AE)*{L}", **shared_options(src),
                      attention=attention_options(src, window=layer_window(src)), moe=moe)
    state = _embeddings(src, cfg)
    for i in range(L):
        pre = f"model.layers.{i}."
        state[f"blocks.{2 * i}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        attention_weights(src, pre + "self_attn.", 2 * i, state)
        state[f"blocks.{2 * i + 1}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        ffn = pre + ("block_sparse_moe." if src.has(pre + "block_sparse_moe.gate.weight") else "mlp.")
        experts_weights(src, ffn, 2 * i + 1, E, state)
    return Converted(cfg, state)


def _embeddings(src: Source, cfg: ModelConfig, *, embed: str = "model.embed_tokens.weight",
                norm: str = "model.norm.weight") -> dict[str, Tensor]:
    """Token embedding, final norm and LM head (the tied head is the embedding)."""
    state = {"embed.weight": src.get(embed), "norm.weight": src.get(norm)}
    if cfg.tie_embeddings:
        src.get("lm_head.weight", optional=True)  # some writers store the tied copy too
        state["lm_head.weight"] = state["embed.weight"]
    else:
        state["lm_head.weight"] = src.get("lm_head.weight")
    return state
