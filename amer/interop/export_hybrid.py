"""amer -> transformers for the hybrid classes with mixture-of-experts layers: ``S``/``A`` + ``E``/``E.dense`` layers
as ``JambaForCausalLM``, ``G``/``A`` + ``E``/``E.dense`` layers as ``Qwen3NextForCausalLM``, ``M``/``A`` + ``E``
layers as ``GraniteMoeHybridForCausalLM`` (``BambaForCausalLM`` with partial RoPE or MLP biases), and ``M``, ``A``,
``E`` blocks in any order as ``NemotronHForCausalLM``. Each writer is the inverse of its converter
(:mod:`amer.interop.jamba`, :mod:`amer.interop.qwen_next`, :mod:`amer.interop.hybrid`); whatever the class cannot
express is refused by name (:mod:`amer.interop.export_parts`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from amer.config import ModelConfig
from amer.interop.export_parts import (
    Tensors,
    Written,
    attention_out,
    dense_out,
    ffn_layers,
    head_dim,
    mamba1_out,
    mamba2_out,
    mixer_ffn_pairs,
    moe_plain,
    period,
    plain,
    pre_norms,
    refuse,
    rope_parameters,
    routed_out,
    shared,
    shared_out,
)

__all__ = ["jamba", "qwen3_next", "granite_hybrid", "bamba", "nemotron_h"]

_HEADS = ("n_heads", "n_kv_heads", "head_dim")


def _layout(cfg: ModelConfig, target: str, mixers: set[str]) -> tuple[list[str], list[Any]]:
    pairs = mixer_ffn_pairs(cfg)
    letters = [str(m.family) for m, _ in pairs or []]
    if not pairs or not set(letters) <= mixers:
        raise refuse(f"pattern {cfg.pattern!r}: {target}'s layers are one of {sorted(mixers)} followed by an E block")
    return letters, [e for _, e in pairs]


def _two_block_layer(cfg: ModelConfig, sd: Tensors, out: Tensors, i: int, letter: str,
                     mamba: Callable[[Tensors, str, str, Tensors], None],
                     ffn_norm: str = "pre_ff_layernorm") -> tuple[str, str]:
    """Decoder layer ``i`` of a (mixer, E) stack: its two norms and its mixer (attention, or the Mamba layer
    ``mamba`` writes); returns the layer's prefix and its E block's."""
    pre, M, E = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
    out[pre + "input_layernorm.weight"] = sd[M + "norm.weight"]
    out[pre + ffn_norm + ".weight"] = sd[E + "norm.weight"]
    if letter == "A":
        attention_out(cfg, sd, M, pre + "self_attn.", out)
    else:
        mamba(sd, M + "mixer.", pre + "mamba.", out)
    return pre, E


def _attention_or_none(cfg: ModelConfig, letters: list[str], target: str, allowed: tuple[str, ...]) -> None:
    if "A" in letters:
        plain(cfg.attention, "attention", target, _HEADS + allowed)


def jamba(cfg: ModelConfig, sd: Tensors) -> Written:
    T = "JambaForCausalLM"
    letters, e_layers = _layout(cfg, T, {"S", "A"})
    shared(cfg, T)
    pre_norms(cfg, T, variants=("E",))
    a, s, d = cfg.attention, cfg.mamba1, cfg.d_model
    _attention_or_none(cfg, letters, T, ("rope_theta", "rope_fraction"))
    if "A" in letters and a.rope_fraction != 0.0:
        raise refuse(f"{T}'s attention has no position encoding (attention.rope_fraction 0, got {a.rope_fraction})")
    plain(s, "mamba1", T, ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_bc_norm",
                           "dt_bc_norm_eps"))
    if "S" in letters and (s.dt_bc_norm != "weighted" or s.dt_bc_norm_eps != cfg.norm_eps):
        raise refuse(f"{T}'s Mamba layers norm dt, B and C with weights and the model's epsilon (mamba1.dt_bc_norm "
                     f"'weighted', dt_bc_norm_eps {cfg.norm_eps}; got {s.dt_bc_norm!r}, {s.dt_bc_norm_eps})")
    ffn = ffn_layers(cfg, e_layers, T)
    r = ffn.routed
    if r is not None:
        moe_plain(r, "moe", T, ("n_experts", "top_k", "d_ff", "renormalize"))
        if r.renormalize:
            raise refuse(f"{T}'s router keeps the raw top-k probabilities (moe.renormalize false)")
    widths = {x.d_ff or 2 * d for x in (r, ffn.dense) if x is not None}
    if len(widths) > 1:
        raise refuse(f"{T}'s experts and dense feed-forwards have one width (intermediate_size), got {sorted(widths)}")
    attn, experts = period([x == "A" for x in letters]), period(ffn.routes)
    if attn is None or experts is None:
        which = "attention" if attn is None else "routed E"
        raise refuse(f"the {which} layers are not periodic; {T} places them every period layers from an offset")
    conf = {"architectures": [T], "model_type": "jamba", "hidden_size": d, "num_hidden_layers": len(letters),
            "intermediate_size": widths.pop(), "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
            "attn_layer_period": attn[0], "attn_layer_offset": attn[1], "expert_layer_period": experts[0],
            "expert_layer_offset": experts[1], "num_experts": r.n_experts if r else 1,
            "num_experts_per_tok": r.top_k if r else 1, "mamba_d_state": s.d_state, "mamba_d_conv": s.d_conv,
            "mamba_expand": s.expand, "mamba_dt_rank": s.rank(d), "mamba_conv_bias": s.conv_bias,
            "mamba_proj_bias": s.bias, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "router_aux_loss_coef": r.aux_loss_coef if r else 0.001,
            "head_dim": head_dim(cfg)}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.final_layernorm.weight": sd["norm.weight"]}
    for i, (letter, routes) in enumerate(zip(letters, ffn.routes)):
        pre, E = _two_block_layer(cfg, sd, out, i, letter, mamba1_out)
        if routes:
            out[pre + "feed_forward.router.weight"] = sd[E + "mixer.router.weight"]
            routed_out(sd, E, pre + "feed_forward.experts.", out)
        else:
            dense_out(sd, E, pre + "feed_forward.", out)
    return conf, out


def qwen3_next(cfg: ModelConfig, sd: Tensors) -> Written:
    T = "Qwen3NextForCausalLM"
    letters, e_layers = _layout(cfg, T, {"G", "A"})
    shared(cfg, T, allowed=("norm_offset",))
    pre_norms(cfg, T, variants=("E",))
    a, g, d, hd = cfg.attention, cfg.deltanet, cfg.d_model, head_dim(cfg)
    _attention_or_none(cfg, letters, T, ("rope_theta", "rope_fraction", "qk_norm", "qkv_bias", "out_bias",
                                         "output_gate", "rope_linear_factor"))
    if "A" in letters and not (a.qk_norm and a.output_gate and a.qkv_bias == a.out_bias):
        raise refuse(f"{T}'s attention has per-head q/k norms and an output gate, and biases on all projections or "
                     "none (attention.qk_norm, output_gate, qkv_bias = out_bias)")
    plain(g, "deltanet", T, ("n_k_heads", "n_v_heads", "head_k_dim", "head_v_dim", "d_conv", "norm_eps"))
    if (g.norm_eps or cfg.norm_eps) != cfg.norm_eps:
        raise refuse(f"deltanet.norm_eps={g.norm_eps} differs from model.norm_eps; {T} has one rms_norm_eps")
    ffn = ffn_layers(cfg, e_layers, T)
    r, conf = ffn.routed, {}
    if r is not None:
        moe_plain(r, "moe", T, ("n_experts", "top_k", "d_ff", "renormalize", "renormalize_top1", "shared_expert",
                            "d_ff_shared", "shared_expert_gate", "n_shared_experts"))
        if not (r.shared_expert and r.shared_expert_gate) or (r.top_k == 1 and r.renormalize_top1 != r.renormalize):
            raise refuse(f"{T}'s routed layers have a shared expert with a sigmoid gate (moe.shared_expert, "
                         "shared_expert_gate) and renormalise a top-1 choice exactly when they renormalise")
        conf = {"num_experts": r.n_experts, "num_experts_per_tok": r.top_k, "moe_intermediate_size": r.d_ff or 2 * d,
                "shared_expert_intermediate_size": r.n_shared_experts * (r.d_ff_shared or r.d_ff or 2 * d),
                "norm_topk_prob": r.renormalize, "router_aux_loss_coef": r.aux_loss_coef}
    H, Hk = g.n_v_heads or g.n_k_heads, g.n_k_heads
    dk = g.head_k_dim or d // Hk
    dv = g.head_v_dim or dk
    conf.update({"architectures": [T], "model_type": "qwen3_next", "hidden_size": d, "num_hidden_layers": len(letters),
                 "layer_types": ["linear_attention" if x == "G" else "full_attention" for x in letters],
                 "mlp_only_layers": [i for i, routes in enumerate(ffn.routes) if not routes],
                 "decoder_sparse_step": 1, "num_experts": conf.get("num_experts", 0),
                 "intermediate_size": (ffn.dense.d_ff or 2 * d) if ffn.dense else 2 * d,
                 "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": hd,
                 "attention_bias": a.qkv_bias,  # linear scaling or none: its rotary embedding slices either
                 "rope_parameters": {**rope_parameters(a), "partial_rotary_factor": a.rope_fraction},
                 "linear_num_key_heads": Hk, "linear_num_value_heads": H, "linear_key_head_dim": dk,
                 "linear_value_head_dim": dv, "linear_conv_kernel_dim": g.d_conv, "rms_norm_eps": cfg.norm_eps,
                 "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len})
    shift = cfg.norm_offset - 1.0  # Qwen3-Next's RMSNorm gains are 1 + w
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"] + shift}
    for i, (letter, routes) in enumerate(zip(letters, ffn.routes)):
        pre, M, E = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "input_layernorm.weight"] = sd[M + "norm.weight"] + shift
        out[pre + "post_attention_layernorm.weight"] = sd[E + "norm.weight"] + shift
        if letter == "A":
            _gated_attention(cfg, sd, M, pre + "self_attn.", out, shift)
        else:
            _deltanet(sd, M + "mixer.", pre + "linear_attn.", out, (Hk, H, dk, dv))
        mlp = pre + "mlp."
        if not routes:
            dense_out(sd, E, mlp, out)
            continue
        out[mlp + "gate.weight"] = sd[E + "mixer.router.weight"]
        routed_out(sd, E, mlp + "experts.", out)
        shared_out(sd, E, mlp + "shared_expert.", out)
        out[mlp + "shared_expert_gate.weight"] = sd[E + "mixer.shared_gate.weight"]
    return conf, out


def _gated_attention(cfg: ModelConfig, sd: Tensors, blk: str, dst: str, out: Tensors, shift: float) -> None:
    """q/k/v/o with q/k norms, then the query and gate rows interleaved per head as ``q_proj`` holds them."""
    attention_out(cfg, sd, blk, dst, out, norm_shift=shift)
    H, hd = cfg.attention.n_heads, head_dim(cfg)
    for kind in ("weight", "bias"):
        gate = sd.get(f"{blk}mixer.gate.{kind}")
        if gate is not None:
            q = out[f"{dst}q_proj.{kind}"]
            both = torch.stack([q.view(H, hd, *q.shape[1:]), gate.view(H, hd, *gate.shape[1:])], dim=1)
            out[f"{dst}q_proj.{kind}"] = both.flatten(0, 2)


def _deltanet(sd: Tensors, src: str, dst: str, out: Tensors, heads: tuple[int, int, int, int]) -> None:
    """amer's ``in_proj`` rows ``[q; k; v; z; b; a]`` regrouped by key head into ``in_proj_qkvz`` / ``in_proj_ba``."""
    Hk, H, dk, dv = heads
    R = H // Hk
    q, k, v, z, b, a = sd[src + "in_proj.weight"].split([Hk * dk, Hk * dk, H * dv, H * dv, H, H])
    group = [x.view(Hk, -1, x.shape[-1]) for x in (q, k, v, z)]
    out[dst + "in_proj_qkvz.weight"] = torch.cat(group, dim=1).flatten(0, 1)
    out[dst + "in_proj_ba.weight"] = torch.cat([b.view(Hk, R, -1), a.view(Hk, R, -1)], dim=1).flatten(0, 1)
    out[dst + "conv1d.weight"] = sd[src + "conv_weight"].unsqueeze(1)
    for name in ("A_log", "dt_bias", "out_proj.weight"):
        out[dst + name] = sd[src + name]
    out[dst + "norm.weight"] = sd[src + "norm_weight"]


