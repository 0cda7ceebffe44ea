"""Llama-style decoders: Llama, Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k norm; mixed sliding and
full layers as the variant ``A.swa``), Granite (multipliers), Phi-3 (fused projections, partial RoPE), Mixtral.

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
    mlp_bias,
    shared_options,
)
from amer.interop.defaults import SLIDING_WINDOW
from amer.interop.source import Source, unsupported

__all__ = ["convert_llama", "convert_mixtral", "layer_window", "layer_windows", "attention_layers"]


def layer_window(src: Source) -> int | None:
    """The one sliding window every layer uses (None: full attention) in the classes that read ``sliding_window``
    (another class ignores one its config names). Layers that differ are refused: amer has one attention config
    per model. Phi-3 slides every layer whatever ``layer_types`` says."""
    c = src.config
    window = c.get("sliding_window") if src.arch in SLIDING_WINDOW else None
    if "use_sliding_window" in c and not c["use_sliding_window"]:
        window = None
    kinds = set(c.get("layer_types") or []) if src.arch != "Phi3ForCausalLM" else set()
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


def layer_windows(src: Source) -> list[int | None]:
    """Each layer's sliding window (None: full attention) for the classes that read ``layer_types`` (Qwen2, Qwen3):
    the list itself, or, where a config has none, sliding from layer ``max_window_layers`` on (as their configs
    derive it)."""
    c = src.config
    L = int(c["num_hidden_layers"])
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    kinds = c.get("layer_types")
    if kinds is None:
        first = int(c.get("max_window_layers", L))
        kinds = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(L)]
    if not isinstance(kinds, list) or len(kinds) != L:
        raise unsupported(src.arch, f"layer_types must list one type per layer ({L}), got {kinds!r}")
    bad = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if bad:
        raise unsupported(src.arch, f"layer type {bad[0]!r} (expected full_attention / sliding_attention)")
    if "sliding_attention" in kinds and window is None:
        raise unsupported(src.arch, "layer_types name sliding_attention layers but the config sets no "
                          "sliding_window (or use_sliding_window is false)")
    return [int(window) if k == "sliding_attention" else None for k in kinds]


def attention_layers(src: Source, attn: dict[str, Any], windows: list[int | None]) -> tuple[dict[str, Any], list[str]]:
    """The A family's table and each layer's block (``A`` or ``A.swa``) for per-layer windows: one window for all
    layers is the family's ``window``; layers that mix full and sliding-window attention get the variant ``swa``
    (the family's table with its window), so taps and selectors still count them as one family."""
    kinds = set(windows)
    if len(kinds) == 1:
        return {**attn, "window": windows[0]}, ["A"] * len(windows)
    if len(kinds - {None}) > 1:
        raise unsupported(src.arch, f"sliding windows of several sizes {sorted(kinds - {None})} (one per model)")
    window = next(w for w in windows if w is not None)
    table = {**attn, "window": None, "variants": {"swa": {"window": window}}}
    return table, ["A" if w is None else "A.swa" for w in windows]


@converter("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GraniteForCausalLM",
           "Phi3ForCausalLM")
def convert_llama(src: Source) -> Converted:
    """Llama and the decoders that differ from it by options: Mistral and Phi-3 (a sliding window on every layer,
    Phi-3 with fused q/k/v and gate/up projections and partial RoPE), Qwen2 (q/k/v biases), Qwen3 (q/k norms),
    Qwen2/3 with mixed sliding and full layers (the variant ``A.swa``), Granite (multipliers of the embedding,
    the residual updates, the attention scores and the logits)."""
    c = src.config
    _common_checks(src)
    L = int(c["num_hidden_layers"])
    attn = attention_options(src)
    qk_norm = src.arch == "Qwen3ForCausalLM"
    if src.arch == "Qwen2ForCausalLM":  # Qwen2: biases on q, k, v only
        attn.update(qkv_bias=True, out_bias=False)
    attn["qk_norm"] = qk_norm
    if src.arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        attn, blocks = attention_layers(src, attn, layer_windows(src))
    else:
        attn, blocks = {**attn, "window": layer_window(src)}, ["A"] * L
    model: dict[str, Any] = {}
    if src.arch == "GraniteForCausalLM":
        attn["scale"] = float(c.get("attention_multiplier", 1.0))
        model = {"embed_scale": float(c.get("embedding_multiplier", 1.0)),
                 "residual_scale": float(c.get("residual_multiplier", 1.0)),
                 "logit_scale": 1.0 / float(c.get("logits_scaling", 1.0))}
    cfg = ModelConfig(pattern=f"(AE)*{L}" if blocks == ["A"] * L else " ".join(b + " E" for b in blocks),
                      **shared_options(src), **model, attention=attn,
                      moe={"n_experts": 1, "top_k": 1, "d_ff": int(c["intermediate_size"]), "bias": mlp_bias(src)})
    state = _embeddings(src, cfg)
    for i in range(L):
        pre = f"model.layers.{i}."
        state[f"blocks.{2 * i}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        attention_weights(src, pre + "self_attn.", 2 * i, state, qk_norm=qk_norm)
        state[f"blocks.{2 * i + 1}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        dense_mlp_weights(src, pre + "mlp.", 2 * i + 1, state, bias=cfg.moe.bias)
    return Converted(cfg, state)


@converter("MixtralForCausalLM")
def convert_mixtral(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the experts are SwiGLU")
    L, E = int(c["num_hidden_layers"]), int(c["num_local_experts"])
    k = int(c.get("num_experts_per_tok", 2))
    moe: dict[str, Any] = {"n_experts": E, "top_k": k, "d_ff": int(c["intermediate_size"]), "renormalize_top1": True,
                           "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.01))}
    attn = attention_options(src, window=layer_window(src))
    cfg = ModelConfig(pattern=f"(AE)*{L}", **shared_options(src), attention=attn, moe=moe)
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
        src.skip("lm_head.weight")  # some writers store the tied copy too (equal: tied_embeddings compared them)
        state["lm_head.weight"] = state["embed.weight"]
    else:
        state["lm_head.weight"] = src.get("lm_head.weight")
    return state
