"""Qwen3-Next (Qwen team 2025): gated DeltaNet and gated-attention layers, each followed by a routed feed-forward
with a gated shared expert (dense in ``mlp_only_layers`` and off the ``decoder_sparse_step`` grid).

A layer is ``x + mixer(input_layernorm(x))`` then ``x + ffn(post_attention_layernorm(x))``: two amer blocks, ``G``
(``linear_attention``) or ``A`` (``full_attention``), then ``E`` or ``E.dense``. What Qwen3-Next does beyond the
plain blocks is options: ``(1 + w)`` RMSNorm gains everywhere but in the DeltaNet's gated output norm
(``norm_offset = 1``; the G family's own norm has no offset), the attention's sigmoid output gate
(``attention.output_gate``), partial RoPE (``attention.rope_fraction``, 0.25 by default), per-head q/k norms, and
the router of ``docs/moe.md`` (shared expert with a sigmoid gate). ``q_proj`` holds each head's query and gate
rows in turn, ``(H, 2, hd, D)``; the DeltaNet's ``in_proj_qkvz`` / ``in_proj_ba`` are grouped by key head (see
:mod:`amer.blocks.gated_deltanet`). The multi-token-prediction head (``mtp.*``) is not part of the causal LM and
is left out, as transformers leaves it out.

Qwen3.5 (``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM``: the text models) has the same layers, with the
DeltaNet's projections stored apart in amer's order, a dense SwiGLU after every mixer (every layer routed in the
MoE model, whose router always renormalises its top-k), and multimodal RoPE whose three position axes are the
token's position for text, which makes it the plain partial RoPE above.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.config import ModelConfig
from amer.interop.common import Converted, attention_options, converter, shared_options
from amer.interop.llama import _embeddings
from amer.interop.moe import compact_pattern, ffn_table, ffn_weights, routed_weights, router_options, sparse_layers
from amer.interop.source import Source, unsupported

__all__ = ["convert_qwen3_next", "deltanet_options", "deltanet_weights", "gated_attention_weights", "QWEN3_5",
           "qwen3_5_deltanet_weights"]

QWEN3_5 = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")


def deltanet_options(src: Source) -> dict[str, Any]:
    """The G family's table from Qwen3-Next's ``linear_*`` keys."""
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the DeltaNet's conv is followed by silu and the MLPs are SwiGLU")
    return {"n_k_heads": int(c["linear_num_key_heads"]), "n_v_heads": int(c["linear_num_value_heads"]),
            "head_k_dim": int(c["linear_key_head_dim"]), "head_v_dim": int(c["linear_value_head_dim"]),
            "d_conv": int(c.get("linear_conv_kernel_dim", 4)), "norm_eps": float(c.get("rms_norm_eps", 1e-6))}


def deltanet_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], g: dict[str, Any]) -> None:
    """A ``Qwen3NextGatedDeltaNet`` into block ``blk``'s G mixer: the key-head-grouped projections regrouped into
    amer's ``in_proj`` rows ``[q; k; v; z; b; a]``."""
    Hk, H, dk, dv = g["n_k_heads"], g["n_v_heads"], g["head_k_dim"], g["head_v_dim"]
    R = H // Hk
    qkvz = src.get(pre + "in_proj_qkvz.weight")
    qkvz = qkvz.view(Hk, 2 * dk + 2 * R * dv, -1).split([dk, dk, R * dv, R * dv], dim=1)
    ba = src.get(pre + "in_proj_ba.weight").view(Hk, 2 * R, -1).split([R, R], dim=1)
    out = f"blocks.{blk}.mixer."
    state[out + "in_proj.weight"] = torch.cat([p.flatten(0, 1) for p in (*qkvz, *ba)])
    _deltanet_rest(src, pre, out, state)


def qwen3_5_deltanet_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], g: Any = None) -> None:
    """A ``Qwen3_5GatedDeltaNet`` into block ``blk``'s G mixer: its projections are apart and in amer's order
    (``in_proj_qkv`` holds ``[q; k; v]``, then ``z``, ``b``, ``a``), so ``in_proj`` is their concatenation; a
    checkpoint that stores them fused (Lara-4-Mini's ``in_proj``, its gated norm as ``out_norm``) holds that
    already."""
    out = f"blocks.{blk}.mixer."
    if src.has(pre + "in_proj.weight"):
        state[out + "in_proj.weight"] = src.get(pre + "in_proj.weight")
    else:
        parts = ("qkv", "z", "b", "a")
        state[out + "in_proj.weight"] = torch.cat([src.get(f"{pre}in_proj_{p}.weight") for p in parts])
    _deltanet_rest(src, pre, out, state)


