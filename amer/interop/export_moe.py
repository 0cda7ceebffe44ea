"""amer -> transformers for patterns with mixture-of-experts layers, the hybrids around them, and the dense stacks only
a hybrid class expresses: which class a pattern is (:func:`moe_target`) and its folder's contents (:func:`moe_export`).

``A`` + ``E``/``E.dense`` layers with routed experts are ``Qwen2MoeForCausalLM`` (a gated shared expert, q/k/v biases,
per-layer windows as ``A.swa``), ``Qwen3MoeForCausalLM`` (per-head q/k norms) or ``OlmoeForCausalLM`` (q/k norms over
the whole projections); ``C``/``A`` + ``E.dense``/``E`` layers with the sigmoid router are ``Lfm2MoeForCausalLM``.
The hybrids (Jamba, Qwen3-Next, Granite-4.0-H, Bamba for dense stacks with partial RoPE or biases, and Nemotron-H for
``M``, ``A``, ``E`` blocks in any order or with squared-ReLU E blocks) are written by :mod:`amer.interop.export_hybrid`,
Lara-4-Mini (DeltaNet and attention layers with an ungated shared expert) by :mod:`amer.interop.export_lara`;
attention-only stacks go to the hybrid whose attention or router they have. A Mixtral-style model (the default router,
no q/k norm) is left to the Llama / Mixtral writers of :mod:`amer.interop.export`. Each writer is the inverse of its
converter, and whatever the class cannot express is refused by name.
"""

from __future__ import annotations

from typing import Any

from amer.config import ModelConfig
from amer.interop import export_hybrid
from amer.interop.export_lara import LARA, lara_mini
from amer.interop.export_parts import (
    SHARED_DEFAULTS,
    Tensors,
    Written,
    attention_out,
    dense_out,
    ffn_layers,
    head_dim,
    mixer_ffn_pairs,
    moe_plain,
    plain,
    pre_norms,
    refuse,
    routed_out,
    shared,
    shared_out,
    shortconv_out,
)

__all__ = ["moe_target", "moe_export", "MOE_TARGETS"]

MOE_TARGETS = ("JambaForCausalLM", "Qwen3NextForCausalLM", "GraniteMoeHybridForCausalLM", "BambaForCausalLM",
               "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "Lfm2MoeForCausalLM",
               "NemotronHForCausalLM", LARA)
_ROUTER = ("n_experts", "top_k", "d_ff", "renormalize", "renormalize_top1")
SHARED_SCALES = ("embed_scale", "residual_scale", "logit_scale")  # Granite's multipliers


def _plain_stack(cfg: ModelConfig, variants: tuple[str, ...] = (), shared_ok: tuple[str, ...] = ()) -> bool:
    """Pre-norm layers with the plain residual, no variants but of the families in ``variants``, and the model-wide
    options at their defaults but ``shared_ok``: what a hybrid class needs besides its defining trait. An attention
    stack goes to a hybrid class for that trait only when it has this layout; otherwise the class it would have gone
    to names what it lacks, which is the setting the user changed (a sandwich-norm Gemma, say, not the hybrid's
    defaults)."""
    for layer in cfg.parsed.layers:
        opts = cfg.block_options(layer)
        if layer.branch is not None or opts != type(opts)() or (
                layer.variant is not None and str(layer.family) not in variants):
            return False
    return all(getattr(cfg, n) == d for n, d in SHARED_DEFAULTS if n not in shared_ok)


