"""amer -> transformers for Griffin's layers (De et al. 2024, arXiv 2402.19427): ``RE`` and ``AE`` layers, each
feed-forward a biased GeGLU, as ``RecurrentGemmaForCausalLM``; the inverse of :mod:`amer.interop.gemma`.

RecurrentGemma fixes what amer leaves as options, so each is checked and refused by name when it differs: the
RG-LRU's sharpness ``c = 8``, biases on its projections, a first input without the normaliser; local attention
(a window) with an output bias and whole-width heads; ``(1 + w)`` norm gains, embeddings scaled by sqrt(d) rounded
to bfloat16 and a logit soft cap. One ``num_attention_heads`` counts both the attention heads and the RG-LRU's
gate blocks. Any sequence of recurrent and attention layers is written as ``block_types``, one entry per layer.
"""

from __future__ import annotations

from typing import Any

from amer.config import ModelConfig
from amer.interop.export_parts import (
    Tensors,
    Written,
    attention_out,
    dense_out,
    mixer_ffn_pairs,
    moe_plain,
    plain,
    pre_norms,
    refuse,
    shared,
)
from amer.interop.gemma import embed_scale

__all__ = ["griffin_target", "griffin_export", "GRIFFIN"]

GRIFFIN = "RecurrentGemmaForCausalLM"


def griffin_target(cfg: ModelConfig) -> str | None:
    """RecurrentGemma for (mixer, E) layers whose mixers are R and A blocks with at least one R, or A blocks alone
    whose feed-forwards are biased GeGLUs (no other target class has those); None otherwise."""
    pairs = mixer_ffn_pairs(cfg)
    if not pairs:
        return None
    mixers = {str(m.family) for m, _ in pairs}
    if "R" in mixers and mixers <= {"A", "R"}:
        return GRIFFIN
    ffns = [cfg.layer_config(e) for _, e in pairs]
    if mixers == {"A"} and any(f.bias and f.activation == "gelu_tanh" for f in ffns):
        return GRIFFIN
    return None


def griffin_export(model: Any, cfg: ModelConfig) -> Written:
    """(config.json contents, tensors in RecurrentGemma's names) of ``model``."""
    shared(cfg, GRIFFIN, ("embed_scale", "logit_softcap", "norm_offset"))
    pre_norms(cfg, GRIFFIN)
    pairs = mixer_ffn_pairs(cfg) or []
    letters = [str(m.family) for m, _ in pairs]
    d, a, r, e = cfg.d_model, cfg.attention, cfg.recurrent, cfg.moe
    # what the class fixes, all named in one refusal: a model built in amer usually differs in several
    fixed: list[tuple[str, Any, Any]] = [
        ("model.norm_offset", 1.0, cfg.norm_offset), ("model.embed_scale", embed_scale(d), cfg.embed_scale),
        ("moe.n_experts", 1, e.n_experts), ("moe.bias", True, e.bias), ("moe.activation", "gelu_tanh", e.activation)]
    if "R" in letters:
        fixed += [("recurrent.c", 8.0, r.c), ("recurrent.bias", True, r.bias),
                  ("recurrent.normalise_first", False, r.normalise_first)]
    if "A" in letters:
        fixed.append(("attention.out_bias", True, a.out_bias))
    off = [f"{name} {want!r} (not {have!r})" for name, want, have in fixed if have != want]
    if "A" in letters:
        if a.head_dim not in (None, d // a.n_heads):
            off.append(f"attention.head_dim unset or {d // a.n_heads} (not {a.head_dim})")
        if "R" in letters and a.n_heads != r.n_heads:  # one num_attention_heads counts both
            off.append(f"attention.n_heads equal to recurrent.n_heads {r.n_heads} (not {a.n_heads})")
        if a.window is None:
            off.append("attention.window set (its attention is local)")
    if cfg.logit_softcap is None:
        off.append("model.logit_softcap set (it always soft-caps its logits)")
    if off:
        raise refuse(f"{GRIFFIN} fixes what these settings choose; it needs " + ", ".join(off))
    moe_plain(e, "moe", GRIFFIN, ("n_experts", "d_ff", "activation", "bias"))
    n_heads = r.n_heads
    if "R" in letters:
        plain(r, "recurrent", GRIFFIN, ("lru_width", "n_heads", "d_conv", "c", "bias", "normalise_first"))
    if "A" in letters:
        plain(a, "attention", GRIFFIN, ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "window", "qkv_bias",
                                        "out_bias", "rope_fraction"))
        n_heads = a.n_heads
    has_a = "A" in letters
    conf = {"architectures": [GRIFFIN], "model_type": "recurrent_gemma", "hidden_size": d,
            "num_hidden_layers": len(pairs), "intermediate_size": 2 * (e.d_ff or 2 * d),
            "num_attention_heads": n_heads, "num_key_value_heads": min(a.n_kv_heads, n_heads),
            "lru_width": r.lru_width or d, "conv1d_width": r.d_conv,
            "attention_window_size": a.window or 2048, "attention_bias": has_a and a.qkv_bias,
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta,
                                "partial_rotary_factor": a.rope_fraction},
            "block_types": ["recurrent" if x == "R" else "attention" for x in letters],
            "hidden_activation": "gelu_pytorch_tanh", "logits_soft_cap": cfg.logit_softcap,
            "rms_norm_eps": cfg.norm_eps}
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.final_norm.weight": sd["norm.weight"]}
    for i, x in enumerate(letters):
        pre, mix, ffn = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "temporal_pre_norm.weight"] = sd[mix + "norm.weight"]
        if x == "A":
            attention_out(cfg, sd, mix, pre + "temporal_block.", out)
        else:
            _recurrent_out(sd, mix + "mixer.", pre + "temporal_block.", out)
        out[pre + "channel_pre_norm.weight"] = sd[ffn + "norm.weight"]
        dense_out(sd, ffn, pre + "mlp_block.", out)  # with its biases
    return conf, out


def _recurrent_out(sd: Tensors, src: str, dst: str, out: Tensors) -> None:
    """An R mixer in RecurrentGemma's names: in_proj is [linear_y (the GeLU branch) | linear_x (the recurrence)],
    the gate weights [recurrent gate | input gate] per block, and recurrent_param is amer's -Lambda."""
    for name, half in zip(("linear_y", "linear_x"), sd[src + "in_proj.weight"].chunk(2)):
        out[f"{dst}{name}.weight"] = half
    for name, half in zip(("linear_y", "linear_x"), sd[src + "in_proj.bias"].chunk(2)):
        out[f"{dst}{name}.bias"] = half
    out[dst + "linear_out.weight"] = sd[src + "out_proj.weight"]
    out[dst + "linear_out.bias"] = sd[src + "out_proj.bias"]
    out[dst + "conv_1d.weight"], out[dst + "conv_1d.bias"] = sd[src + "conv_weight"].unsqueeze(1), sd[src + "conv_bias"]
    lru = dst + "rg_lru."
    for kind in ("weight", "bias"):
        rec, inp = sd[f"{src}gate_{kind}"].chunk(2, dim=-1)
        out[f"{lru}recurrent_gate_{kind}"], out[f"{lru}input_gate_{kind}"] = rec, inp
    out[lru + "recurrent_param"] = -sd[src + "Lambda"]
