"""amer -> transformers for the zoo's dense hybrid and state-space classes: ``S*L`` as ``MambaForCausalLM`` (or
``FalconMambaForCausalLM`` with weightless dt/B/C norms), ``CE``/``AE`` layers as ``Lfm2ForCausalLM`` (with sandwich
norms, sliding layers or an output gate as ``Lfm3ForCausalLM``, :mod:`amer.interop.export_lfm3`), ``G E`` /
``A E.post`` layers as ``OlmoHybridForCausalLM``, ``(AE)*L`` with multipliers as ``GraniteForCausalLM`` and ``AE`` /
``A.swa E`` layers as ``Qwen3ForCausalLM`` (``Qwen2ForCausalLM`` with q/k/v biases) with per-layer ``layer_types``.

Each writer is the inverse of its converter in :mod:`amer.interop`, and every setting it cannot write is refused by
name (:mod:`amer.interop.export_parts`): a family's fields are compared with the family's defaults, so an option the
target class has no counterpart for (including options added to a family later) is an error, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from amer.config import ModelConfig
from amer.interop.export_lfm3 import LFM3, lfm3, lfm3_traits
from amer.interop.export_parts import (
    ROPE_SCALING,
    SHARED_DEFAULTS,
    Tensors,
    Written,
    attention_out,
    dense_out,
    ffn_layers,
    head_dim,
    mamba1_out,
    mixer_ffn_pairs,
    plain,
    pre_norms,
    refuse,
    rope_parameters,
    shared,
    shortconv_out,
)
from amer.pattern import LayerSpec

__all__ = ["zoo_target", "zoo_export", "ZOO_TARGETS"]

ZOO_TARGETS = ("MambaForCausalLM", "FalconMambaForCausalLM", "Lfm2ForCausalLM", "OlmoHybridForCausalLM",
               "GraniteForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM", LFM3)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise refuse(what)


def zoo_target(cfg: ModelConfig) -> str | None:
    """The zoo class whose layer layout ``cfg``'s pattern has, or None (another writer decides, or refuses). Layers
    are matched by family; each writer then checks variants and norm placements. An all-attention stack that is
    not pre-norm is left to :mod:`amer.interop.export_norms` (Gemma 2 / 3, OLMo 2)."""
    layers = cfg.parsed.layers
    if layers and {str(layer.family) for layer in layers} == {"S"}:
        return "FalconMambaForCausalLM" if cfg.mamba1.dt_bc_norm == "weightless" else "MambaForCausalLM"
    pairs = mixer_ffn_pairs(cfg)
    if not pairs:
        return None
    mixers = {str(m.family) for m, _ in pairs}
    if "C" in mixers and mixers <= {"A", "C"}:  # LFM3 where it has what LFM3 adds: sandwich norms, windows, a gate
        return LFM3 if lfm3_traits(cfg) else "Lfm2ForCausalLM"
    if "G" in mixers and mixers <= {"A", "G"}:
        return "OlmoHybridForCausalLM"
    if mixers != {"A"} or any(cfg.block_options(layer).norm_placement != "pre" for layer in layers):
        return None
    a = cfg.attention
    if any(m.variant is not None for m, _ in pairs) or (a.qk_norm and a.window is not None) \
            or (a.qkv_bias and not a.out_bias):  # Qwen2: biases on q, k and v only
        return "Qwen3ForCausalLM" if a.qk_norm else "Qwen2ForCausalLM"
    granite = any(getattr(cfg, n) != d for n, d in SHARED_DEFAULTS[:3]) or cfg.attention.scale is not None
    return "GraniteForCausalLM" if granite else None


def zoo_export(model: Any, cfg: ModelConfig, arch: str) -> Written:
    """(config.json contents, tensors in the class's names) of ``model`` as ``arch``, one of :data:`ZOO_TARGETS`."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    writer: Callable[[ModelConfig, Tensors, str], Written] = {
        "MambaForCausalLM": _mamba1, "FalconMambaForCausalLM": _mamba1, "Lfm2ForCausalLM": _lfm2,
        "OlmoHybridForCausalLM": _olmo_hybrid, "GraniteForCausalLM": _decoder, "Qwen3ForCausalLM": _decoder,
        "Qwen2ForCausalLM": _decoder, LFM3: lfm3}[arch]
    return writer(cfg, sd, arch)


