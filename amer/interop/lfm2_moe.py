"""LFM2-MoE (Liquid AI 2025, ``Lfm2MoeForCausalLM``): gated short convolutions and attention, each layer followed by a
feed-forward that is dense in the first ``num_dense_layers`` layers and routed after them.

A layer is ``x + operator(operator_norm(x))`` then ``x + feed_forward(ffn_norm(x))``: ``C`` (``conv`` in
``layer_types``) or ``A`` (``full_attention``, per-head q/k RMSNorms) then ``E.dense`` or ``E``. The router is
sigmoid top-k with a selection-only expert bias, renormalised with an epsilon of 1e-6 and scaled
(``moe.score = "sigmoid"``, ``expert_bias``, ``renormalize_eps``, ``routed_scale``; ``docs/moe.md``). The final
norm is ``embedding_norm``.
"""

from __future__ import annotations

from amer.config import ModelConfig
from amer.interop.common import Converted, attention_options, converter, shared_options
from amer.interop.lfm2 import W1W3W2, lfm2_letters, operator_weights
from amer.interop.llama import _embeddings
from amer.interop.moe import compact_pattern, ffn_table, ffn_weights, routed_weights, router_options
from amer.interop.source import Source

__all__ = ["convert_lfm2_moe"]


@converter("Lfm2MoeForCausalLM")
def convert_lfm2_moe(src: Source) -> Converted:
    c = src.config
    L = int(c["num_hidden_layers"])
    mixers = lfm2_letters(src)
    dense = int(c.get("num_dense_layers", 2))
    sparse = [i >= dense for i in range(L)]
    bias_on = bool(c.get("use_expert_bias", True))
    routed = router_options(src, d_ff="moe_intermediate_size", renormalize=bool(c.get("norm_topk_prob", True)),
                            score="sigmoid", expert_bias=bias_on, renormalize_eps=1e-6,
                            routed_scale=float(c.get("routed_scaling_factor", 1.0)))
    moe, ffn = ffn_table(routed, int(c["intermediate_size"]), sparse)
    conv_bias = bool(c.get("conv_bias", False))
    cfg = ModelConfig(pattern=compact_pattern([b for pair in zip(mixers, ffn) for b in pair]),
                      **shared_options(src, eps_key="norm_eps"), attention={**attention_options(src), "qk_norm": True},
                      shortconv={"l_cache": int(c.get("conv_L_cache", 3)), "bias": conv_bias}, moe=moe)
    state = _embeddings(src, cfg, norm="model.embedding_norm.weight")
    for i, mixer in enumerate(mixers):
        pre, blk = f"model.layers.{i}.", 2 * i
        operator_weights(src, i, mixer, conv_bias, state)
        ff = pre + "feed_forward."
        if not sparse[i]:
            ffn_weights(src, ff, blk + 1, state, names=W1W3W2)
            continue
        state[f"blocks.{blk + 1}.mixer.router.weight"] = src.get(ff + "gate.weight")
        if bias_on:
            state[f"blocks.{blk + 1}.mixer.expert_bias"] = src.get(ff + "expert_bias")
        routed_weights(src, ff + "experts.", blk + 1, cfg.moe.n_experts, state, names=W1W3W2)
    return Converted(cfg, state)