def granite_hybrid(cfg: ModelConfig, sd: Tensors) -> Written:
    T = "GraniteMoeHybridForCausalLM"
    letters, e_layers = _layout(cfg, T, {"M", "A"})
    shared(cfg, T, allowed=("embed_scale", "residual_scale", "logit_scale"))
    pre_norms(cfg, T, variants=("E",))  # one E config in the end: checked with the feed-forwards
    a, m, d, hd = cfg.attention, cfg.mamba, cfg.d_model, head_dim(cfg)
    _attention_or_none(cfg, letters, T, ("rope_theta", "rope_fraction", "qkv_bias", "out_bias", "scale"))
    if "A" in letters and (a.rope_fraction not in (0.0, 1.0) or a.qkv_bias != a.out_bias):
        raise refuse(f"{T}'s attention rotates whole heads or none (attention.rope_fraction 1 or 0, got "
                     f"{a.rope_fraction}) and has biases on all projections or none")
    plain(m, "mamba", T, ("d_state", "d_conv", "expand", "head_dim", "n_groups", "bias"))
    ffn = ffn_layers(cfg, e_layers, T)
    r = ffn.routed
    if r is not None and ffn.dense is not None:
        raise refuse(f"{T}'s layers are all routed or all dense (E and E.dense layers mixed)")
    conf: dict[str, Any] = {"num_local_experts": 0, "num_experts_per_tok": 0,
                            "shared_intermediate_size": (ffn.dense.d_ff or 2 * d) if ffn.dense else 0}
    if r is not None:
        moe_plain(r, "moe", T, ("n_experts", "top_k", "d_ff", "renormalize_top1", "shared_expert", "d_ff_shared",
                            "n_shared_experts"))
        if not r.shared_expert or (r.top_k == 1 and not r.renormalize_top1):
            raise refuse(f"{T}'s routed layers have a shared MLP (moe.shared_expert) and renormalise a top-1 choice to "
                         "1 (moe.renormalize_top1)")
        conf = {"num_local_experts": r.n_experts, "num_experts_per_tok": r.top_k, "intermediate_size": r.d_ff or 2 * d,
                "shared_intermediate_size": r.n_shared_experts * (r.d_ff_shared or r.d_ff or 2 * d),
                "router_aux_loss_coef": r.aux_loss_coef}
    conf.update({"architectures": [T], "model_type": "granitemoehybrid", "hidden_size": d,
                 "num_hidden_layers": len(letters),
                 "layer_types": ["mamba" if x == "M" else "attention" for x in letters],
                 "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": hd,
                 "attention_bias": a.qkv_bias,
                 "position_embedding_type": "rope" if a.rope_fraction == 1.0 else None,
                 "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
                 "attention_multiplier": a.scale or hd ** -0.5, "embedding_multiplier": cfg.embed_scale,
                 "residual_multiplier": cfg.residual_scale, "logits_scaling": 1.0 / cfg.logit_scale,
                 "mamba_n_heads": m.expand * d // m.head_dim, "mamba_d_head": m.head_dim, "mamba_d_state": m.d_state,
                 "mamba_d_conv": m.d_conv, "mamba_expand": m.expand, "mamba_n_groups": m.n_groups,
                 "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": True, "mamba_proj_bias": m.bias,
                 "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len})
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i, (letter, routes) in enumerate(zip(letters, ffn.routes)):
        pre, E = _two_block_layer(cfg, sd, out, i, letter, mamba2_out, "post_attention_layernorm")
        if not routes:
            out[pre + "shared_mlp.input_linear.weight"] = sd[E + "mixer.w_gate_up"][0].T
            out[pre + "shared_mlp.output_linear.weight"] = sd[E + "mixer.w_down"][0].T
            continue
        moe = pre + "block_sparse_moe."
        out[moe + "router.layer.weight"] = sd[E + "mixer.router.weight"]
        out[moe + "input_linear.weight"] = sd[E + "mixer.w_gate_up"].transpose(1, 2)
        out[moe + "output_linear.weight"] = sd[E + "mixer.w_down"].transpose(1, 2)
        out[pre + "shared_mlp.input_linear.weight"] = sd[E + "mixer.shared.gate_up.weight"]
        out[pre + "shared_mlp.output_linear.weight"] = sd[E + "mixer.shared.down.weight"]
    return conf, out


def bamba(cfg: ModelConfig, sd: Tensors) -> Written:
    """Dense ``ME`` / ``AE`` layers whose attention turns part of each head (partial RoPE) or whose feed-forwards
    have biases, which Granite-4.0-H cannot express."""
    T = "BambaForCausalLM"
    letters, e_layers = _layout(cfg, T, {"M", "A"})
    shared(cfg, T)
    pre_norms(cfg, T)
    a, m, d = cfg.attention, cfg.mamba, cfg.d_model
    _attention_or_none(cfg, letters, T, ("rope_theta", "rope_fraction", "qkv_bias", "out_bias"))
    if "A" in letters and a.qkv_bias != a.out_bias:
        raise refuse(f"{T}'s attention_bias sets the q/k/v and output biases together")
    plain(m, "mamba", T, ("d_state", "d_conv", "expand", "head_dim", "n_groups", "bias"))
    ffn = ffn_layers(cfg, e_layers, T, mlp_bias=True)
    if ffn.routed is not None:
        raise refuse(f"moe.n_experts={ffn.routed.n_experts}: {T}'s feed-forward is one dense SwiGLU")
    conf = {"architectures": [T], "model_type": "bamba", "hidden_size": d, "num_hidden_layers": len(letters),
            "attn_layer_indices": [i for i, x in enumerate(letters) if x == "A"],
            "intermediate_size": ffn.dense.d_ff or 2 * d, "mlp_bias": ffn.dense.bias, "hidden_act": "silu",
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": head_dim(cfg),
            "attention_bias": a.qkv_bias, "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta,
                                                             "partial_rotary_factor": a.rope_fraction},
            "mamba_n_heads": m.expand * d // m.head_dim, "mamba_d_head": m.head_dim, "mamba_d_state": m.d_state,
            "mamba_d_conv": m.d_conv, "mamba_expand": m.expand, "mamba_n_groups": m.n_groups,
            "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": True, "mamba_proj_bias": m.bias,
            "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.final_layernorm.weight": sd["norm.weight"]}
    for i, letter in enumerate(letters):
        pre, E = _two_block_layer(cfg, sd, out, i, letter, mamba2_out)
        dense_out(sd, E, pre + "feed_forward.", out)
    return conf, out


def nemotron_h(cfg: ModelConfig, sd: Tensors) -> Written:
    """One block per layer: ``M``, ``A`` without position encoding, ``E`` (dense squared-ReLU MLP or the routed
    experts of :func:`amer.interop.moe.nemotron_router`), in any order."""
    T = "NemotronHForCausalLM"
    layers = cfg.parsed.layers
    letters = [str(layer.family) for layer in layers]
    if not set(letters) <= {"M", "A", "E"}:
        raise refuse(f"pattern {cfg.pattern!r}: {T}'s layers are M, A or E blocks")
    shared(cfg, T)
    pre_norms(cfg, T, variants=("E",))
    a, m, d = cfg.attention, cfg.mamba, cfg.d_model
    _attention_or_none(cfg, letters, T, ("rope_theta", "rope_fraction", "qkv_bias", "out_bias"))
    if "A" in letters and (a.rope_fraction != 0.0 or a.qkv_bias or a.out_bias):
        raise refuse(f"{T}'s attention has no position encoding (attention.rope_fraction 0, got {a.rope_fraction}) "
                     "and no biases (attention.qkv_bias and out_bias false)")
    plain(m, "mamba", T, ("d_state", "d_conv", "expand", "head_dim", "n_groups", "bias", "d_inner"))
    ffn = ffn_layers(cfg, [x for x in layers if str(x.family) == "E"], T, activation="relu2", mlp_bias=True)
    bias = ffn.dense is not None and ffn.dense.bias
    if bias and ffn.routed is not None:
        raise refuse(f"moe.bias with routed layers: {T}'s mlp_bias puts biases on the shared expert and latent "
                     "projections too, which amer's routed E has not")
    r, conf = ffn.routed, {}
    if r is not None:
        moe_plain(r, "moe", T, ("n_experts", "top_k", "d_ff", "score", "expert_bias", "n_groups", "topk_groups",
                                "routed_scale", "renormalize", "renormalize_top1", "shared_expert", "d_ff_shared",
                                "n_shared_experts", "d_latent", "activation"))
        if r.score != "sigmoid" or not r.expert_bias or not r.shared_expert or (
                r.top_k == 1 and r.renormalize_top1 != r.renormalize):
            raise refuse(f"{T}'s routed layers score with a sigmoid and a selection-only bias (moe.score 'sigmoid', "
                         "expert_bias), have a shared expert, and renormalise a top-1 choice when they renormalise")
        conf = {"n_routed_experts": r.n_experts, "num_experts_per_tok": r.top_k,
                "moe_intermediate_size": r.d_ff or 2 * d,
                "moe_shared_expert_intermediate_size": r.n_shared_experts * (r.d_ff_shared or r.d_ff or 2 * d),
                "n_group": r.n_groups, "topk_group": r.topk_groups, "routed_scaling_factor": r.routed_scale,
                "norm_topk_prob": r.renormalize, "moe_latent_size": r.d_latent}
    kinds = iter(ffn.routes)
    types = [{"M": "mamba", "A": "attention"}.get(x) or ("moe" if next(kinds) else "mlp") for x in letters]
    conf.update({"architectures": [T], "model_type": "nemotron_h", "hidden_size": d, "num_hidden_layers": len(types),
                 "layers_block_type": types, "intermediate_size": (ffn.dense.d_ff or 2 * d) if ffn.dense else 2 * d,
                 "mlp_hidden_act": "relu2", "mlp_bias": bias, "num_attention_heads": a.n_heads,
                 "num_key_value_heads": a.n_kv_heads, "head_dim": head_dim(cfg), "attention_bias": False,
                 "mamba_num_heads": m.inner(d) // m.head_dim, "mamba_head_dim": m.head_dim,
                 "ssm_state_size": m.d_state,
                 "n_groups": m.n_groups, "conv_kernel": m.d_conv, "expand": m.expand, "chunk_size": m.chunk_size,
                 "use_conv_bias": True, "use_bias": m.bias, "mamba_proj_bias": m.bias, "mamba_hidden_act": "silu",
                 "layer_norm_epsilon": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
                 "num_nextn_predict_layers": 0})
    out = {"backbone.embeddings.weight": sd["embed.weight"], "backbone.norm_f.weight": sd["norm.weight"]}
    if cfg.tie_embeddings:  # Nemotron-H never ties its head to the embedding: the folder holds a copy
        out["lm_head.weight"] = sd["embed.weight"].clone()
    for i, kind in enumerate(types):
        pre, blk = f"backbone.layers.{i}.", f"blocks.{i}."
        out[pre + "norm.weight"] = sd[blk + "norm.weight"]
        if kind == "mamba":
            mamba2_out(sd, blk + "mixer.", pre + "mixer.", out)
        elif kind == "attention":
            attention_out(cfg, sd, blk, pre + "mixer.", out)
        elif kind == "mlp":
            dense_out(sd, blk, pre + "mixer.", out, gated=False)
        else:
            out[pre + "mixer.gate.weight"] = sd[blk + "mixer.router.weight"]
            out[pre + "mixer.gate.e_score_correction_bias"] = sd[blk + "mixer.expert_bias"]
            routed_out(sd, blk, pre + "mixer.experts.", out, gated=False)
            shared_out(sd, blk, pre + "mixer.shared_experts.", out, gated=False)
            if r.d_latent:
                out[pre + "mixer.fc1_latent_proj.weight"] = sd[blk + "mixer.to_latent.weight"]
                out[pre + "mixer.fc2_latent_proj.weight"] = sd[blk + "mixer.from_latent.weight"]
    return conf, out