def _mamba1(cfg: ModelConfig, sd: Tensors, arch: str) -> Written:
    s = cfg.mamba1
    falcon = arch == "FalconMambaForCausalLM"
    shared(cfg, arch)
    pre_norms(cfg, arch)
    plain(s, "mamba1", arch, ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias")
          + (("dt_bc_norm", "dt_bc_norm_eps") if falcon else ()))
    conf: dict[str, Any] = {
        "architectures": [arch], "model_type": "falcon_mamba" if falcon else "mamba", "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "state_size": s.d_state, "expand": s.expand, "conv_kernel": s.d_conv,
        "time_step_rank": s.rank(cfg.d_model), "use_bias": s.bias, "use_conv_bias": s.conv_bias,
        "hidden_act": "silu", "layer_norm_epsilon": cfg.norm_eps, "residual_in_fp32": True,
        "max_position_embeddings": cfg.max_seq_len}
    if falcon:
        conf["mixer_rms_eps"] = s.dt_bc_norm_eps
    out = {"backbone.embeddings.weight": sd["embed.weight"], "backbone.norm_f.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        pre, blk = f"backbone.layers.{i}.", f"blocks.{i}."
        out[pre + "norm.weight"] = sd[blk + "norm.weight"]
        mamba1_out(sd, blk + "mixer.", pre + "mixer.", out)
    return conf, out


def _dense_ffn(cfg: ModelConfig, pairs: list[tuple[LayerSpec, LayerSpec]], arch: str, mlp_bias: bool = False) -> int:
    """The E blocks' one width, after checking they are the dense SwiGLU feed-forward the target has (with
    ``mlp_bias``, biased or not)."""
    ffn = ffn_layers(cfg, [e for _, e in pairs], arch, mlp_bias=mlp_bias)
    if ffn.routed is not None:
        raise refuse(f"moe.n_experts={ffn.routed.n_experts}: {arch}'s feed-forward is one dense SwiGLU")
    return ffn.dense.d_ff or 2 * cfg.d_model


def _attention_conf(cfg: ModelConfig, arch: str, allowed: Iterable[str]) -> dict[str, Any]:
    a = cfg.attention
    plain(a, "attention", arch, {"n_heads", "n_kv_heads", "head_dim", "rope_theta", *ROPE_SCALING} | set(allowed))
    return {"num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": head_dim(cfg),
            "rope_parameters": rope_parameters(a)}


def _lfm2(cfg: ModelConfig, sd: Tensors, arch: str) -> Written:
    shared(cfg, arch)
    pre_norms(cfg, arch)
    pairs = mixer_ffn_pairs(cfg) or []
    letters = [str(m.family) for m, _ in pairs]
    a, sc = cfg.attention, cfg.shortconv
    if "A" in letters:
        _require(a.qk_norm and a.qk_norm_scope == "head", "LFM2's attention normalises q and k per head "
                 "(attention.qk_norm true, qk_norm_scope 'head')")
    conf = {"architectures": [arch], "model_type": "lfm2", "hidden_size": cfg.d_model,
            "num_hidden_layers": len(pairs), "intermediate_size": _dense_ffn(cfg, pairs, arch),
            "block_auto_adjust_ff_dim": False, "conv_bias": sc.bias, "conv_L_cache": sc.l_cache,
            "norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
            "layer_types": ["conv" if x == "C" else "full_attention" for x in letters],
            **_attention_conf(cfg, arch, {"qk_norm"})}
    plain(sc, "shortconv", arch, ("l_cache", "bias"))
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.embedding_norm.weight": sd["norm.weight"]}
    for i, x in enumerate(letters):
        pre, mix, ffn = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "operator_norm.weight"] = sd[mix + "norm.weight"]
        if x == "A":
            attention_out(cfg, sd, mix, pre + "self_attn.", out, out_name="out_proj",
                          norm_names=("q_layernorm", "k_layernorm"))
        else:
            shortconv_out(sd, mix + "mixer.", pre + "conv.", out)
        out[pre + "ffn_norm.weight"] = sd[ffn + "norm.weight"]
        dense_out(sd, ffn, pre + "feed_forward.", out, names=("w1", "w3", "w2"))
    return conf, out


