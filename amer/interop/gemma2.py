"""Gemma 2 (Team et al. 2024, arXiv 2408.00118) and Gemma 3's text model (arXiv 2503.19786).

Each layer is ``x + post_attn_norm(attn(pre_attn_norm(x)))`` then ``x + post_ffw_norm(mlp(pre_ffw_norm(x)))``:
two amer blocks with ``norm_placement = "sandwich"``, ``A`` (or ``A.swa`` for the sliding-window layers of
``layer_types``) then ``E``. What else the classes do is expressed by options: ``(1 + w)`` RMSNorm gains
(``norm_offset``), embeddings times sqrt(d) (``embed_scale``), a GeGLU MLP (``moe.activation gelu_tanh``), the
softmax scale ``query_pre_attn_scalar^-1/2`` (``attention.scale``), Gemma 2's attention-logit and final-logit soft
caps (``attention.softcap``, ``logit_softcap``); Gemma 3's per-head q/k norms (``attention.qk_norm``) and its
per-layer-type RoPE (the local base on the ``swa`` variant, linear scaling on the global layers).
"""

from __future__ import annotations

from typing import Any

from amer.config import ModelConfig
from amer.interop.common import Converted, attention_weights, converter, dense_mlp_weights, shared_options
from amer.interop.gemma import GELU_TANH
from amer.interop.llama import _embeddings
from amer.interop.source import Source, unsupported

__all__ = ["convert_gemma2"]

KINDS = ("sliding_attention", "full_attention")


def _layer_kinds(src: Source, every: int) -> list[str]:
    """``layer_types``, or the class's default: every ``every``-th layer global, the others sliding."""
    c = src.config
    L = int(c["num_hidden_layers"])
    kinds = c.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                                     for i in range(L)]
    bad = sorted({k for k in kinds if k not in KINDS})
    if len(kinds) != L or bad:
        raise unsupported(src.arch, f"layer_types must list sliding_attention / full_attention for each of the {L} "
                          f"layers, got {kinds!r}")
    return list(kinds)


def _gemma3_rope(c: dict[str, Any], kind: str) -> dict[str, Any]:
    """One layer type's RoPE parameters: ``rope_parameters[kind]``, or in configs written before per-type
    parameters ``rope_theta`` and ``rope_scaling`` (global layers) and ``rope_local_base_freq`` (sliding ones)."""
    per_type = c.get("rope_parameters") or {}
    if kind in per_type:  # as the class builds it: a legacy rope_scaling updates the global entry, and a theta
        # the entry leaves out is rope_theta (1e6) or rope_local_base_freq (1e4)
        entry = dict(per_type[kind])
        scaling = c.get("rope_scaling") or {}
        if kind == "full_attention" and scaling:
            entry.update(scaling)
            entry["rope_type"] = scaling.get("rope_type") or scaling.get("type") or entry.get("rope_type")
        base = (c.get("rope_theta") or 1e6) if kind == "full_attention" else (c.get("rope_local_base_freq") or 1e4)
        return {"rope_theta": float(base), **entry}
    if kind == "sliding_attention":
        return {"rope_type": "default", "rope_theta": float(c.get("rope_local_base_freq") or 10000.0)}
    scaling = c.get("rope_scaling") or {}
    return {"rope_type": scaling.get("rope_type") or scaling.get("type") or "default",
            "rope_theta": float(c.get("rope_theta") or 1e6), **scaling}


@converter("Gemma2ForCausalLM", "Gemma3ForCausalLM")
def convert_gemma2(src: Source) -> Converted:
    c = src.config
    gemma3 = src.arch == "Gemma3ForCausalLM"
    if "text_config" in c:
        raise unsupported(src.arch, "a multimodal Gemma 3 config (text_config) naming the text class: its class is "
                          "Gemma3ForConditionalGeneration, whose language model imports")
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise unsupported(src.arch, f"hidden_activation={act!r} (amer's GeGLU uses the tanh GeLU)")
    if c.get("use_bidirectional_attention"):
        raise unsupported(src.arch, "use_bidirectional_attention (amer's attention is causal)")
    kinds = _layer_kinds(src, int(c.get("sliding_window_pattern") or 6) if gemma3 else 2)
    n_heads, d = int(c["num_attention_heads"]), int(c["hidden_size"])
    head_dim = int(c.get("head_dim") or d // n_heads)
    bias = bool(c.get("attention_bias", False))
    attn: dict[str, Any] = {"n_heads": n_heads, "n_kv_heads": int(c.get("num_key_value_heads") or n_heads),
                            "head_dim": head_dim, "qkv_bias": bias, "out_bias": bias, "qk_norm": gemma3,
                            "scale": float(c.get("query_pre_attn_scalar") or head_dim) ** -0.5}
    if not gemma3:  # Gemma 3 keeps the setting in its config but does not apply it
        attn["softcap"] = c.get("attn_logit_softcapping") or None
    swa: dict[str, Any] = {"window": int(c["sliding_window"])} if "sliding_attention" in kinds else {}
    if gemma3:
        for kind, table in (("full_attention", attn), ("sliding_attention", swa)):
            theta, fraction, scaling = src.rope(_gemma3_rope(c, kind))
            # the variant inherits the family's values: each type states its own scaling, none included
            table.update({"rope_theta": theta, "rope_fraction": fraction, "rope_linear_factor": None,
                          "rope_scale_factor": None, **scaling})
    else:
        theta, fraction, scaling = src.rope()
        attn.update(rope_theta=theta, rope_fraction=fraction, **scaling)
    if swa:
        attn["variants"] = {"swa": swa}
    pattern = " ".join(("A.swa" if k == "sliding_attention" else "A") + " E" for k in kinds)
    cfg = ModelConfig(pattern=pattern, **shared_options(src), norm_offset=1.0, embed_scale=d ** 0.5,
                      logit_softcap=c.get("final_logit_softcapping") or None, norm_placement="sandwich",
                      attention=attn, moe={"n_experts": 1, "d_ff": int(c["intermediate_size"]),
                                           "activation": "gelu_tanh"})
    state = _embeddings(src, cfg)
    for i in range(len(kinds)):
        pre, a, e = f"model.layers.{i}.", 2 * i, 2 * i + 1
        state[f"blocks.{a}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        state[f"blocks.{a}.post_norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        attention_weights(src, pre + "self_attn.", a, state, qk_norm=gemma3)
        state[f"blocks.{e}.norm.weight"] = src.get(pre + "pre_feedforward_layernorm.weight")
        state[f"blocks.{e}.post_norm.weight"] = src.get(pre + "post_feedforward_layernorm.weight")
        dense_mlp_weights(src, pre + "mlp.", e, state)
    return Converted(cfg, state)
