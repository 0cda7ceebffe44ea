"""amer -> transformers for Lara-4-Mini's layers: ``G`` / ``A`` / ``A.swa`` layers, each followed by routed experts with
an ungated shared expert, as ``LaraMiniForCausalLM``; the inverse of :mod:`amer.interop.lara`.

The class's attention is one configuration with two kinds of layer: sliding-window layers rotate whole heads, global
layers have no position encoding. So every attention layer of the model must be one of those two (a window with
``rope_fraction 1``, or none with ``rope_fraction 0``), the sliding ones with one window, and otherwise alike. The
DeltaNet's input projections are written fused as the published checkpoints hold them (``in_proj`` with amer's rows
``[q; k; v; z; b; a]``, the gated norm as ``out_norm``), which transformers splits on load, and the experts as one
``gate_up_proj`` and ``down_proj``.
"""

from __future__ import annotations

import dataclasses

from amer.blocks.attention import AttentionConfig
from amer.config import ModelConfig
from amer.interop.export_parts import (
    Tensors,
    Written,
    attention_out,
    ffn_layers,
    head_dim,
    mixer_ffn_pairs,
    moe_plain,
    plain,
    pre_norms,
    refuse,
    rope_parameters,
    shared,
    shared_out,
)

__all__ = ["lara_mini", "LARA"]

LARA = "LaraMiniForCausalLM"
_ATTENTION = ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "rope_fraction", "window", "qk_norm", "qkv_bias",
              "out_bias", "rope_linear_factor", "rope_scale_factor", "rope_scale_low", "rope_scale_high",
              "rope_scale_original")


_ROPE = {"window": None, "rope_theta": 1.0, "rope_fraction": 0.0, "rope_linear_factor": None,
         "rope_scale_factor": None}  # what the two kinds of attention layer may differ in


def _layer_types(cfg: ModelConfig) -> tuple[list[str], AttentionConfig | None, AttentionConfig | None]:
    """Each layer's type, and the sliding and the global layers' attention (each kind's layers alike), or the refusal
    naming the attention layer the class cannot hold."""
    types: list[str] = []
    kinds: dict[str, tuple[str, AttentionConfig]] = {}
    for layer in (m for m, _ in mixer_ffn_pairs(cfg) or []):
        if str(layer.family) == "G":
            types.append("linear_attention")
            continue
        a = cfg.layer_config(layer)
        plain(a, f"attention ({layer.key})", LARA, _ATTENTION)
        sliding = a.window is not None
        if a.rope_fraction != (1.0 if sliding else 0.0) or not a.qk_norm or a.qkv_bias != a.out_bias:
            raise refuse(f"{layer.key} (layer {layer.index}): {LARA}'s attention layers have per-head q/k norms, "
                         "biases on all projections or none, and either a window with RoPE on whole heads or neither "
                         f"(attention.window {a.window}, rope_fraction {a.rope_fraction}, qk_norm {a.qk_norm})")
        kind = "sliding_attention" if sliding else "full_attention"
        key, first = kinds.setdefault(kind, (layer.key, a))
        # a global layer's RoPE base and scaling do nothing (it rotates nothing)
        if (a if sliding else dataclasses.replace(a, **_ROPE)) != (first if sliding else dataclasses.replace(
                first, **_ROPE)):
            raise refuse(f"{layer.key} (layer {layer.index}) and {key} differ; {LARA} has one sliding_window and one "
                         "configuration per attention layer type")
        types.append(kind)
    swa, full = (kinds[k][1] if k in kinds else None for k in ("sliding_attention", "full_attention"))
    if swa and full and dataclasses.replace(swa, **_ROPE) != dataclasses.replace(full, **_ROPE):
        raise refuse(f"{kinds['sliding_attention'][0]} and {kinds['full_attention'][0]} differ in more than the window "
                     f"and RoPE; {LARA} has one attention configuration")
    return types, swa, full


