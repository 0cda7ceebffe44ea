"""amer -> transformers for the classes whose norms sit elsewhere: ``(AE)*L`` with sandwich norms is Gemma 2 (or
Gemma 3 with per-head q/k norms), with post norms OLMo 2.

:func:`norm_target` names the class a model's block options ask for (None: every block is pre-norm with the
default residual, the Llama / Mamba 2 exporter's case) and refuses, naming the setting, what the class cannot
express; :func:`norm_export` writes its config and tensors. The inverse of :mod:`amer.interop.gemma2` and
:mod:`amer.interop.olmo`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from amer.config import ModelConfig
from amer.errors import InputError
from amer.interop.export_parts import ROPE_SCALING, plain, rope_parameters
from amer.model_config import BlockOptions

__all__ = ["norm_target", "norm_export"]

SWA_FIELDS = ("window", "rope_theta", "rope_linear_factor")  # what Gemma 3's two layer types may set apart


def _refuse(arch: str, what: str) -> InputError:
    return InputError(f"cannot export as {arch}: {what}")


def norm_target(cfg: ModelConfig) -> str | None:
    opts = {cfg.block_options(layer) for layer in cfg.parsed.layers}
    placements = {o.norm_placement for o in opts}
    if placements == {"pre"}:
        return None
    if len(placements) > 1:
        raise InputError(f"cannot export as a transformers model: the blocks mix norm placements {sorted(placements)}")
    arch = "Olmo2ForCausalLM" if placements == {"post"} else (
        "Gemma3ForCausalLM" if cfg.attention.qk_norm else "Gemma2ForCausalLM")
    for o in opts:
        for f in dataclasses.fields(BlockOptions):
            if f.name != "norm_placement" and getattr(o, f.name) != f.default:
                raise _refuse(arch, f"the block option {f.name}={getattr(o, f.name)!r} has no counterpart")
    L = cfg.n_layers // 2
    if "".join(layer.family for layer in cfg.parsed.layers) != "AE" * L or cfg.n_layers % 2:
        raise _refuse(arch, f"pattern {cfg.pattern!r}: the class expresses '(AE)*L'")
    moe = cfg.moe
    act = "silu" if arch == "Olmo2ForCausalLM" else "gelu_tanh"
    if moe.n_experts != 1 or moe.bias or moe.shared_expert or moe.activation != act or cfg.family_variants.get("moe"):
        raise _refuse(arch, f"the E blocks must be one dense {act} feed-forward without bias (moe.n_experts 1, "
                      f"moe.activation {act}, no variants)")
    for name, want in (("residual_scale", 1.0), ("logit_scale", 1.0),
                       ("norm_offset", 0.0 if arch == "Olmo2ForCausalLM" else 1.0),
                       ("embed_scale", 1.0 if arch == "Olmo2ForCausalLM" else cfg.d_model ** 0.5)):
        if getattr(cfg, name) != want:
            raise _refuse(arch, f"model.{name}={getattr(cfg, name)!r} (the class has {want!r})")
    _check_attention(cfg, arch)
    return arch


def _check_attention(cfg: ModelConfig, arch: str) -> None:
    a = cfg.attention
    plain(a, "attention", arch, ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "qk_norm", "qk_norm_scope",
                                 "qkv_bias", "out_bias", "window", "scale", "softcap", *ROPE_SCALING))
    if a.rope_fraction != 1.0 or a.qkv_bias != a.out_bias:
        raise _refuse(arch, "attention.rope_fraction must be 1 and qkv_bias equal to out_bias")
    if arch == "Olmo2ForCausalLM":
        if not a.qk_norm or a.qk_norm_scope != "projection" or a.scale is not None or a.softcap is not None \
                or a.window is not None or cfg.family_variants.get("attention") or cfg.logit_softcap is not None:
            raise _refuse(arch, "attention needs qk_norm over the whole projection (qk_norm_scope 'projection') and no "
                          "scale, soft cap, window, variants or logit soft cap")
        return
    if a.qk_norm_scope != "head" or (arch == "Gemma3ForCausalLM" and a.softcap is not None):
        raise _refuse(arch, "q/k norms per head (qk_norm_scope 'head'), and no attention soft cap with q/k norms "
                      "(Gemma 3 has none)")
    _query_pre_attn_scalar(cfg, arch)
    if a.window is not None:
        raise _refuse(arch, "attention.window on the family's table: the global layers have none (give the sliding "
                      "layers a variant)")
    free = SWA_FIELDS if arch == "Gemma3ForCausalLM" else ("window",)
    sliding = None
    for c in (cfg.layer_config(layer) for layer in cfg.parsed.layers if layer.family == "A"):
        if c.window is None and c != a:
            raise _refuse(arch, "every global attention layer needs the family's own settings (a variant without a "
                          "window)")
        if c.window is None:
            continue
        if dataclasses.replace(c, **{f: getattr(a, f) for f in free}) != a:
            raise _refuse(arch, f"the sliding-window layers may differ from the others only in {', '.join(free)}")
        sliding = sliding or c
        if any(getattr(c, f) != getattr(sliding, f) for f in free):
            raise _refuse(arch, "every sliding-window layer needs the same window and RoPE")


def _query_pre_attn_scalar(cfg: ModelConfig, arch: str) -> int:
    a = cfg.attention
    hd = a.head_dim or cfg.d_model // a.n_heads
    if a.scale is None:
        return hd
    q = round(a.scale ** -2)
    if q < 1 or float(q) ** -0.5 != a.scale:
        raise _refuse(arch, f"attention.scale={a.scale!r} is not 1/sqrt of an integer query_pre_attn_scalar")
    return q


def norm_export(model: Any, cfg: ModelConfig, arch: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config.json dict and the tensors (transformers' names) of ``model``, which :func:`norm_target` accepted
    as ``arch``."""
    a, L = cfg.attention, cfg.n_layers // 2
    hd = a.head_dim or cfg.d_model // a.n_heads
    layers = [cfg.layer_config(layer) for layer in cfg.parsed.layers[::2]]
    conf: dict[str, Any] = {
        "architectures": [arch], "hidden_size": cfg.d_model, "num_hidden_layers": L, "head_dim": hd,
        "intermediate_size": cfg.moe.d_ff or 2 * cfg.d_model, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "rms_norm_eps": cfg.norm_eps, "attention_bias": a.qkv_bias,
        "max_position_embeddings": cfg.max_seq_len}
    if arch == "Olmo2ForCausalLM":
        conf.update(model_type="olmo2", hidden_act="silu", rope_parameters=rope_parameters(a))
    else:
        kinds = ["sliding_attention" if c.window is not None else "full_attention" for c in layers]
        swa = next((c for c in layers if c.window is not None), a)
        conf.update(hidden_activation="gelu_pytorch_tanh", layer_types=kinds, sliding_window=swa.window or 4096,
                    query_pre_attn_scalar=_query_pre_attn_scalar(cfg, arch),
                    final_logit_softcapping=cfg.logit_softcap)
        if arch == "Gemma2ForCausalLM":
            conf.update(model_type="gemma2", attn_logit_softcapping=a.softcap, rope_parameters=rope_parameters(a))
        else:
            conf.update(model_type="gemma3_text", rope_parameters={"full_attention": rope_parameters(a),
                                                                   "sliding_attention": rope_parameters(swa)})
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    sizes = [a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd]
    for i in range(L):
        pre, A, E = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        att = pre + "self_attn."
        for n, w in zip("qkv", sd[A + "mixer.qkv.weight"].split(sizes)):
            out[f"{att}{n}_proj.weight"] = w
        out[att + "o_proj.weight"] = sd[A + "mixer.out_proj.weight"]
        if a.qkv_bias:
            for n, b in zip("qkv", sd[A + "mixer.qkv.bias"].split(sizes)):
                out[f"{att}{n}_proj.bias"] = b
            out[att + "o_proj.bias"] = sd[A + "mixer.out_proj.bias"]
        if a.qk_norm:
            out[att + "q_norm.weight"], out[att + "k_norm.weight"] = sd[A + "mixer.q_norm.weight"], \
                sd[A + "mixer.k_norm.weight"]
        out[pre + "post_attention_layernorm.weight"] = sd[A + "post_norm.weight"]
        out[pre + "post_feedforward_layernorm.weight"] = sd[E + "post_norm.weight"]
        if arch != "Olmo2ForCausalLM":
            out[pre + "input_layernorm.weight"] = sd[A + "norm.weight"]
            out[pre + "pre_feedforward_layernorm.weight"] = sd[E + "norm.weight"]
        gu, dn = sd[E + "mixer.w_gate_up"][0], sd[E + "mixer.w_down"][0]  # (D, 2F), (F, D)
        F_ = dn.shape[0]
        out[pre + "mlp.gate_proj.weight"], out[pre + "mlp.up_proj.weight"] = gu[:, :F_].T, gu[:, F_:].T
        out[pre + "mlp.down_proj.weight"] = dn.T
    return conf, out
