"""amer -> transformers for LFM3's layers: ``C`` / ``A`` / ``A.swa`` layers, each followed by a dense SwiGLU, with
sandwich (or pre) norms, as ``Lfm3ForCausalLM``; the inverse of :mod:`amer.interop.lfm3`.

What the import maps onto options is mapped back, and refused where the class cannot hold it: the attention's output
gate must be one gate per head (every row of a head's gate equal, no gate bias), since LFM3's ``g_proj`` has one row
per head; partial RoPE on the global layers is written as "proportional" RoPE (base ``theta^(1 / fraction)``, each
query and key head's dimensions put back in LFM3's order); the sliding layers rotate whole heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from amer.blocks.attention import AttentionConfig
from amer.config import ModelConfig
from amer.interop.export_parts import (
    ROPE_SCALING,
    Tensors,
    Written,
    attention_out,
    dense_out,
    ffn_layers,
    head_dim,
    mixer_ffn_pairs,
    plain,
    refuse,
    rope_parameters,
    shared,
    shortconv_out,
)

__all__ = ["lfm3", "LFM3", "lfm3_traits"]

LFM3 = "Lfm3ForCausalLM"
_ATTENTION = ("n_heads", "n_kv_heads", "head_dim", "rope_theta", "rope_fraction", "window", "qk_norm", "qkv_bias",
              "out_bias", "output_gate", *ROPE_SCALING)


def lfm3_traits(cfg: ModelConfig) -> bool:
    """Whether a ``C``/``A`` + ``E`` model has what LFM3 adds to LFM2: sandwich norms, attention variants (its sliding
    layers) or an output gate."""
    layers = cfg.parsed.layers
    return cfg.attention.output_gate or any(
        (x.variant is not None and str(x.family) == "A") or cfg.block_options(x).norm_placement == "sandwich"
        for x in layers)


def _placement(cfg: ModelConfig) -> bool:
    """Whether the blocks are sandwich-normed (else pre-normed): all alike, the other block options at defaults."""
    placements = set()
    for layer in cfg.parsed.layers:
        if layer.variant is not None and str(layer.family) != "A":
            raise refuse(f"{layer.key} (layer {layer.index}): {LFM3} has one config per "
                         f"{layer.family.spec.name} block, no variants")
        opts = cfg.block_options(layer)
        if layer.branch is not None or dataclasses.replace(opts, norm_placement="pre") != type(opts)():
            raise refuse(f"{layer.key} (layer {layer.index}) has block options {LFM3} lacks (it has one residual "
                         "layer per block, with pre or sandwich norms)")
        placements.add(opts.norm_placement)
    if not placements <= {"pre", "sandwich"} or len(placements) > 1:
        raise refuse(f"{LFM3}'s blocks are all pre-normed or all sandwich-normed (use_sandwich_norm), got "
                     f"{sorted(placements)}")
    return placements == {"sandwich"}


def _rope(a: AttentionConfig, hd: int) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A global layer's RoPE as LFM3's parameters, and the order that puts amer's head dimensions back in LFM3's."""
    if a.rope_fraction == 1.0:
        return rope_parameters(a), None
    R, half = round(a.rope_fraction * hd / 2), hd // 2  # amer rotates an even width: R pairs
    if a.rope_scale_factor is not None:
        raise refuse(f"attention.rope_scale_factor with rope_fraction {a.rope_fraction}: {LFM3}'s global layers' "
                     "proportional RoPE has linear scaling alone")
    theta = float(f"{a.rope_theta ** (hd / (2 * R)):.12g}") if R else a.rope_theta  # as the import rounds it
    params = {"rope_type": "proportional", "rope_theta": theta,
              "partial_rotary_factor": 2 * R / hd, "factor": a.rope_linear_factor or 1.0}
    order = torch.tensor([*range(R), *range(half, half + R), *range(R, half), *range(half + R, hd)])
    return params, torch.argsort(order)


