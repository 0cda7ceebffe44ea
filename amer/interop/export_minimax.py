"""amer -> transformers for lightning attention: layers of ``N`` (lightning) or ``A`` (softmax attention) each followed
by an ``E`` block are ``MiniMaxForCausalLM`` when every block takes its residual from its normed input
(``residual_normed``, MiniMax's post-norm layers) and the E blocks route as Mixtral does.

:func:`minimax_target` names the class for a pattern with N blocks or ``residual_normed`` blocks (None for other
patterns) and refuses, naming the setting, what the class cannot express; :func:`minimax_export` writes its config
(each family's residual and update multipliers as the ``*_alpha_factor`` / ``*_beta_factor`` of its kind of layer)
and tensors in the layout MiniMax saves. The inverse of :mod:`amer.interop.minimax`; the caller checks the model-wide
scales.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from amer.config import ModelConfig
from amer.errors import InputError
from amer.interop.export_parts import moe_plain, plain
from amer.interop.lightning import OUTPUT_NORM_EPS

__all__ = ["minimax_target", "minimax_export"]

ARCH = "MiniMaxForCausalLM"
KINDS = {"N": "linear_attn", "A": "full_attn", "E": "mlp"}
FACTORS = ("norm_placement", "residual_normed", "residual_multiplier", "update_multiplier")  # checked or written


def _refuse(what: str) -> InputError:
    return InputError(f"cannot export as {ARCH}: {what}")


def _pairs(cfg: ModelConfig) -> list[tuple[Any, Any]]:
    layers = cfg.parsed.layers
    if len(layers) % 2 or any(a.family not in "NA" or e.family != "E" for a, e in zip(layers[::2], layers[1::2])):
        raise _refuse(f"pattern {cfg.pattern!r}: the class expresses layers of N or A each followed by an E")
    return list(zip(layers[::2], layers[1::2]))


def minimax_target(cfg: ModelConfig) -> str | None:
    # residual_normed blocks are MiniMax's alone: softmax attention layers with routed E blocks, every block
    # residual_normed, are MiniMax too without lightning ones
    layers = cfg.parsed.layers
    lightning = any(layer.family == "N" for layer in layers)
    if not lightning and not ({layer.family for layer in layers} == {"A", "E"} and cfg.moe.n_experts > 1
                              and all(cfg.block_options(layer).residual_normed for layer in layers)):
        return None
    _pairs(cfg)
    fams = {layer.family for layer in cfg.parsed.layers}
    variants = [key for key in ("lightning", "attention", "moe") if cfg.family_variants.get(key)]
    if variants:
        raise _refuse(f"variants of [model.{variants[0]}] (each kind of layer has one set of settings)")
    for layer in cfg.parsed.layers:
        opts = cfg.block_options(layer)
        if opts.norm_placement != "pre" or not opts.residual_normed:
            raise _refuse(f"{layer.key} blocks must take the residual from their normed input (residual_normed, "
                          f"norm_placement pre), as MiniMax's layers do (got {opts})")
        for f in dataclasses.fields(opts):  # the residual factors are MiniMax's alpha and beta; nothing else
            if f.name not in FACTORS and getattr(opts, f.name) != f.default:
                raise _refuse(f"{layer.key} has the block option {f.name}={getattr(opts, f.name)!r}, which "
                              f"{ARCH} lacks (needs {f.default!r})")
    n = cfg.lightning
    hd = n.head_dim or cfg.d_model // n.n_heads
    eps = n.norm_eps if n.norm_eps is not None else cfg.norm_eps
    if lightning and (n.activation, n.decay_exponent, n.depth_decay, n.depth_stride, n.output_gate, eps) != (
            "silu", 8.0, True, 2, True, OUTPUT_NORM_EPS):
        raise _refuse(f"lightning attention as MiniMax has it: activation silu, decay_exponent 8, depth_decay on over "
                      f"depth_stride 2, the output gate, norm epsilon {OUTPUT_NORM_EPS}")
    if lightning:
        plain(n, "lightning", ARCH, ("n_heads", "head_dim", "activation", "decay_exponent", "depth_decay",
                                     "depth_stride", "output_gate", "norm_eps"))
    if "A" in fams:
        a = cfg.attention
        plain(a, "attention", ARCH, ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "window"))
        if lightning and (a.n_heads, a.head_dim or cfg.d_model // a.n_heads) != (n.n_heads, hd):
            raise _refuse("softmax and lightning attention share the heads and head width (num_attention_heads, "
                          "head_dim)")
        if a.qk_norm or a.qkv_bias or a.out_bias or a.scale is not None or a.softcap is not None \
                or a.rope_fraction != 1.0 or a.rope_scale_factor is not None or a.rope_linear_factor is not None:
            raise _refuse("attention without q/k norms, biases, a scale, a soft cap, partial or scaled RoPE")
    m = cfg.moe
    if m.n_experts < 2 or m.score != "softmax" or not m.renormalize or (m.top_k == 1 and not m.renormalize_top1) \
            or m.renormalize_eps or m.routed_scale != 1 or m.expert_bias or m.n_groups != 1 or m.shared_expert \
            or m.activation != "silu" or m.bias or m.d_latent is not None:
        raise _refuse("the E blocks must route as Mixtral (softmax top-k over several SwiGLU experts, renormalised, "
                      "top-1 too; no bias, groups, scale or shared experts)")
    moe_plain(m, "moe", ARCH, ("n_experts", "top_k", "d_ff", "renormalize_top1"))
    return ARCH


def minimax_export(model: Any, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
    pairs = _pairs(cfg)
    n, m = cfg.lightning, cfg.moe
    # the heads both kinds of layer share; the softmax attention's where there is no lightning layer
    heads = n if any(layer.family == "N" for layer, _ in pairs) else cfg.attention
    conf: dict[str, Any] = {
        "architectures": [ARCH], "model_type": "minimax", "hidden_size": cfg.d_model, "num_hidden_layers": len(pairs),
        "intermediate_size": m.d_ff or 2 * cfg.d_model, "num_attention_heads": heads.n_heads,
        "head_dim": heads.head_dim or cfg.d_model // heads.n_heads, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "num_local_experts": m.n_experts, "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.aux_loss_coef, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "layer_types": ["linear_attention" if a.family == "N" else "full_attention" for a, _ in pairs]}
    a = cfg.attention
    conf.update(num_key_value_heads=a.n_kv_heads, sliding_window=a.window,
                rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta})
    for letter, kind in KINDS.items():
        layer = next((x for x in cfg.parsed.layers if x.family == letter), None)
        if layer is not None:
            opts = cfg.block_options(layer)
            conf[f"{kind}_alpha_factor"] = opts.residual_multiplier
            conf[f"{kind}_beta_factor"] = opts.update_multiplier
    sd = {name: t.detach() for name, t in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    hd = a.head_dim or cfg.d_model // a.n_heads
    for i, (layer, _) in enumerate(pairs):
        pre, b, e = f"model.layers.{i}.", f"blocks.{2 * i}.mixer.", f"blocks.{2 * i + 1}.mixer."
        out[pre + "input_layernorm.weight"] = sd[f"blocks.{2 * i}.norm.weight"]
        out[pre + "post_attention_layernorm.weight"] = sd[f"blocks.{2 * i + 1}.norm.weight"]
        att = pre + "self_attn."
        if layer.family == "N":
            out.update({att + "qkv_proj.weight": sd[b + "qkv_proj.weight"], att + "norm.weight": sd[b + "norm.weight"],
                        att + "output_gate.weight": sd[b + "gate_proj.weight"],
                        att + "out_proj.weight": sd[b + "out_proj.weight"]})
        else:
            q, k, v = sd[b + "qkv.weight"].split([a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd])
            out.update({att + "q_proj.weight": q, att + "k_proj.weight": k, att + "v_proj.weight": v,
                        att + "o_proj.weight": sd[b + "out_proj.weight"]})
        moe = pre + "block_sparse_moe."
        out[moe + "gate.weight"] = sd[e + "router.weight"]
        gu, dn = sd[e + "w_gate_up"], sd[e + "w_down"]  # (E, D, 2F), (E, F, D)
        F_ = dn.shape[1]
        for j in range(m.n_experts):
            ex = f"{moe}experts.{j}."
            out.update({ex + "w1.weight": gu[j, :, :F_].T, ex + "w3.weight": gu[j, :, F_:].T,
                        ex + "w2.weight": dn[j].T})
    return conf, out
