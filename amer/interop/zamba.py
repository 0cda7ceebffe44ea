"""Zamba (Glorioso et al. 2024, arXiv 2405.16712): a multi-head Mamba-1 stack with one shared transformer block.

Zamba's ``layers_block_type`` lists Mamba layers, ``x + mamba(norm(x))`` with a multi-head Mamba-1 (the S family with
``n_heads``: each head its own x_proj, dt_proj, A and D), and hybrid layers, the H family with ``companion =
"mamba1"``: the one shared attention + MLP on concat(stream, embedding), a per-layer linear, then the layer's own
Mamba. Every hybrid layer uses the same transformer (share name ``z0``), stored under the first hybrid layer; a
checkpoint that stores a transformer under every hybrid layer (written untied) gives each hybrid layer its own.

Zamba's in_proj interleaves the two halves (row ``2 e`` feeds channel ``e`` of the scan, row ``2 e + 1`` its gate),
amer's stacks them, so the rows are regrouped; the per-head tensors are the S mixer's stacked along the channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.config import ModelConfig
from amer.interop.common import Converted, converter, shared_options
from amer.interop.llama import _embeddings
from amer.interop.source import Source, unsupported

__all__ = ["convert_zamba", "zamba_options"]

_MAMBA_TYPES = ("linear_attention", "mamba", "m")
_HYBRID_TYPES = ("hybrid", "g")
_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}


def zamba_options(src: Source) -> dict[str, Any]:
    """The model config's keyword arguments for a Zamba config, the pattern included."""
    c = src.config
    src.require("hidden_mamba_act", ("silu",), "silu")
    src.require("hidden_act", tuple(_ACTS), "gelu")
    d = int(c["hidden_size"])
    heads = int(c["num_attention_heads"])
    if int(c.get("attention_hidden_size") or 2 * d) != 2 * d:
        raise unsupported(src.arch, f"attention_hidden_size={c['attention_hidden_size']} (the shared attention reads "
                          f"concat(stream, embedding): supported 2 * hidden_size = {2 * d})")
    head_dim = int(c.get("attention_head_dim") or 2 * d // heads)
    if head_dim * heads != 2 * d:
        raise unsupported(src.arch, f"attention_head_dim={head_dim} (amer's zamba heads split 2 * hidden_size: "
                          f"supported {2 * d // heads})")
    zamba = {"n_heads": heads, "n_kv_heads": int(c.get("num_key_value_heads") or heads),
             "d_ff": int(c.get("intermediate_size") or 4 * d), "act": _ACTS[c.get("hidden_act", "gelu")],
             "companion": "mamba1"}
    rank = c.get("mamba_dt_rank", "auto")
    mamba1 = {"d_state": int(c.get("mamba_d_state", 16)), "d_conv": int(c.get("mamba_d_conv", 4)),
              "expand": int(c.get("mamba_expand", 2)), "dt_rank": None if rank == "auto" else int(rank),
              "conv_bias": bool(c.get("mamba_conv_bias", True)), "bias": bool(c.get("mamba_proj_bias", False)),
              "n_heads": int(c.get("n_mamba_heads", 2))}
    return {"pattern": " ".join(_letters(src)), **shared_options(src), "zamba": zamba, "mamba1": mamba1}


def _letters(src: Source) -> list[str]:
    """One pattern token per layer: ``S``, or ``H:z0`` for a hybrid layer (``H`` when the transformers differ)."""
    types = src.config.get("layers_block_type") or src.config.get("layer_types")
    if not types:
        raise unsupported(src.arch, "no layers_block_type in the config")
    hybrid = [i for i, t in enumerate(types) if str(t).lower() in _HYBRID_TYPES]
    # transformers ties every hybrid layer's transformer to the first's and saves it once, unless the checkpoint was
    # written untied (tie_word_embeddings false unties them along with the head); then each layer has its own
    separate = any(src.has(f"model.layers.{i}.shared_transf.input_layernorm.weight") for i in hybrid[1:])
    out = []
    for i, t in enumerate(types):
        if str(t).lower() in _MAMBA_TYPES:
            out.append("S")
        elif i in hybrid:
            out.append("H" if separate else "H:z0")
        else:
            raise unsupported(src.arch, f"layer type {t!r} (supported: mamba / linear_attention, hybrid)")
    return out


def _mamba(src: Source, pre: str, out: str, state: dict[str, Tensor]) -> None:
    """A Zamba multi-head Mamba-1 mixer (``pre`` ends in ``mamba.``) into the amer S mixer at ``out``."""
    for name in ("weight", "bias"):
        w = src.get(pre + f"in_proj.{name}", optional=name == "bias")
        if w is not None:  # rows interleave (scan input, gate) per channel; amer's halves are stacked
            state[out + f"in_proj.{name}"] = torch.cat([w[0::2], w[1::2]])
    state[out + "conv_weight"] = src.get(pre + "conv1d.weight").squeeze(1)  # (E, 1, K) -> (E, K)
    cb = src.get(pre + "conv1d.bias", optional=True)
    if cb is not None:
        state[out + "conv_bias"] = cb
    x_proj = src.get(pre + "x_proj_weight")  # (heads, R + 2N, E / heads): the heads' maps stacked along the rows
    state[out + "x_proj.weight"] = x_proj.reshape(-1, x_proj.shape[-1])
    dt = src.get(pre + "dt_proj_weight")  # (heads, E / heads, R)
    state[out + "dt_proj.weight"] = dt.reshape(-1, dt.shape[-1])
    state[out + "dt_proj.bias"] = src.get(pre + "dt_proj_bias").reshape(-1)
    A_log = src.get(pre + "A_log")
    state[out + "A_log"] = A_log.reshape(-1, A_log.shape[-1])
    state[out + "D"] = src.get(pre + "D").reshape(-1)
    state[out + "out_proj.weight"] = src.get(pre + "out_proj.weight")
    ob = src.get(pre + "out_proj.bias", optional=True)
    if ob is not None:
        state[out + "out_proj.bias"] = ob


@converter("ZambaForCausalLM")
def convert_zamba(src: Source) -> Converted:
    cfg = ModelConfig(**zamba_options(src))
    state = _embeddings(src, cfg, norm="model.final_layernorm.weight")
    home: int | None = None  # the layer the shared transformer is stored under
    for i, layer in enumerate(cfg.parsed.layers):
        pre, blk = f"model.layers.{i}.", f"blocks.{i}."
        if layer.family == "S":
            state[blk + "norm.weight"] = src.get(pre + "input_layernorm.weight")
            _mamba(src, pre + "mamba.", blk + "mixer.", state)
            continue
        st = pre + "shared_transf."
        if layer.share is None or home is None:
            home = i
            sh = blk + "mixer." if layer.share is None else f"shared.{layer.share}.mixer."
            state[sh + "in_norm.weight"] = src.get(st + "input_layernorm.weight")
            state[sh + "ff_norm.weight"] = src.get(st + "pre_ff_layernorm.weight")
            state[sh + "qkv.weight"] = torch.cat([src.get(st + f"self_attn.{p}_proj.weight") for p in "qkv"])
            state[sh + "out_proj.weight"] = src.get(st + "self_attn.o_proj.weight")
            state[sh + "gate_up.weight"] = torch.cat([src.get(st + f"feed_forward.{p}_proj.weight")
                                                      for p in ("gate", "up")])
            state[sh + "down.weight"] = src.get(st + "feed_forward.down_proj.weight")
        parts = blk + ("mixer." if layer.share is None else "parts.")
        state[parts + "linear.weight"] = src.get(pre + "linear.weight")
        state[parts + "mamba_norm.weight"] = src.get(pre + "mamba_decoder.input_layernorm.weight")
        _mamba(src, pre + "mamba_decoder.mamba.", parts + "mamba.", state)
    return Converted(cfg, state)