def lfm3(cfg: ModelConfig, sd: Tensors, arch: str = LFM3) -> Written:
    """(config.json contents, tensors in LFM3's names); ``arch`` is LFM3 (the zoo writers' signature)."""
    pairs = mixer_ffn_pairs(cfg) or []
    letters = [str(m.family) for m, _ in pairs]
    shared(cfg, LFM3)
    sandwich = _placement(cfg)
    d, sc = cfg.d_model, cfg.shortconv
    plain(sc, "shortconv", LFM3, ("l_cache", "bias"))
    types, kinds = [], {}
    for m, _ in pairs:
        if str(m.family) == "C":
            types.append("conv")
            continue
        a = cfg.layer_config(m)
        plain(a, f"attention ({m.key})", LFM3, _ATTENTION)
        if not a.qk_norm or a.qkv_bias != a.out_bias or (a.window is not None and a.rope_fraction != 1.0):
            raise refuse(f"{m.key} (layer {m.index}): {LFM3}'s attention has per-head q/k norms, biases on all "
                         "projections or none, and RoPE on whole heads in its sliding layers")
        kind = "sliding_attention" if a.window is not None else "full_attention"
        if kinds.setdefault(kind, a) != a:
            raise refuse(f"{m.key} (layer {m.index}): {LFM3} has one configuration per attention layer type")
        types.append(kind)
    rest = [dataclasses.replace(a, window=None, rope_theta=1.0, rope_fraction=0.0, rope_linear_factor=None,
                                rope_scale_factor=None) for a in kinds.values()]
    if rest and any(r != rest[0] for r in rest):
        raise refuse(f"the sliding and global attention layers differ in more than the window and RoPE; {LFM3} has one "
                     "attention configuration")
    full, swa = kinds.get("full_attention"), kinds.get("sliding_attention")
    a = full or swa or cfg.attention
    view = dataclasses.replace(cfg, attention=a)  # the layers' own attention, whatever the family table says
    hd, gate = head_dim(view), a.output_gate
    order = None
    rope: dict[str, Any] = {"sliding_attention": rope_parameters(swa) if swa else {"rope_type": "default",
                                                                                    "rope_theta": 10000.0}}
    rope["full_attention"], order = _rope(full, hd) if full else ({"rope_type": "default", "rope_theta": 1e6}, None)
    conf = {"architectures": [LFM3], "model_type": "lfm3", "hidden_size": d, "num_hidden_layers": len(pairs),
            "intermediate_size": _dense_width(cfg, pairs), "conv_bias": sc.bias, "conv_L_cache": sc.l_cache,
            "norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len, "layer_types": types,
            "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": hd,
            "attention_bias": a.qkv_bias, "sliding_window": swa.window if swa else 256,
            "use_sandwich_norm": sandwich, "use_attention_gate": gate, "rope_parameters": rope}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.embedding_norm.weight": sd["norm.weight"]}
    for i, (x, kind) in enumerate(zip(letters, types)):
        pre, mix, ffn = f"model.layers.{i}.", f"blocks.{2 * i}.", f"blocks.{2 * i + 1}."
        out[pre + "operator_norm.weight"] = sd[mix + "norm.weight"]
        out[pre + "ffn_norm.weight"] = sd[ffn + "norm.weight"]
        if sandwich:
            out[pre + "post_operator_norm.weight"] = sd[mix + "post_norm.weight"]
            out[pre + "post_ffn_norm.weight"] = sd[ffn + "post_norm.weight"]
        if x == "C":
            shortconv_out(sd, mix + "mixer.", pre + "conv.", out)
        else:
            attention_out(view, sd, mix, pre + "self_attn.", out)
            if gate:
                out[pre + "self_attn.gate_proj.weight"] = _head_gate(sd, mix + "mixer.", a.n_heads, hd, i)
            if kind == "full_attention" and order is not None:
                _reorder(out, pre + "self_attn.", order, (a.n_heads, a.n_kv_heads))
        dense_out(sd, ffn, pre + "feed_forward.", out, names=("w1", "w3", "w2"))
    return conf, out


def _dense_width(cfg: ModelConfig, pairs: list[Any]) -> int:
    ffn = ffn_layers(cfg, [e for _, e in pairs], LFM3)
    if ffn.routed is not None:
        raise refuse(f"moe.n_experts={ffn.routed.n_experts}: {LFM3}'s feed-forward is one dense SwiGLU")
    return ffn.dense.d_ff or 2 * cfg.d_model


def _head_gate(sd: Tensors, mixer: str, heads: int, hd: int, layer: int) -> torch.Tensor:
    """The gate's one row per head, if every row of a head's gate is that row and the gate has no bias."""
    w = sd[mixer + "gate.weight"].view(heads, hd, -1)
    bias = sd.get(mixer + "gate.bias")
    if not torch.equal(w, w[:, :1].expand_as(w)) or (bias is not None and bias.any()):
        raise refuse(f"the output gate of layer {layer} differs within a head (or has a bias): {LFM3}'s gate is one "
                     "sigmoid per head")
    return w[:, 0]


def _reorder(out: Tensors, dst: str, order: torch.Tensor, heads: tuple[int, int]) -> None:
    """Each query and key head's dimensions (rows, biases, q/k norm gains) written under ``dst`` in ``order``."""
    for proj, n in (("q_proj", heads[0]), ("k_proj", heads[1])):
        rows = torch.cat([h * len(order) + order for h in range(n)])
        for kind in ("weight", "bias"):
            if f"{dst}{proj}.{kind}" in out:
                out[f"{dst}{proj}.{kind}"] = out[f"{dst}{proj}.{kind}"][rows]
    for norm in ("q_norm", "k_norm"):
        out[f"{dst}{norm}.weight"] = out[f"{dst}{norm}.weight"][order]
