"""OLMo 2 (Team OLMo 2024, "2 OLMo 2 Furious", arXiv 2501.00656).

Each layer is ``x + post_attn_norm(attn(x))`` then ``x + post_ffw_norm(mlp(x))``: no norm before a sub-layer, one
after it. That is two amer blocks, ``A`` then ``E``, with ``norm_placement = "post"``. OLMo 2's q/k norms span all
heads at once (an RMSNorm over the whole query and key projections): ``attention.qk_norm_scope = "projection"``.
"""

from __future__ import annotations

from amer.config import ModelConfig
from amer.interop.common import (
    Converted,
    attention_options,
    attention_weights,
    converter,
    dense_mlp_weights,
    shared_options,
)
from amer.interop.llama import _embeddings
from amer.interop.source import Source

__all__ = ["convert_olmo2"]


@converter("Olmo2ForCausalLM")
def convert_olmo2(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the E feed-forward is SwiGLU")
    L = int(c["num_hidden_layers"])
    attn = {**attention_options(src), "qk_norm": True, "qk_norm_scope": "projection"}
    cfg = ModelConfig(pattern=f"(AE)*{L}", **shared_options(src), norm_placement="post", attention=attn,
                      moe={"n_experts": 1, "d_ff": int(c["intermediate_size"])})
    state = _embeddings(src, cfg)
    for i in range(L):
        pre, a, e = f"model.layers.{i}.", 2 * i, 2 * i + 1
        attention_weights(src, pre + "self_attn.", a, state, qk_norm=True)
        state[f"blocks.{a}.post_norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        dense_mlp_weights(src, pre + "mlp.", e, state)
        state[f"blocks.{e}.post_norm.weight"] = src.get(pre + "post_feedforward_layernorm.weight")
    return Converted(cfg, state)
