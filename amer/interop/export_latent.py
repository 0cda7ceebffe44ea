"""amer -> transformers for models with multi-head latent attention: ``D E`` layers are ``DeepseekV3ForCausalLM``
when the E blocks are what ``DeepseekV3MoE`` computes (sigmoid scores, group-limited top-k, routed scaling, shared
experts of the routed width) after a run of dense first layers (``E.dense``, ``first_k_dense_replace``).

:func:`latent_target` names the class for a pattern with D blocks (None for one without) and refuses, naming the
setting, what the class cannot express; :func:`latent_export` writes its config and tensors, the rotary rows in the
half-split layout with ``rope_interleave`` off (the block's own layout, so nothing is permuted). The inverse of
:mod:`amer.interop.deepseek`. The model-wide checks (block options, embedding and logit scales) are the caller's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.config import ModelConfig
from amer.errors import InputError

__all__ = ["latent_target", "latent_export"]

ARCH = "DeepseekV3ForCausalLM"
LATENT_NORM_EPS = 1e-6  # DeepseekV3Attention's latent norms keep their default epsilon


def _refuse(what: str) -> InputError:
    return InputError(f"cannot export as {ARCH}: {what}")


def _layers(cfg: ModelConfig) -> list[tuple[Any, Any]]:
    """(D layer, E layer) per decoder layer; the pattern must be ``D E`` repeated."""
    layers = cfg.parsed.layers
    if len(layers) % 2 or any(a.family != "D" or e.family != "E" for a, e in zip(layers[::2], layers[1::2])):
        raise _refuse(f"pattern {cfg.pattern!r}: the class expresses 'D E' layers (MLA then a feed-forward)")
    return list(zip(layers[::2], layers[1::2]))


def latent_target(cfg: ModelConfig) -> str | None:
    if not any(layer.family == "D" for layer in cfg.parsed.layers):
        return None
    pairs = _layers(cfg)
    m = cfg.mla
    if cfg.family_variants.get("mla"):
        raise _refuse("MLA variants (every layer's attention has the same settings)")
    eps = m.norm_eps if m.norm_eps is not None else cfg.norm_eps
    if not m.rope or m.scale is not None or eps != LATENT_NORM_EPS:
        raise _refuse(f"mla.rope must be on, mla.scale unset and the latent norms' epsilon {LATENT_NORM_EPS} (got "
                      f"rope={m.rope}, scale={m.scale}, eps={eps})")
    ffn = [cfg.layer_config(e) for _, e in pairs]
    routed = [c.n_experts > 1 for c in ffn]
    k = routed.index(True) if any(routed) else len(routed)
    if not all(routed[k:]):
        raise _refuse("the dense feed-forward layers must all come first (first_k_dense_replace), the MoE ones after")
    if len({(e.variant) for (_, e), r in zip(pairs, routed) if r}) > 1 or \
            len({(e.variant) for (_, e), r in zip(pairs, routed) if not r}) > 1:
        raise _refuse("the MoE layers must share one E config, and the dense layers another")
    for c in ffn:
        if c.activation != "silu" or c.bias or c.d_latent is not None:
            raise _refuse("the feed-forwards must be SwiGLU without biases or a latent width (moe.activation silu)")
    if k < len(ffn):
        _check_router(ffn[k])
    if k and ffn[0].shared_expert:
        raise _refuse("a dense feed-forward layer with a shared expert")
    return ARCH


def _check_router(r: Any) -> None:
    if r.score != "sigmoid" or r.renormalize_eps != 0 or r.shared_expert_gate:
        raise _refuse("DeepseekV3MoE scores experts by sigmoid (moe.score sigmoid), renormalises without an epsilon "
                      "and has no shared-expert gate")
    if not r.shared_expert or (r.d_ff_shared or r.d_ff) != r.d_ff:
        raise _refuse("DeepseekV3MoE always has shared experts of the routed experts' width (moe.shared_expert, "
                      "moe.d_ff_shared = moe.d_ff)")
    if r.top_k == 1 and r.renormalize != r.renormalize_top1:
        raise _refuse("with top-1 routing DeepseekV3MoE renormalises exactly when it renormalises top-k "
                      "(moe.renormalize_top1 = moe.renormalize)")
    if r.n_experts // r.n_groups < 2:
        raise _refuse(f"groups of one expert (moe.n_groups {r.n_groups} of {r.n_experts} experts): DeepseekV3MoE "
                      "ranks a group by its two best experts")


def _config(cfg: ModelConfig, dense: Any, routed: Any, k: int, L: int) -> dict[str, Any]:
    m = cfg.mla
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.yarn_factor is not None:
        rope.update(rope_type="yarn", factor=m.yarn_factor, original_max_position_embeddings=m.yarn_original,
                    beta_fast=m.yarn_beta_fast, beta_slow=m.yarn_beta_slow)
        rope.update({key: value for key, value in (("mscale", m.yarn_mscale), ("mscale_all_dim",
                                                                             m.yarn_mscale_all_dim)) if value})
    r = routed if routed is not None else dense
    return {"architectures": [ARCH], "model_type": "deepseek_v3", "hidden_size": cfg.d_model, "num_hidden_layers": L,
            "intermediate_size": (dense or routed).d_ff or 2 * cfg.d_model,
            "moe_intermediate_size": r.d_ff or 2 * cfg.d_model, "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_heads, "q_lora_rank": m.q_lora_rank or None, "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim, "attention_bias": m.bias, "rope_parameters": rope, "rope_interleave": False,
            "n_routed_experts": r.n_experts, "num_experts_per_tok": r.top_k if routed is not None else 1,
            "n_shared_experts": r.n_shared_experts if routed is not None else 1,
            "routed_scaling_factor": r.routed_scale, "n_group": r.n_groups, "topk_group": r.topk_groups,
            "norm_topk_prob": r.renormalize, "first_k_dense_replace": k, "num_nextn_predict_layers": 0,
            "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len}


def _gate_up(w: Tensor) -> tuple[Tensor, Tensor]:
    """(D, 2F) gate columns then up columns -> the (F, D) gate and up Linear weights."""
    F_ = w.shape[1] // 2
    return w[:, :F_].T, w[:, F_:].T


def latent_export(model: Any, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
    pairs = _layers(cfg)
    ffn = [cfg.layer_config(e) for _, e in pairs]
    routed = [c.n_experts > 1 for c in ffn]
    k = routed.index(True) if any(routed) else len(routed)
    conf = _config(cfg, ffn[0] if k else None, ffn[k] if k < len(ffn) else None, k, len(pairs))
    sd = {name: t.detach() for name, t in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    names = {"q_a_proj": "q_a_proj", "q_a_norm": "q_a_layernorm", "q_b_proj": "q_b_proj", "q_proj": "q_proj",
             "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "kv_b_proj": "kv_b_proj",
             "out_proj": "o_proj"}
    for i, is_routed in enumerate(routed):
        pre, a, e = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "input_layernorm.weight"] = sd[a + "norm.weight"]
        out[pre + "post_attention_layernorm.weight"] = sd[e + "norm.weight"]
        for name, t in sd.items():
            if name.startswith(a + "mixer."):
                module, kind = name.removeprefix(a + "mixer.").split(".")
                out[f"{pre}self_attn.{names[module]}.{kind}"] = t
        mixer = e + "mixer."
        if not is_routed:
            gate, up = _gate_up(sd[mixer + "w_gate_up"][0])
            out.update({pre + "mlp.gate_proj.weight": gate, pre + "mlp.up_proj.weight": up,
                        pre + "mlp.down_proj.weight": sd[mixer + "w_down"][0].T})
            continue
        n = ffn[i].n_experts
        out[pre + "mlp.gate.weight"] = sd[mixer + "router.weight"]
        out[pre + "mlp.gate.e_score_correction_bias"] = sd.get(mixer + "expert_bias", torch.zeros(n))
        for j in range(n):
            gate, up = _gate_up(sd[mixer + "w_gate_up"][j])
            ex = f"{pre}mlp.experts.{j}."
            out.update({ex + "gate_proj.weight": gate, ex + "up_proj.weight": up,
                        ex + "down_proj.weight": sd[mixer + "w_down"][j].T})
        gate, up = sd[mixer + "shared.gate_up.weight"].chunk(2)
        out.update({pre + "mlp.shared_experts.gate_proj.weight": gate, pre + "mlp.shared_experts.up_proj.weight": up,
                    pre + "mlp.shared_experts.down_proj.weight": sd[mixer + "shared.down.weight"]})
    return conf, out
