"""Trained hybrids: Bamba, Granite-4.0-H (GraniteMoeHybrid) and Nemotron-H.

Bamba and Granite-4.0-H layers are ``x + mixer(norm1(x))`` (Mamba-2 or attention, from the layer-type
list) then ``x + ffn(norm2(x))``: two amer blocks each, ``ME`` or ``AE``. Nemotron-H layers hold one
mixer each (``M``, ``*`` attention without RoPE, ``-`` a squared-ReLU MLP, ``E`` routed squared-ReLU experts with
the router of ``docs/moe.md``): one amer block per layer, the MLP layers ``E.dense`` where both feed-forwards occur.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from amer.config import ModelConfig
from amer.interop.common import (
    BAMBA_KEYS,
    NEMOTRON_H_KEYS,
    Converted,
    attention_options,
    attention_weights,
    converter,
    dense_mlp_weights,
    mamba_options,
    mamba_weights,
    mlp_bias,
    shared_options,
)
from amer.interop.llama import _embeddings, layer_window
from amer.interop.moe import ROUTED, compact_pattern, ffn_blocks, nemotron_moe_weights, nemotron_router
from amer.interop.source import Source, unsupported

__all__ = ["convert_bamba", "convert_granite_hybrid", "convert_nemotron_h"]


def _layer_letters(src: Source, kinds: dict[str, str], key: str = "layer_types") -> list[str]:
    types = src.cfg(key) or src.cfg("layers_block_type")
    if not types and src.arch == "BambaForCausalLM":  # Bamba's own form (none: every layer Mamba)
        attn = set(src.cfg("attn_layer_indices") or ())
        n_layers = int(src.cfg("num_hidden_layers"))
        types = ["full_attention" if i in attn else "linear_attention" for i in range(n_layers)]
    if not types and isinstance(src.cfg("hybrid_override_pattern"), str):  # Nemotron-H's older form
        chars = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
        types = [chars.get(ch, ch) for ch in src.cfg("hybrid_override_pattern")]
    n_layers = src.cfg("num_hidden_layers") or (len(types) if isinstance(types, list) else None)
    if not isinstance(types, list) or len(types) != n_layers:
        raise unsupported(src.arch, f"{key} must list one type per layer, got {types!r}")
    bad = sorted({t for t in types if t not in kinds})
    if bad:
        raise unsupported(src.arch, f"layer type {bad[0]!r} (amer maps: {', '.join(kinds)})")
    return [kinds[t] for t in types]


def _two_block_layers(src: Source, letters: list[str], state: dict[str, Tensor], ffn: Any,
                      mixer_names: tuple[str, str] = ("mamba.", "self_attn."),
                      norms: tuple[str, str] = ("input_layernorm", "pre_ff_layernorm")) -> None:
    for i, letter in enumerate(letters):
        pre = f"model.layers.{i}."
        state[f"blocks.{2 * i}.norm.weight"] = src.get(pre + norms[0] + ".weight")
        if letter == "M":
            mamba_weights(src, pre + mixer_names[0], 2 * i, state)
        else:
            attention_weights(src, pre + mixer_names[1], 2 * i, state)
        state[f"blocks.{2 * i + 1}.norm.weight"] = src.get(pre + norms[1] + ".weight")
        ffn(pre, 2 * i + 1)


@converter("BambaForCausalLM")
def convert_bamba(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the E feed-forward is SwiGLU")
    bias = mlp_bias(src)
    letters = _layer_letters(src, {"linear_attention": "M", "full_attention": "A"}, "layers_block_type")
    cfg = ModelConfig(pattern="".join(x + "E" for x in letters), **shared_options(src),
                      attention=attention_options(src, window=layer_window(src) if "A" in letters else None),
                      mamba=mamba_options(src, BAMBA_KEYS),
                      moe={"n_experts": 1, "d_ff": int(c["intermediate_size"]), "bias": bias})
    state = _embeddings(src, cfg, norm="model.final_layernorm.weight")
    _two_block_layers(src, letters, state,
                      lambda pre, blk: dense_mlp_weights(src, pre + "feed_forward.", blk, state, bias=bias))
    return Converted(cfg, state)


@converter("GraniteMoeHybridForCausalLM")
def convert_granite_hybrid(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the experts are SwiGLU")
    letters = _layer_letters(src, {"mamba": "M", "linear_attention": "M", "attention": "A", "full_attention": "A"})
    E, k = int(c.get("num_local_experts") or 0), int(c.get("num_experts_per_tok") or 0)
    shared = int(c.get("shared_intermediate_size") or 0)
    if E > 0:
        moe: dict[str, Any] = {"n_experts": E, "top_k": k, "d_ff": int(c["intermediate_size"]),
                               "renormalize_top1": True,
                               "shared_expert": shared > 0, "d_ff_shared": shared or None,
                               "aux_loss_coef": float(c.get("router_aux_loss_coef", 0.01))}
    elif shared > 0:  # dense Granite-4.0-H: the shared MLP is the whole feed-forward
        moe = {"n_experts": 1, "d_ff": shared}
    else:
        raise unsupported(src.arch, "neither experts nor a shared MLP (no feed-forward)")
    attn = attention_options(src)
    rope = c.get("position_embedding_type")
    if rope not in ("rope", None, "nope"):
        raise unsupported(src.arch, f"position_embedding_type={rope!r} (supported: 'rope', None)")
    attn.update(rope_fraction=attn["rope_fraction"] if rope == "rope" else 0.0,
                scale=float(c.get("attention_multiplier", attn["head_dim"] ** -0.5)))
    cfg = ModelConfig(pattern="".join(x + "E" for x in letters), **shared_options(src), attention=attn,
                      mamba=mamba_options(src, BAMBA_KEYS), moe=moe,
                      embed_scale=float(c.get("embedding_multiplier", 1.0)),
                      residual_scale=float(c.get("residual_multiplier", 1.0)),
                      logit_scale=1.0 / float(c.get("logits_scaling", 1.0)))
    state = _embeddings(src, cfg)

    def ffn(pre: str, blk: int) -> None:
        out = f"blocks.{blk}.mixer."
        if E == 0:
            w = src.get(pre + "shared_mlp.input_linear.weight")  # (2S, D): gate rows then up rows
            state[out + "w_gate_up"] = w.T.unsqueeze(0).contiguous()
            state[out + "w_down"] = src.get(pre + "shared_mlp.output_linear.weight").T.unsqueeze(0).contiguous()
            return
        moe_pre = pre + "block_sparse_moe."
        state[out + "router.weight"] = src.get(moe_pre + "router.layer.weight")
        state[out + "w_gate_up"] = src.get(moe_pre + "input_linear.weight").transpose(1, 2).contiguous()
        state[out + "w_down"] = src.get(moe_pre + "output_linear.weight").transpose(1, 2).contiguous()
        if shared:
            state[out + "shared.gate_up.weight"] = src.get(pre + "shared_mlp.input_linear.weight")
            state[out + "shared.down.weight"] = src.get(pre + "shared_mlp.output_linear.weight")

    _two_block_layers(src, letters, state, ffn, norms=("input_layernorm", "post_attention_layernorm"))
    return Converted(cfg, state)


@converter("NemotronHForCausalLM")
def convert_nemotron_h(src: Source) -> Converted:
    c = src.config
    kinds = {"linear_attention": "M", "mamba": "M", "full_attention": "A", "attention": "A", "mlp": "E", "moe": ROUTED}
    letters = _layer_letters(src, kinds, "layers_block_type")
    # the MLP is ungated, down(act(up(x))): amer's E has relu2 ungated, but silu only gated, as SwiGLU
    act = src.require("mlp_hidden_act", ("relu2",), "relu2", "Nemotron-H's MLP is ungated, down(act(up(x))), and the "
                      "E block's silu is the gated SwiGLU (its ungated activations: relu2, gelu)")
    bias = mlp_bias(src)
    if bias and ROUTED in letters:
        raise unsupported(src.arch, "mlp_bias with MoE layers (amer's feed-forward biases are the dense E block's; "
                          "the shared expert and latent projections have none)")
    attn = attention_options(src)
    # Nemotron-H attention has no position encoding (the Mamba layers carry order)
    attn.update(rope_fraction=0.0)
    shared = shared_options(src, eps_key="layer_norm_epsilon")
    routed = nemotron_router(src) if ROUTED in letters else None
    moe, blocks = ffn_blocks(letters, routed, int(c["intermediate_size"]), {"activation": act, "bias": bias})
    cfg = ModelConfig(pattern=compact_pattern(blocks), **shared, attention=attn,
                      mamba=mamba_options(src, NEMOTRON_H_KEYS), moe=moe)
    src.skip("mtp.")  # the multi-token-prediction layers: not part of the causal LM (transformers drops them too)
    state = _embeddings(src, cfg, embed="backbone.embeddings.weight", norm="backbone.norm_f.weight")
    for i, letter in enumerate(letters):
        pre = f"backbone.layers.{i}."
        state[f"blocks.{i}.norm.weight"] = src.get(pre + "norm.weight")
        if letter == "M":
            mamba_weights(src, pre + "mixer.", i, state)
        elif letter == "A":
            attention_weights(src, pre + "mixer.", i, state)
        elif letter == ROUTED:
            nemotron_moe_weights(src, pre + "mixer.", i, cfg.moe.n_experts, state)
        else:
            dense_mlp_weights(src, pre + "mixer.", i, state, gated=False, bias=bias)
    return Converted(cfg, state)
