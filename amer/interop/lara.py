"""Lara-4-Mini (``LaraMiniForCausalLM``): Qwen3.5's gated DeltaNet layers beside sliding-window attention with RoPE
and global attention without position encoding, every layer followed by routed experts and an ungated shared expert.

A layer is ``x + mixer(input_layernorm(x))`` then ``x + moe(post_attention_layernorm(x))``: ``G``
(``linear_attention``), ``A.swa`` (``sliding_attention``: the variant holds the window and the RoPE) or ``A``
(``full_attention``: ``attention.rope_fraction 0``), then ``E``. Beside Qwen3-Next it differs in options: plain norm
gains (``norm_offset 0``), per-head q/k norms and no output gate in the attention, a shared expert added without a
gate, a softmax router whose top-k is renormalised when ``norm_topk_prob`` says. The published checkpoints fuse the
DeltaNet's input projections into one ``in_proj`` whose rows ``[q; k; v; z; b; a]`` are amer's and name its gated
norm ``out_norm`` (transformers splits and renames them in memory); either form is read.
"""

from __future__ import annotations

from typing import Any

from amer.config import ModelConfig
from amer.interop.common import Converted, attention_options, attention_weights, converter, shared_options
from amer.interop.llama import _embeddings
from amer.interop.moe import compact_pattern, ffn_weights, routed_weights, router_options
from amer.interop.qwen_next import deltanet_options, qwen3_5_deltanet_weights
from amer.interop.source import Source, unsupported

__all__ = ["convert_lara_mini"]

_MIXERS = {"linear_attention": "G", "sliding_attention": "A.swa", "full_attention": "A"}
_PERIOD = ["linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention"]


@converter("LaraMiniForCausalLM")
def convert_lara_mini(src: Source) -> Converted:
    c = src.config
    L = int(c["num_hidden_layers"])
    types = c.get("layer_types") or [_PERIOD[i % len(_PERIOD)] for i in range(L)]
    if not isinstance(types, list) or len(types) != L or set(types) - set(_MIXERS):
        raise unsupported(src.arch, f"layer_types must list {' / '.join(_MIXERS)} per layer ({L}), got {types!r}")
    attn: dict[str, Any] = {**attention_options(src), "qk_norm": True, "rope_fraction": 0.0}
    if "sliding_attention" in types:
        attn["variants"] = {"swa": {"window": int(c["sliding_window"]), "rope_fraction": 1.0}}
    moe = router_options(src, d_ff="moe_intermediate_size", renormalize=bool(c.get("norm_topk_prob", True)),
                         shared_expert=True, d_ff_shared=int(c["shared_expert_intermediate_size"]))
    blocks = [b for t in types for b in (_MIXERS[t], "E")]
    cfg = ModelConfig(pattern=compact_pattern(blocks), **shared_options(src), attention=attn,
                      deltanet=deltanet_options(src), moe=moe)
    state = _embeddings(src, cfg)
    for i, kind in enumerate(types):
        pre, blk = f"model.layers.{i}.", 2 * i
        state[f"blocks.{blk}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        if kind == "linear_attention":
            qwen3_5_deltanet_weights(src, pre + "linear_attn.", blk, state)
        else:
            attention_weights(src, pre + "self_attn.", blk, state, qk_norm=True)
        state[f"blocks.{blk + 1}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        mlp = pre + "mlp."
        state[f"blocks.{blk + 1}.mixer.router.weight"] = src.get(mlp + "gate.weight")
        routed_weights(src, mlp + "experts.", blk + 1, cfg.moe.n_experts, state)
        ffn_weights(src, mlp + "shared_expert.", blk + 1, state, into="shared.")
    return Converted(cfg, state)