def _deltanet_rest(src: Source, pre: str, out: str, state: dict[str, Tensor]) -> None:
    state[out + "conv_weight"] = src.get(pre + "conv1d.weight").squeeze(1)
    for name in ("A_log", "dt_bias", "out_proj.weight"):
        state[out + name] = src.get(pre + name)
    norm = "out_norm.weight" if src.has(pre + "out_norm.weight") else "norm.weight"
    state[out + "norm_weight"] = src.get(pre + norm)


def gated_attention_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], heads: int,
                            head_dim: int) -> None:
    """A ``Qwen3NextAttention`` into block ``blk``'s A mixer: ``q_proj`` rows (H, [query, gate], hd) split into the
    query part of ``qkv`` and the output gate ``gate``."""
    out = f"blocks.{blk}.mixer."

    def split(t: Tensor) -> tuple[Tensor, Tensor]:
        q, gate = t.view(heads, 2, head_dim, *t.shape[1:]).unbind(1)
        return q.flatten(0, 1), gate.flatten(0, 1)

    q, gate = split(src.get(pre + "q_proj.weight"))
    state[out + "qkv.weight"] = torch.cat([q, src.get(pre + "k_proj.weight"), src.get(pre + "v_proj.weight")])
    state[out + "gate.weight"] = gate
    if src.has(pre + "q_proj.bias"):
        qb, gb = split(src.get(pre + "q_proj.bias"))
        state[out + "qkv.bias"] = torch.cat([qb, src.get(pre + "k_proj.bias"), src.get(pre + "v_proj.bias")])
        state[out + "gate.bias"] = gb
        state[out + "out_proj.bias"] = src.get(pre + "o_proj.bias")
    state[out + "out_proj.weight"] = src.get(pre + "o_proj.weight")
    for n in "qk":
        state[f"{out}{n}_norm.weight"] = src.get(f"{pre}{n}_norm.weight")


@converter("Qwen3NextForCausalLM", *QWEN3_5)
def convert_qwen3_next(src: Source) -> Converted:
    c = src.config
    qwen3_5 = src.arch in QWEN3_5
    L = int(c["num_hidden_layers"])
    types = c.get("layer_types")
    if types is None:  # as the class derives them: full attention on every full_attention_interval-th layer
        every = int(c.get("full_attention_interval", 4))
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(L)]
    if not isinstance(types, list) or len(types) != L or set(types) - {"linear_attention", "full_attention"}:
        raise unsupported(src.arch, f"layer_types must list linear_attention / full_attention per layer ({L}), got "
                          f"{types!r}")
    mixers = ["G" if t == "linear_attention" else "A" for t in types]
    g = deltanet_options(src)
    bias = bool(c.get("attention_bias", False))
    attn = {**attention_options(src), "qk_norm": True, "output_gate": True, "qkv_bias": bias, "out_bias": bias}
    # Qwen3.5 routes every layer (MoE) or none, and its router always renormalises
    sparse = [src.arch == "Qwen3_5MoeForCausalLM"] * L if qwen3_5 else sparse_layers(src, L)
    routed = None
    if any(sparse):
        renormalize = True if qwen3_5 else bool(c.get("norm_topk_prob", True))
        routed = router_options(src, d_ff="moe_intermediate_size", renormalize=renormalize, shared_expert=True,
                                d_ff_shared=int(c["shared_expert_intermediate_size"]), shared_expert_gate=True)
    dense_d_ff = c.get("intermediate_size")
    moe, ffn = ffn_table(routed, None if dense_d_ff is None else int(dense_d_ff), sparse)
    cfg = ModelConfig(pattern=compact_pattern([b for pair in zip(mixers, ffn) for b in pair]), **shared_options(src),
                      norm_offset=1.0, attention=attn, deltanet=g, moe=moe)
    state = _embeddings(src, cfg)
    src.skip("mtp.")
    a = cfg.attention
    for i, mixer in enumerate(mixers):
        pre, blk = f"model.layers.{i}.", 2 * i
        state[f"blocks.{blk}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        if mixer == "G":
            (qwen3_5_deltanet_weights if qwen3_5 else deltanet_weights)(src, pre + "linear_attn.", blk, state, g)
        else:
            gated_attention_weights(src, pre + "self_attn.", blk, state, a.n_heads, a.head_dim)
        state[f"blocks.{blk + 1}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        mlp = pre + "mlp."
        if not sparse[i]:
            ffn_weights(src, mlp, blk + 1, state)
            continue
        state[f"blocks.{blk + 1}.mixer.router.weight"] = src.get(mlp + "gate.weight")
        routed_weights(src, mlp + "experts.", blk + 1, cfg.moe.n_experts, state)
        ffn_weights(src, mlp + "shared_expert.", blk + 1, state, into="shared.")
        state[f"blocks.{blk + 1}.mixer.shared_gate.weight"] = src.get(mlp + "shared_expert_gate.weight")
    return Converted(cfg, state)