def _olmo_hybrid(cfg: ModelConfig, sd: Tensors, arch: str) -> Written:
    shared(cfg, arch)
    pre_norms(cfg, arch, variants=("E.post",), post=("A", "E.post"))
    pairs = mixer_ffn_pairs(cfg) or []
    keys = [(m.key, e.key) for m, e in pairs]
    a, g = cfg.attention, cfg.deltanet
    _require(any(m == "A" for m, _ in keys), f"{arch} needs at least one attention layer ('A E.post')")
    _require(all(p in (("G", "E"), ("A", "E.post")) for p in keys), f"{arch}'s layers are 'G E' (pre-norm) and "
             "'A E.post' (post-norm, its feed-forward the E variant 'post')")
    _require(a.qk_norm and a.qk_norm_scope == "projection", "OLMo-Hybrid's attention normalises the whole q and k "
             "projections (attention.qk_norm true, qk_norm_scope 'projection')")
    _require(a.rope_fraction in (0.0, 1.0), "OLMo-Hybrid's attention rotates whole heads or none (attention."
             "rope_fraction 1 or 0)")
    _require(a.qkv_bias == a.out_bias, "OLMo-Hybrid's attention_bias sets the q/k/v and output biases together")
    _require(g.norm_eps == 1e-5, "OLMo-Hybrid's DeltaNet output norm has epsilon 1e-5 (deltanet.norm_eps 1e-5)")
    plain(g, "deltanet", arch, ("n_k_heads", "n_v_heads", "head_k_dim", "head_v_dim", "d_conv", "allow_neg_eigval",
                                "norm_eps"))
    attn = _attention_conf(cfg, arch, {"qk_norm", "qk_norm_scope", "rope_fraction", "qkv_bias", "out_bias"})
    if a.rope_fraction == 0:
        # no RoPE (the released checkpoints), so no scaling of it either
        _require(a.rope_linear_factor is None and a.rope_scale_factor is None,
                 "attention without RoPE (rope_fraction 0) takes no RoPE scaling")
        attn["rope_parameters"] = {"rope_type": "default", "rope_theta": None}
    dk = g.head_k_dim or cfg.d_model // g.n_k_heads
    H, dv = g.n_v_heads or g.n_k_heads, g.head_v_dim or dk
    conf = {"architectures": [arch], "model_type": "olmo_hybrid", "hidden_size": cfg.d_model,
            "num_hidden_layers": len(pairs), "intermediate_size": _dense_ffn(cfg, pairs, arch), "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len, "attention_bias": a.qkv_bias,
            "layer_types": ["linear_attention" if m == "G" else "full_attention" for m, _ in keys],
            "linear_num_key_heads": g.n_k_heads, "linear_num_value_heads": H, "linear_key_head_dim": dk,
            "linear_value_head_dim": dv, "linear_conv_kernel_dim": g.d_conv,
            "linear_allow_neg_eigval": g.allow_neg_eigval, **attn}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i, (x, _) in enumerate(keys):  # the checkpoints' own names (transformers renames them on loading)
        pre, mix, ffn = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        if x == "G":
            out[pre + "attention_layer_norm.weight"] = sd[mix + "norm.weight"]
            out[pre + "feedforward_layer_norm.weight"] = sd[ffn + "norm.weight"]
            la, m = pre + "linear_attn.", mix + "mixer."
            sizes = [g.n_k_heads * dk, g.n_k_heads * dk, H * dv, H * dv, H, H]
            for n, w in zip("qkvgba", sd[m + "in_proj.weight"].split(sizes)):
                out[f"{la}{n}_proj.weight"] = w
            for n, w in zip("qkv", sd[m + "conv_weight"].unsqueeze(1).split(sizes[:3])):
                out[f"{la}{n}_conv1d.weight"] = w
            out[la + "A_log"], out[la + "dt_bias"] = sd[m + "A_log"], sd[m + "dt_bias"]
            out[la + "o_norm.weight"], out[la + "o_proj.weight"] = sd[m + "norm_weight"], sd[m + "out_proj.weight"]
        else:
            attention_out(cfg, sd, mix, pre + "self_attn.", out)
            out[pre + "feedforward_layer_norm.weight"] = sd[mix + "post_norm.weight"]
            out[pre + "post_feedforward_layernorm.weight"] = sd[ffn + "post_norm.weight"]
        dense_out(sd, ffn, pre + "mlp.", out)
    return conf, out


