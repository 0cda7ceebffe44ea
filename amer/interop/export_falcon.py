"""amer -> transformers for parallel layers: ``([AM]E)*L`` is ``FalconH1ForCausalLM``, the inverse of
:mod:`amer.interop.falcon_h1`.

Falcon-H1's per-row multipliers (key, muP vector, MLP gate and down) were folded into the weights on import, so they
are written as 1; the branches' input and output multipliers, the embedding and LM-head multipliers, the Mamba-2
inner width and output norm are the class's own settings. Anything else off its default is refused by name.
"""

from __future__ import annotations

from typing import Any

import torch

from amer.config import ModelConfig
from amer.interop.export_parts import attention_out, dense_out, head_dim, moe_plain, plain, refuse

__all__ = ["falcon_target", "falcon_export"]

ARCH = "FalconH1ForCausalLM"
_ATTENTION = ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "qkv_bias", "out_bias")
_MAMBA = ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size", "bias", "d_inner", "norm")


def falcon_target(cfg: ModelConfig) -> str | None:
    """``FalconH1ForCausalLM`` for a pattern with parallel layers (refusing what the class cannot express), else
    None."""
    layers = cfg.parsed.layers
    if all(layer.branch is None for layer in layers):
        return None
    letters = cfg.parsed.letters.replace("|", "")
    if cfg.parsed.depth % 2 or letters != "[AM]E" * (cfg.parsed.depth // 2):
        raise refuse(f"pattern {cfg.pattern!r}: {ARCH} expresses '([AM]E)*L', the only transformers class with "
                     "parallel layers")
    if any(cfg.family_variants.values()):
        raise refuse(f"{ARCH} has one config per family, no variants")
    for layer in layers:
        opts = cfg.block_options(layer)
        if opts.norm_placement != "pre" or opts.residual_multiplier != 1 or opts.residual_normed or (
                layer.family == "E" and (opts.input_multiplier != 1 or opts.update_multiplier != 1)):
            raise refuse(f"{layer.key} (layer {layer.index}) has block options {ARCH} lacks (it has pre-norm "
                         "layers and input / output multipliers on the attention and Mamba branches only)")
    for name, want in (("residual_scale", 1.0), ("logit_softcap", None), ("norm_offset", 0.0)):
        if getattr(cfg, name) != want:
            raise refuse(f"model.{name}={getattr(cfg, name)!r} has no counterpart in {ARCH} (needs {want!r})")
    a = cfg.attention
    plain(a, "model.attention", ARCH, _ATTENTION)
    if a.qkv_bias != a.out_bias:
        raise refuse(f"attention.qkv_bias and out_bias differ; {ARCH} has one attention_bias")
    plain(cfg.mamba, "model.mamba", ARCH, _MAMBA)
    if cfg.moe.n_experts != 1:
        raise refuse(f"moe.n_experts={cfg.moe.n_experts}: {ARCH}'s feed-forward is one dense SwiGLU (n_experts 1)")
    moe_plain(cfg.moe, "model.moe", ARCH, ("d_ff", "n_experts", "top_k", "bias"))
    return ARCH


def _options(cfg: ModelConfig, family: str) -> Any:
    return cfg.block_options(next(layer for layer in cfg.parsed.layers if layer.family == family))


def falcon_export(model: Any, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    a, m, L = cfg.attention, cfg.mamba, cfg.parsed.depth // 2
    d_inner = m.inner(cfg.d_model)
    att, ssm = _options(cfg, "A"), _options(cfg, "M")
    conf = {"architectures": [ARCH], "model_type": "falcon_h1", "hidden_size": cfg.d_model, "num_hidden_layers": L,
            "intermediate_size": cfg.moe.d_ff or 2 * cfg.d_model, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_kv_heads, "head_dim": head_dim(cfg), "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta}, "attention_bias": a.qkv_bias,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "mamba_d_ssm": d_inner,
            "mamba_n_heads": d_inner // m.head_dim, "mamba_d_head": m.head_dim, "mamba_n_groups": m.n_groups,
            "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
            "mamba_chunk_size": m.chunk_size, "mamba_conv_bias": True, "mamba_proj_bias": m.bias,
            "projectors_bias": m.bias, "mamba_rms_norm": m.norm != "none",
            "mamba_norm_before_gate": m.norm == "before_gate", "key_multiplier": 1.0,
            "attention_in_multiplier": att.input_multiplier, "attention_out_multiplier": att.update_multiplier,
            "ssm_in_multiplier": ssm.input_multiplier, "ssm_out_multiplier": ssm.update_multiplier,
            "ssm_multipliers": [1.0] * 5, "mlp_multipliers": [1.0, 1.0], "mlp_bias": cfg.moe.bias,
            "embedding_multiplier": cfg.embed_scale, "lm_head_multiplier": cfg.logit_scale}
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.final_layernorm.weight": sd["norm.weight"]}
    for i in range(L):
        pre, A, M, E = f"model.layers.{i}.", f"blocks.{3 * i}.", f"blocks.{3 * i + 1}.mixer.", f"blocks.{3 * i + 2}."
        out[pre + "input_layernorm.weight"] = sd[A + "norm.weight"]
        attention_out(cfg, sd, A, pre + "self_attn.", out)
        for src, dst in (("in_proj.weight", "in_proj.weight"), ("out_proj.weight", "out_proj.weight"),
                         ("dt_bias", "dt_bias"), ("A_log", "A_log"), ("D", "D"), ("conv_bias", "conv1d.bias"),
                         ("norm_weight", "norm.weight"), ("in_proj.bias", "in_proj.bias"),
                         ("out_proj.bias", "out_proj.bias")):
            if M + src in sd:
                out[pre + "mamba." + dst] = sd[M + src]
        out[pre + "mamba.conv1d.weight"] = sd[M + "conv_weight"].unsqueeze(1)
        out[pre + "pre_ff_layernorm.weight"] = sd[E + "norm.weight"]
        dense_out(sd, E, pre + "feed_forward.", out)
    return conf, out