def moe_target(cfg: ModelConfig) -> str | None:
    """The class :func:`moe_export` writes ``cfg`` as, or None (another writer decides, or refuses)."""
    pairs = mixer_ffn_pairs(cfg)
    letters = {str(layer.family) for layer in cfg.parsed.layers}
    relu2 = any(cfg.layer_config(x).activation == "relu2" for x in cfg.parsed.layers if str(x.family) == "E")
    a = cfg.attention
    # one block per layer in any order (a Mamba-2 / attention + MLP pair: Granite); squared-ReLU MLPs are Nemotron-H's
    # alone, without Mamba-2 layers too where the attention is its (position-free)
    nemotron_attention = "A" not in letters or a.rope_fraction == 0.0
    if letters <= {"M", "A", "E"} and (("M" in letters and len(letters) > 1 and (not pairs or relu2)) or (
            relu2 and nemotron_attention and _plain_stack(cfg, ("E",)))):
        return "NemotronHForCausalLM"
    if not pairs:
        return None
    mixers = {str(m.family) for m, _ in pairs}
    routed = [cfg.layer_config(e) for _, e in pairs if cfg.layer_config(e).n_experts > 1]
    # attention layers alone go to the hybrid whose attention they have: an output gate is Qwen3-Next's alone,
    # routed layers after position-free attention Jamba's, a sigmoid router after per-head q/k norms LFM2-MoE's
    only_a = mixers == {"A"}
    jamba_like = routed and a.rope_fraction == 0.0 and not a.qk_norm and routed[0].score == "softmax"
    if ("S" in mixers and mixers <= {"S", "A"}) or (only_a and jamba_like and _plain_stack(cfg, ("E",))):
        return "JambaForCausalLM"
    # an ungated shared expert after DeltaNet layers (and attention without an output gate) is Lara-4-Mini's
    if "G" in mixers and mixers <= {"G", "A"} and routed and routed[0].shared_expert and (
            not routed[0].shared_expert_gate and not ("A" in mixers and a.output_gate)):
        return LARA
    if ("G" in mixers and mixers <= {"G", "A"} and (routed or a.output_gate)) or (
            only_a and a.output_gate and _plain_stack(cfg, ("E",), ("norm_offset",))):
        return "Qwen3NextForCausalLM"
    if only_a and routed and routed[0].shared_expert and not routed[0].shared_expert_gate and a.qk_norm and (
            a.qk_norm_scope == "head" and not a.output_gate and _plain_stack(cfg, ("A", "E"))):
        return LARA  # attention layers alone with Lara-4-Mini's ungated shared expert
    mlp_bias = any(cfg.layer_config(e).bias for _, e in pairs)
    if "M" in mixers and mixers <= {"M", "A"}:
        # Bamba: dense layers only, and what Granite-4.0-H lacks: RoPE on part of each head, MLP biases
        partial = "A" in mixers and a.rope_fraction not in (0.0, 1.0)
        return "BambaForCausalLM" if not routed and (partial or mlp_bias) else "GraniteMoeHybridForCausalLM"
    if only_a and not routed and a.rope_fraction != 1.0 and _plain_stack(cfg, (), SHARED_SCALES):
        # attention without RoPE on every dimension: Granite's multipliers without RoPE (and without MLP biases) are
        # Granite-4.0-H's; biases then make it Bamba's (Phi-3 has none); otherwise Phi-3's (amer.interop.export)
        scaled = a.scale is not None or any(getattr(cfg, n) != 1.0 for n in SHARED_SCALES)
        if scaled and a.rope_fraction == 0.0 and not mlp_bias:
            return "GraniteMoeHybridForCausalLM"
        if (mlp_bias or a.qkv_bias or a.out_bias) and not scaled:
            return "BambaForCausalLM"
    lfm2_router = bool(routed) and routed[0].score == "sigmoid" and a.qk_norm and a.qk_norm_scope == "head"
    if ("C" in mixers and mixers <= {"C", "A"} and routed) or (only_a and lfm2_router and _plain_stack(cfg, ("E",))):
        return "Lfm2MoeForCausalLM"
    if mixers != {"A"} or not routed:
        return None
    if a.qk_norm:
        return "OlmoeForCausalLM" if a.qk_norm_scope == "projection" else "Qwen3MoeForCausalLM"
    # a shared expert, or layers of two configs (E.dense beside routed E, A.swa): Qwen2-MoE's, never Mixtral's
    variants = any(layer.variant is not None for layer in cfg.parsed.layers)
    return "Qwen2MoeForCausalLM" if routed[0].shared_expert or variants else None