def _decoder(cfg: ModelConfig, sd: Tensors, arch: str) -> Written:
    """Granite ((AE)*L with multipliers), Qwen3 / Qwen2 (AE and A.swa E layers, per-layer windows)."""
    a = cfg.attention
    granite = arch == "GraniteForCausalLM"
    shared(cfg, arch, ("embed_scale", "residual_scale", "logit_scale") if granite else ())
    pre_norms(cfg, arch, variants=() if granite else ("A.swa",))
    pairs = mixer_ffn_pairs(cfg) or []
    allowed = {"qkv_bias", "out_bias", "window"} | ({"scale"} if granite else {"qk_norm"})
    conf = {"architectures": [arch], "hidden_size": cfg.d_model, "num_hidden_layers": len(pairs),
            "intermediate_size": _dense_ffn(cfg, pairs, arch, granite), "rms_norm_eps": cfg.norm_eps,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, **_attention_conf(cfg, arch, allowed)}
    if arch == "Qwen2ForCausalLM":
        _require(a.qkv_bias and not a.out_bias, "Qwen2's attention has q/k/v biases and no output bias")
    else:
        _require(a.qkv_bias == a.out_bias, f"{arch}'s attention_bias sets the q/k/v and output biases together")
        conf["attention_bias"] = a.qkv_bias
    if granite:
        _require(a.window is None, "Granite's attention sees the whole causal past (attention.window unset)")
        conf.update(model_type="granite", embedding_multiplier=cfg.embed_scale, residual_multiplier=cfg.residual_scale,
                    logits_scaling=1.0 / cfg.logit_scale,
                    attention_multiplier=a.scale if a.scale is not None else head_dim(cfg) ** -0.5,
                    mlp_bias=cfg.moe.bias)
    else:
        swa = cfg.family_config("A", "swa") if "swa" in cfg.family_variants.get("attention", {}) else None
        if swa is not None:
            _require(dataclasses.replace(swa, window=a.window) == a, "the variant A.swa may differ from the attention "
                     "table only in its window (Qwen layers share one attention config)")
        windows = [swa.window if m.key == "A.swa" else a.window for m, _ in pairs]
        sizes = {w for w in windows if w is not None}
        _require(len(sizes) <= 1, f"sliding windows of several sizes {sorted(sizes)} (Qwen has one sliding_window)")
        conf.update(model_type="qwen3" if arch == "Qwen3ForCausalLM" else "qwen2", use_sliding_window=bool(sizes),
                    sliding_window=next(iter(sizes), None), max_window_layers=0,
                    layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(len(pairs)):
        pre, mix, ffn = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "input_layernorm.weight"] = sd[mix + "norm.weight"]
        attention_out(cfg, sd, mix, pre + "self_attn.", out)
        out[pre + "post_attention_layernorm.weight"] = sd[ffn + "norm.weight"]
        dense_out(sd, ffn, pre + "mlp.", out)
    return conf, out
