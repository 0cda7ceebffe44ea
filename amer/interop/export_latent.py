"""amer -> transformers for models with multi-head latent attention or Kimi Delta Attention and a DeepSeek-style MoE:
``D E`` layers are ``DeepseekV3ForCausalLM`` (dense feed-forward layers first, ``first_k_dense_replace``); layers of
KDA (``G`` with the channel gate) and position-free MLA (``D`` with ``mla.rope = false``) are
``KimiLinearForCausalLM`` (dense or routed per layer, ``mlp_layer_types``). The E blocks must be what
``DeepseekV3MoE`` / ``KimiLinearMoE`` compute: sigmoid scores, group-limited top-k, routed scaling, shared experts of
the routed width.

:func:`latent_target` names the class (None for a pattern neither class expresses) and refuses, naming the setting,
what the class cannot; :func:`latent_export` writes its config and tensors in the layout each class saves (DeepSeek's
rotary rows in the half-split layout with ``rope_interleave`` off, so nothing is permuted). The inverse of
:mod:`amer.interop.deepseek` and :mod:`amer.interop.kimi`. The model-wide checks (block options, embedding and logit
scales) are the caller's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.config import ModelConfig
from amer.errors import InputError
from amer.interop.export_parts import moe_plain

__all__ = ["latent_target", "latent_export"]

DEEPSEEK, KIMI = "DeepseekV3ForCausalLM", "KimiLinearForCausalLM"
LATENT_NORM_EPS = 1e-6  # both classes build their latent norms with the default epsilon
MLA_NAMES = {"q_a_proj": "q_a_proj", "q_a_norm": "q_a_layernorm", "q_b_proj": "q_b_proj", "q_proj": "q_proj",
             "kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "kv_b_proj": "kv_b_proj",
             "out_proj": "o_proj"}


def _refuse(arch: str, what: str) -> InputError:
    return InputError(f"cannot export as {arch}: {what}")


def _pairs(cfg: ModelConfig, arch: str, mixers: str) -> list[tuple[Any, Any]]:
    """(mixer layer, E layer) per decoder layer; the pattern must be a mixer of ``mixers`` then E, repeated."""
    layers = cfg.parsed.layers
    if len(layers) % 2 or any(a.family not in mixers or e.family != "E" for a, e in zip(layers[::2], layers[1::2])):
        raise _refuse(arch, f"pattern {cfg.pattern!r}: the class expresses layers of {' or '.join(mixers)} each "
                      "followed by a feed-forward (E)")
    return list(zip(layers[::2], layers[1::2]))


def latent_target(cfg: ModelConfig) -> str | None:
    fams = {layer.family for layer in cfg.parsed.layers}
    kda = "G" in fams and cfg.deltanet.gate == "channel"
    if "D" not in fams and not kda:
        return None
    arch = KIMI if kda or not cfg.mla.rope else DEEPSEEK
    pairs = _pairs(cfg, arch, "D" if arch == DEEPSEEK else "GD")
    if "D" in fams:
        _check_mla(cfg, arch)
    if "G" in fams:
        _check_kda(cfg)
    ffn = [cfg.layer_config(e) for _, e in pairs]
    routed = [c.n_experts > 1 for c in ffn]
    if arch == DEEPSEEK and any(routed) and not all(routed[routed.index(True):]):
        raise _refuse(arch, "the dense feed-forward layers must all come first (first_k_dense_replace), the MoE ones "
                      "after")
    for kind in (True, False):
        if len({e.variant for (_, e), r in zip(pairs, routed) if r == kind}) > 1:
            raise _refuse(arch, "the MoE layers must share one E config, and the dense layers another")
    for c in ffn:
        if c.activation != "silu" or c.bias or c.d_latent is not None:
            raise _refuse(arch, "the feed-forwards must be SwiGLU without biases or a latent width (moe.activation "
                          "silu)")
        if c.n_experts == 1 and c.shared_expert:
            raise _refuse(arch, "a dense feed-forward layer with a shared expert")
        if c.n_experts == 1:
            moe_plain(c, "moe", arch, ("n_experts", "d_ff"))
    if any(routed):
        _check_router(ffn[routed.index(True)], arch)
    return arch


def _check_mla(cfg: ModelConfig, arch: str) -> None:
    m = cfg.mla
    if cfg.family_variants.get("mla"):
        raise _refuse(arch, "MLA variants (every layer's attention has the same settings)")
    eps = m.norm_eps if m.norm_eps is not None else cfg.norm_eps
    if m.scale is not None or eps != LATENT_NORM_EPS:
        raise _refuse(arch, f"mla.scale must be unset and the latent norms' epsilon {LATENT_NORM_EPS} (got scale="
                      f"{m.scale}, eps={eps})")
    if arch == KIMI and m.rope:
        raise _refuse(arch, "Kimi Linear's MLA has no position encoding (mla.rope must be off beside KDA layers)")
    if arch == KIMI and m.yarn_factor is not None and m.yarn_mscale_all_dim:
        # without RoPE YaRN's frequencies do nothing, but its mscale_all_dim still scales every softmax, which
        # Kimi's config has no place for
        raise _refuse(arch, f"mla.yarn_mscale_all_dim={m.yarn_mscale_all_dim} with mla.yarn_factor scales the softmax; "
                      "Kimi Linear's MLA has no YaRN (needs 0 or no yarn_factor)")


def _check_kda(cfg: ModelConfig) -> None:
    g = cfg.deltanet
    dk = g.head_k_dim or cfg.d_model // g.n_k_heads
    eps = g.norm_eps if g.norm_eps is not None else cfg.norm_eps
    wrong = [f"{name}={getattr(g, name)!r}" for name, ok in (
        ("n_v_heads", g.n_v_heads in (None, g.n_k_heads)), ("head_v_dim", (g.head_v_dim or dk) == dk),
        ("gate_rank", g.gate_rank in (None, dk)), ("output_gate", g.output_gate == "sigmoid"),
        ("out_gate_rank", g.out_gate_rank == dk), ("allow_neg_eigval", not g.allow_neg_eigval),
        ("bias", not g.bias), ("conv_bias", not g.conv_bias), ("norm_eps", eps == cfg.norm_eps)) if not ok]
    if cfg.family_variants.get("deltanet") or wrong:
        raise _refuse(KIMI, f"KDA has one value head per key head of the same width, rank-head_dim decay and sigmoid "
                      f"output gates, no biases and the model's norm epsilon, and no variants (got {', '.join(wrong)})")


def _check_router(r: Any, arch: str) -> None:
    moe_plain(r, "moe", arch, ("n_experts", "top_k", "d_ff", "score", "renormalize", "renormalize_top1", "routed_scale",
                               "expert_bias", "n_groups", "topk_groups", "shared_expert", "d_ff_shared",
                               "n_shared_experts", "renormalize_eps", "shared_expert_gate"))
    if r.score != "sigmoid" or r.renormalize_eps != 0 or r.shared_expert_gate:
        raise _refuse(arch, "the MoE scores experts by sigmoid (moe.score sigmoid), renormalises without an epsilon "
                      "and has no shared-expert gate")
    if not r.shared_expert or (r.d_ff_shared or r.d_ff) != r.d_ff:
        raise _refuse(arch, "the MoE always has shared experts of the routed experts' width (moe.shared_expert, "
                      "moe.d_ff_shared = moe.d_ff)")
    if r.top_k == 1 and r.renormalize != r.renormalize_top1:
        raise _refuse(arch, "with top-1 routing the MoE renormalises exactly when it renormalises top-k "
                      "(moe.renormalize_top1 = moe.renormalize)")
    if r.n_experts // r.n_groups < 2:
        raise _refuse(arch, f"groups of one expert (moe.n_groups {r.n_groups} of {r.n_experts} experts): the MoE "
                      "ranks a group by its two best experts")


def _mla_config(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.mla
    return {"num_attention_heads": m.n_heads, "num_key_value_heads": m.n_heads, "q_lora_rank": m.q_lora_rank or None,
            "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
            "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim, "attention_bias": m.bias}


def _rope(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.mla
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.yarn_factor is not None:
        rope.update(rope_type="yarn", factor=m.yarn_factor, original_max_position_embeddings=m.yarn_original,
                    beta_fast=m.yarn_beta_fast, beta_slow=m.yarn_beta_slow)
        rope.update({k: v for k, v in (("mscale", m.yarn_mscale), ("mscale_all_dim", m.yarn_mscale_all_dim)) if v})
    return rope


def _config(cfg: ModelConfig, arch: str, pairs: list, ffn: list, routed: list[bool]) -> dict[str, Any]:
    dense = next((c for c, r in zip(ffn, routed) if not r), None)
    moe = next((c for c, r in zip(ffn, routed) if r), None)
    r = moe or dense
    conf: dict[str, Any] = {"architectures": [arch], "hidden_size": cfg.d_model, "num_hidden_layers": len(pairs),
                            "intermediate_size": (dense or moe).d_ff or 2 * cfg.d_model,
                            "moe_intermediate_size": r.d_ff or 2 * cfg.d_model, "routed_scaling_factor": r.routed_scale,
                            "topk_group": r.topk_groups, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
                            # the classes' own special ids belong to their vocabularies (a tokenizer sets them)
                            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if any(layer.family == "D" for layer, _ in pairs):
        conf.update(_mla_config(cfg))
    shared = r.n_shared_experts if moe is not None else 1
    if arch == DEEPSEEK:
        return {**conf, "model_type": "deepseek_v3", "rope_parameters": _rope(cfg), "rope_interleave": False,
                "n_routed_experts": r.n_experts, "num_experts_per_tok": r.top_k if moe else 1, "n_group": r.n_groups,
                "n_shared_experts": shared, "norm_topk_prob": r.renormalize, "num_nextn_predict_layers": 0,
                "first_k_dense_replace": routed.index(True) if any(routed) else len(routed),
                "max_position_embeddings": cfg.max_seq_len}
    g = cfg.deltanet
    dk = g.head_k_dim or cfg.d_model // g.n_k_heads
    number = {kind: [i + 1 for i, (a, _) in enumerate(pairs) if a.family == kind] for kind in "GD"}
    conf.setdefault("num_attention_heads", g.n_k_heads)
    return {**conf, "model_type": "kimi_linear", "num_experts": r.n_experts,
            "num_experts_per_token": r.top_k if moe else 1, "num_expert_group": r.n_groups,
            "num_shared_experts": shared, "moe_renormalize": r.renormalize, "model_max_length": cfg.max_seq_len,
            "layer_types": ["linear_attention" if a.family == "G" else "full_attention" for a, _ in pairs],
            "mlp_layer_types": ["sparse" if x else "dense" for x in routed],
            "linear_attn_config": {"head_dim": dk, "num_heads": g.n_k_heads, "short_conv_kernel_size": g.d_conv,
                                   "kda_layers": number["G"], "full_attn_layers": number["D"]}}


def _gate_up(w: Tensor) -> tuple[Tensor, Tensor]:
    """(D, 2F) gate columns then up columns -> the (F, D) gate and up Linear weights."""
    F_ = w.shape[1] // 2
    return w[:, :F_].T, w[:, F_:].T


def _kda(sd: dict[str, Tensor], mixer: str, pre: str, cfg: ModelConfig) -> dict[str, Tensor]:
    g = cfg.deltanet
    dk = g.head_k_dim or cfg.d_model // g.n_k_heads
    width = g.n_k_heads * dk
    q, k, v, g_a, b, f_a = sd[mixer + "in_proj.weight"].split([width, width, width, dk, g.n_k_heads, dk])
    out = {f"{pre}{n}_proj.weight": w for n, w in zip("qkv", (q, k, v))}
    for n, w in zip("qkv", sd[mixer + "conv_weight"].split(width)):
        out[f"{pre}{n}_conv1d.weight"] = w.unsqueeze(1)
    out.update({pre + "g_a_proj.weight": g_a, pre + "b_proj.weight": b, pre + "f_a_proj.weight": f_a,
                pre + "g_b_proj.weight": sd[mixer + "out_gate_proj.weight"],
                pre + "f_b_proj.weight": sd[mixer + "gate_proj.weight"],
                pre + "A_log": sd[mixer + "A_log"].view(1, 1, -1, 1), pre + "dt_bias": sd[mixer + "dt_bias"],
                pre + "o_norm.weight": sd[mixer + "norm_weight"], pre + "o_proj.weight": sd[mixer + "out_proj.weight"]})
    return out


def _ffn(sd: dict[str, Tensor], mixer: str, pre: str, c: Any, names: tuple[str, str, str]) -> dict[str, Tensor]:
    """A dense feed-forward (``pre`` + gate/up/down_proj) or the router, routed experts (their per-expert ``names``)
    and shared experts of an E block."""
    if c.n_experts == 1:
        gate, up = _gate_up(sd[mixer + "w_gate_up"][0])
        return {pre + "gate_proj.weight": gate, pre + "up_proj.weight": up,
                pre + "down_proj.weight": sd[mixer + "w_down"][0].T}
    out = {pre + "gate.weight": sd[mixer + "router.weight"],
           pre + "gate.e_score_correction_bias": sd.get(mixer + "expert_bias", torch.zeros(c.n_experts))}
    for j in range(c.n_experts):
        gate, up = _gate_up(sd[mixer + "w_gate_up"][j])
        ex = f"{pre}experts.{j}."
        out.update({f"{ex}{names[0]}.weight": gate, f"{ex}{names[1]}.weight": up,
                    f"{ex}{names[2]}.weight": sd[mixer + "w_down"][j].T})
    gate, up = sd[mixer + "shared.gate_up.weight"].chunk(2)
    out.update({pre + "shared_experts.gate_proj.weight": gate, pre + "shared_experts.up_proj.weight": up,
                pre + "shared_experts.down_proj.weight": sd[mixer + "shared.down.weight"]})
    return out


def latent_export(model: Any, cfg: ModelConfig, arch: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    pairs = _pairs(cfg, arch, "D" if arch == DEEPSEEK else "GD")
    ffn = [cfg.layer_config(e) for _, e in pairs]
    routed = [c.n_experts > 1 for c in ffn]
    conf = _config(cfg, arch, pairs, ffn, routed)
    sd = {name: t.detach() for name, t in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if arch == KIMI and cfg.tie_embeddings:  # Kimi Linear never ties its head to the embedding: the folder holds a copy
        out["lm_head.weight"] = sd["embed.weight"].clone()
    ffn_pre, names = ("mlp.", ("gate_proj", "up_proj", "down_proj")) if arch == DEEPSEEK else (
        "block_sparse_moe.", ("w1", "w3", "w2"))  # as each class saves them
    for i, ((layer, _), c) in enumerate(zip(pairs, ffn)):
        pre, a, e = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "input_layernorm.weight"] = sd[a + "norm.weight"]
        out[pre + "post_attention_layernorm.weight"] = sd[e + "norm.weight"]
        if layer.family == "G":
            out.update(_kda(sd, a + "mixer.", pre + "self_attn.", cfg))
        else:
            for name, t in sd.items():
                if name.startswith(a + "mixer."):
                    module, kind = name.removeprefix(a + "mixer.").split(".")
                    out[f"{pre}self_attn.{MLA_NAMES[module]}.{kind}"] = t
        out.update(_ffn(sd, e + "mixer.", pre + ffn_pre, c, names))
    return conf, out