def lara_mini(cfg: ModelConfig, sd: Tensors) -> Written:
    pairs = mixer_ffn_pairs(cfg)
    letters = [str(m.family) for m, _ in pairs or []]
    if not pairs or not set(letters) <= {"G", "A"}:
        raise refuse(f"pattern {cfg.pattern!r}: {LARA}'s layers are a G or A block followed by an E block")
    shared(cfg, LARA)
    pre_norms(cfg, LARA, variants=("A", "E"))  # the E blocks: checked with the feed-forwards
    types, swa, full = _layer_types(cfg)
    view = dataclasses.replace(cfg, attention=swa or full) if swa or full else cfg  # the layers' own attention
    g, d = cfg.deltanet, cfg.d_model
    plain(g, "deltanet", LARA, ("n_k_heads", "n_v_heads", "head_k_dim", "head_v_dim", "d_conv", "norm_eps"))
    if (g.norm_eps or cfg.norm_eps) != cfg.norm_eps:
        raise refuse(f"deltanet.norm_eps={g.norm_eps} differs from model.norm_eps; {LARA} has one rms_norm_eps")
    ffn = ffn_layers(cfg, [e for _, e in pairs], LARA)
    r = ffn.routed
    if r is None or ffn.dense is not None:
        raise refuse(f"{LARA} routes every layer (an E block with moe.n_experts > 1 after each mixer)")
    moe_plain(r, "moe", LARA, ("n_experts", "top_k", "d_ff", "renormalize", "renormalize_top1", "shared_expert",
                               "d_ff_shared", "n_shared_experts"))
    if not r.shared_expert or (r.top_k == 1 and r.renormalize_top1 != r.renormalize):
        raise refuse(f"{LARA}'s routed layers add a shared expert without a gate (moe.shared_expert) and renormalise "
                     "a top-1 choice exactly when they renormalise")
    a = view.attention
    H, Hk = g.n_v_heads or g.n_k_heads, g.n_k_heads
    dk = g.head_k_dim or d // Hk
    conf = {"architectures": [LARA], "model_type": "lara_mini", "hidden_size": d, "num_hidden_layers": len(types),
            "layer_types": types, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
            "head_dim": head_dim(view), "attention_bias": a.qkv_bias,
            "sliding_window": swa.window if swa else 512, "rope_parameters": rope_parameters(a),
            "linear_num_key_heads": Hk,
            "linear_num_value_heads": H, "linear_key_head_dim": dk, "linear_value_head_dim": g.head_v_dim or dk,
            "linear_conv_kernel_dim": g.d_conv, "num_experts": r.n_experts, "num_experts_per_tok": r.top_k,
            "moe_intermediate_size": r.d_ff or 2 * d, "norm_topk_prob": r.renormalize,
            "shared_expert_intermediate_size": r.n_shared_experts * (r.d_ff_shared or r.d_ff or 2 * d),
            "router_aux_loss_coef": r.aux_loss_coef, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i, letter in enumerate(letters):
        pre, M, E = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "input_layernorm.weight"] = sd[M + "norm.weight"]
        out[pre + "post_attention_layernorm.weight"] = sd[E + "norm.weight"]
        if letter == "A":
            attention_out(view, sd, M, pre + "self_attn.", out)
        else:
            src, dst = M + "mixer.", pre + "linear_attn."
            out[dst + "in_proj.weight"] = sd[src + "in_proj.weight"]
            out[dst + "conv1d.weight"] = sd[src + "conv_weight"].unsqueeze(1)
            out[dst + "out_norm.weight"] = sd[src + "norm_weight"]
            for name in ("A_log", "dt_bias", "out_proj.weight"):
                out[dst + name] = sd[src + name]
        mlp = pre + "mlp."
        out[mlp + "gate.weight"] = sd[E + "mixer.router.weight"]
        # the experts fused, as the class saves them (its loading does not fuse per-expert weights)
        out[mlp + "experts.gate_up_proj"] = sd[E + "mixer.w_gate_up"].transpose(1, 2)
        out[mlp + "experts.down_proj"] = sd[E + "mixer.w_down"].transpose(1, 2)
        shared_out(sd, E, mlp + "shared_expert.", out)
    return conf, out