def moe_export(model: Any, cfg: ModelConfig, arch: str) -> Written:
    """(config.json contents, tensors in the class's names) of ``model`` as ``arch``, one of :data:`MOE_TARGETS`."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    writers = {"JambaForCausalLM": export_hybrid.jamba, "Qwen3NextForCausalLM": export_hybrid.qwen3_next,
               "GraniteMoeHybridForCausalLM": export_hybrid.granite_hybrid, "Lfm2MoeForCausalLM": _lfm2_moe,
               "BambaForCausalLM": export_hybrid.bamba, LARA: lara_mini,
               "NemotronHForCausalLM": export_hybrid.nemotron_h}
    if arch in writers:
        return writers[arch](cfg, sd)
    return _qwen_moe(cfg, sd, arch)


def _router_checks(r: Any, target: str, allowed: tuple[str, ...] = ()) -> None:
    moe_plain(r, "moe", target, _ROUTER + allowed)
    if r.top_k == 1 and r.renormalize_top1 != r.renormalize:
        raise refuse(f"{target} renormalises a top-1 choice exactly when it renormalises (moe.renormalize_top1 = "
                     "moe.renormalize)")


def _qwen_moe(cfg: ModelConfig, sd: Tensors, T: str) -> Written:
    pairs = mixer_ffn_pairs(cfg) or []
    qwen2, olmoe = T == "Qwen2MoeForCausalLM", T == "OlmoeForCausalLM"
    shared(cfg, T)
    pre_norms(cfg, T, variants=("E", "A") if qwen2 else ("E",))
    a, d, hd, L = cfg.attention, cfg.d_model, head_dim(cfg), len(pairs)
    plain(a, "attention", T, ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "qk_norm", "qk_norm_scope",
                              "qkv_bias", "out_bias", "window"))
    windows = [cfg.layer_config(m).window for m, _ in pairs]
    for m, _ in pairs:
        v = cfg.layer_config(m)
        if v != a and (not qwen2 or v.window is None or a.window is not None or {**vars(v), "window": None} != vars(a)):
            raise refuse(f"{m.key} (layer {m.index}): {T}'s attention layers differ by their sliding window alone "
                         "(full-attention base, the variant A.swa with a window)")
    if qwen2 and (a.out_bias or a.qk_norm):
        raise refuse(f"{T}'s attention has biases on q, k and v only (attention.out_bias false) and no q/k norm")
    if not qwen2 and a.qkv_bias != a.out_bias:
        raise refuse(f"{T}'s attention has biases on all projections or none (attention.qkv_bias = out_bias)")
    if olmoe and (a.window is not None or hd * a.n_heads != d):
        raise refuse(f"{T}'s attention has no sliding window, and its q/k norms span hidden_size: heads of d-model / "
                     "n-heads")
    ffn = ffn_layers(cfg, [e for _, e in pairs], T)
    r = ffn.routed
    _router_checks(r, T, ("shared_expert", "d_ff_shared", "shared_expert_gate", "n_shared_experts") if qwen2 else ())
    if qwen2 and not (r.shared_expert and r.shared_expert_gate):
        raise refuse(f"{T}'s routed layers have a shared expert with a sigmoid gate (moe.shared_expert, "
                     "shared_expert_gate); without them or q/k norms no class has dense layers beside routed ones")
    if olmoe and ffn.dense is not None:
        raise refuse(f"{T} routes in every layer (no E.dense layers)")
    conf = {"architectures": [T], "model_type": {"Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe",
                                                 "OlmoeForCausalLM": "olmoe"}[T],
            "hidden_size": d, "num_hidden_layers": L, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_kv_heads, "num_experts": r.n_experts, "num_experts_per_tok": r.top_k,
            "norm_topk_prob": r.renormalize, "router_aux_loss_coef": r.aux_loss_coef, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta}, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len}
    if olmoe:
        conf.update(intermediate_size=r.d_ff or 2 * d, attention_bias=a.qkv_bias, clip_qkv=None,
                    router_z_loss_coef=r.z_loss_coef, head_dim=hd)
    else:
        conf.update(moe_intermediate_size=r.d_ff or 2 * d, decoder_sparse_step=1, head_dim=hd,
                    mlp_only_layers=[i for i, routes in enumerate(ffn.routes) if not routes],
                    intermediate_size=(ffn.dense.d_ff or 2 * d) if ffn.dense else r.d_ff or 2 * d)
    window = next((w for w in windows if w is not None), None)
    if qwen2:
        conf.update(qkv_bias=a.qkv_bias, use_sliding_window=window is not None, sliding_window=window,
                    max_window_layers=L, shared_expert_intermediate_size=r.n_shared_experts * (r.d_ff_shared or r.d_ff
                                                                                              or 2 * d),
                    layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows])
    elif not olmoe:
        conf.update(attention_bias=a.qkv_bias, use_sliding_window=window is not None, sliding_window=window)
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i, routes in enumerate(ffn.routes):
        pre, A, E = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "input_layernorm.weight"] = sd[A + "norm.weight"]
        out[pre + "post_attention_layernorm.weight"] = sd[E + "norm.weight"]
        attention_out(cfg, sd, A, pre + "self_attn.", out)
        if not routes:
            dense_out(sd, E, pre + "mlp.", out)
            continue
        out[pre + "mlp.gate.weight"] = sd[E + "mixer.router.weight"]
        routed_out(sd, E, pre + "mlp.experts.", out)
        if qwen2:
            shared_out(sd, E, pre + "mlp.shared_expert.", out)
            out[pre + "mlp.shared_expert_gate.weight"] = sd[E + "mixer.shared_gate.weight"]
    return conf, out


W1W3W2 = ("w1", "w3", "w2")


def _lfm2_moe(cfg: ModelConfig, sd: Tensors) -> Written:
    T = "Lfm2MoeForCausalLM"
    pairs = mixer_ffn_pairs(cfg) or []
    letters = [str(m.family) for m, _ in pairs]
    shared(cfg, T)
    pre_norms(cfg, T, variants=("E",))
    a, c, d = cfg.attention, cfg.shortconv, cfg.d_model
    if "A" in letters:
        plain(a, "attention", T, ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "qk_norm"))
        if not a.qk_norm:
            raise refuse(f"{T}'s attention has per-head q/k norms (attention.qk_norm)")
    plain(c, "shortconv", T, ("l_cache", "bias"))
    ffn = ffn_layers(cfg, [e for _, e in pairs], T)
    r, dense = ffn.routed, sum(not x for x in ffn.routes)
    if any(ffn.routes[:dense]):
        raise refuse(f"{T}'s dense feed-forwards are its first layers (num_dense_layers), then every layer routes")
    _router_checks(r, T, ("score", "expert_bias", "renormalize_eps", "routed_scale"))
    if r.score != "sigmoid" or (r.renormalize and r.renormalize_eps != 1e-6):
        raise refuse(f"{T}'s router is a sigmoid (moe.score) renormalised with an epsilon of 1e-6 "
                     "(moe.renormalize_eps)")
    conf = {"architectures": [T], "model_type": "lfm2_moe", "hidden_size": d, "num_hidden_layers": len(letters),
            "layer_types": ["conv" if x == "C" else "full_attention" for x in letters], "num_dense_layers": dense,
            "intermediate_size": (ffn.dense.d_ff or 2 * d) if ffn.dense else 2 * d,
            "moe_intermediate_size": r.d_ff or 2 * d, "num_experts": r.n_experts, "num_experts_per_tok": r.top_k,
            "use_expert_bias": r.expert_bias, "routed_scaling_factor": r.routed_scale, "norm_topk_prob": r.renormalize,
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": head_dim(cfg),
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta}, "conv_L_cache": c.l_cache,
            "conv_bias": c.bias, "norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.embedding_norm.weight": sd["norm.weight"]}
    for i, (letter, routes) in enumerate(zip(letters, ffn.routes)):
        pre, M, E = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "operator_norm.weight"] = sd[M + "norm.weight"]
        out[pre + "ffn_norm.weight"] = sd[E + "norm.weight"]
        if letter == "A":
            attention_out(cfg, sd, M, pre + "self_attn.", out, out_name="out_proj",
                          norm_names=("q_layernorm", "k_layernorm"))
        else:
            shortconv_out(sd, M + "mixer.", pre + "conv.", out)
        ff = pre + "feed_forward."
        if not routes:
            dense_out(sd, E, ff, out, names=W1W3W2)
            continue
        out[ff + "gate.weight"] = sd[E + "mixer.router.weight"]
        if r.expert_bias:
            out[ff + "expert_bias"] = sd[E + "mixer.expert_bias"]
        routed_out(sd, E, ff + "experts.", out, names=W1W3W2)
    return conf, out
