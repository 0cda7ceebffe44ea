"""Mamba-2 (``Mamba2ForCausalLM``): each layer is ``x + mixer(norm(x))``, exactly amer's M block, so
L layers become the pattern ``M*L``."""

from __future__ import annotations

from amer.config import ModelConfig
from amer.interop.common import Converted, converter, mamba_options, mamba_weights, shared_options
from amer.interop.llama import _embeddings
from amer.interop.source import Source

__all__ = ["convert_mamba2"]


@converter("Mamba2ForCausalLM")
def convert_mamba2(src: Source) -> Converted:
    c = src.config
    src.require("rms_norm", (True,), True, "amer's Mamba-2 gates into an RMSNorm")
    src.require("norm_before_gate", (False,), False, "amer gates before the norm")
    L = int(c["num_hidden_layers"])
    shared = shared_options(src, eps_key="layer_norm_epsilon")
    shared["max_seq_len"] = int(c.get("max_position_embeddings") or 1 << 20)  # no positional limit of its own
    cfg = ModelConfig(pattern=f"(M)*{L}", **shared, mamba=mamba_options(src))
    state = _embeddings(src, cfg, embed="backbone.embeddings.weight", norm="backbone.norm_f.weight")
    for i in range(L):
        pre = f"backbone.layers.{i}."
        state[f"blocks.{i}.norm.weight"] = src.get(pre + "norm.weight")
        mamba_weights(src, pre + "mixer.", i, state)
    return Converted(cfg, state)
