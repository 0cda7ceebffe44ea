"""Zamba2 (Glorioso et al. 2024, arXiv 2411.15242): a Mamba-2 stack with shared transformer blocks.

Zamba2's ``layers_block_type`` lists Mamba-2 layers and hybrid layers; a hybrid layer is the H family (a shared
attention + MLP on concat(stream, embedding) whose output, through a per-use linear, is added to its Mamba-2's
input). The ``num_mem_blocks`` shared blocks take turns over the hybrid layers, so the hybrid layers' share names
cycle ``z0, z1, ..., z0, ...``. Each shared block's tensors are stored under its first use's layer, the per-use
LoRA adapters of every use of block ``b`` under that same layer (indexed by the use's rank among hybrid layers).
The export writes such models back as this class (:mod:`amer.interop.export_zamba`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.config import ModelConfig
from amer.interop.common import Converted, converter, shared_options
from amer.interop.llama import _embeddings
from amer.interop.source import Source, unsupported

__all__ = ["convert_zamba2", "zamba2_options", "NO_FLOOR"]

# the time-step floor the export writes for none (Zamba2 cannot be built with 0): the smallest normal float32
NO_FLOOR = torch.finfo(torch.float32).tiny

_MAMBA_TYPES = ("linear_attention", "mamba", "m")
_HYBRID_TYPES = ("hybrid", "g")


def zamba2_options(src: Source) -> dict[str, Any]:
    """The model config's keyword arguments for a Zamba2 config, the pattern included."""
    c = src.config
    src.require("add_bias_linear", (False,), False, "amer's zamba layer has no projection biases")
    src.require("use_long_context", (False,), False, "the long-context RoPE rescaling is not implemented")
    src.require("hidden_act", ("gelu", "gelu_pytorch_tanh", "silu"), "gelu")
    if float(c.get("rms_norm_eps", 1e-5)) != 1e-5:
        raise unsupported(src.arch, f"rms_norm_eps={c['rms_norm_eps']} (Zamba2's Mamba-2 norms use 1e-5 whatever "
                          "rms_norm_eps says, amer one eps for every norm: supported 1e-5)")
    d = int(c["hidden_size"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    if c.get("use_shared_attention_adapter") and kv != heads:
        raise unsupported(src.arch, f"use_shared_attention_adapter with num_key_value_heads {kv} != "
                          f"num_attention_heads {heads} (Zamba2's k/v adapters are 2 * hidden_size wide)")
    theta, fraction, scaling = src.rope()
    if fraction != 1 or scaling:
        raise unsupported(src.arch, "a scaled or partial RoPE (Zamba2's shared attention rotates whole heads)")
    act = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}[c.get("hidden_act", "gelu")]
    zamba = {"n_heads": heads, "n_kv_heads": kv, "d_ff": int(c.get("intermediate_size") or 4 * d), "act": act,
             "adapter_rank": int(c.get("adapter_rank", 128)),
             "attention_adapter": bool(c.get("use_shared_attention_adapter", False)),
             "rope": bool(c.get("use_mem_rope", False)), "rope_theta": theta}
    d_inner = int(c.get("mamba_expand", 2)) * d
    n_heads = int(c.get("n_mamba_heads", 8))
    mamba = {"d_state": int(c.get("mamba_d_state", 64)), "d_conv": int(c.get("mamba_d_conv", 4)),
             "expand": int(c.get("mamba_expand", 2)), "head_dim": d_inner // n_heads,
             "n_groups": int(c.get("mamba_ngroups", 1)), "chunk_size": int(c.get("chunk_size", 256)),
             "dt_clamp_min": _floor(float(c.get("time_step_min", 0.001))), "norm": "gated"}
    return {"pattern": " ".join(_letters(src)), **shared_options(src), "zamba": zamba, "mamba": mamba}


def _floor(time_step_min: float) -> float:
    """Zamba2's time-step floor as ``mamba.dt_clamp_min``: none for the export's stand-in for none."""
    return 0.0 if time_step_min <= NO_FLOOR else time_step_min


def _letters(src: Source) -> list[str]:
    """One pattern token per layer: ``M`` or ``H:z<b>``, the shared blocks taking turns over the hybrid layers; ``H``
    alone for every hybrid layer when the checkpoint stores a transformer per layer (transformers unties the shared
    blocks along with the head when ``tie_word_embeddings`` is false, so each layer then has its own) or has a block
    per hybrid layer (none is shared)."""
    types = src.config.get("layers_block_type") or src.config.get("layer_types")
    if not types:
        raise unsupported(src.arch, "no layers_block_type in the config")
    blocks = int(src.config.get("num_mem_blocks", 1))
    hybrid = [i for i, t in enumerate(types) if str(t).lower() in _HYBRID_TYPES]
    separate = len(hybrid) <= blocks or any(src.has(f"model.layers.{i}.shared_transformer.input_layernorm.weight")
                                            for i in hybrid[blocks:])
    out = []
    for i, t in enumerate(types):
        if str(t).lower() in _MAMBA_TYPES:
            out.append("M")
        elif i in hybrid:
            out.append("H" if separate else f"H:z{hybrid.index(i) % blocks}")
        else:
            raise unsupported(src.arch, f"layer type {t!r} (supported: mamba / linear_attention, hybrid)")
    return out


def _mamba(src: Source, pre: str, out: str, state: dict[str, Tensor]) -> None:
    """A Zamba2 Mamba-2 mixer (``pre`` ends in ``mamba.``) into the amer M mixer at ``out``."""
    state[out + "in_proj.weight"] = src.get(pre + "in_proj.weight")
    state[out + "conv_weight"] = src.get(pre + "conv1d.weight").squeeze(1)
    state[out + "conv_bias"] = src.get(pre + "conv1d.bias")
    for name in ("dt_bias", "A_log", "D"):
        state[out + name] = src.get(pre + name)
    state[out + "norm_weight"] = src.get(pre + "norm.weight")
    state[out + "out_proj.weight"] = src.get(pre + "out_proj.weight")


def _lora(src: Source, pre: str, out: str, state: dict[str, Tensor]) -> None:
    for i in (0, 1):
        state[f"{out}.{i}.weight"] = src.get(f"{pre}.{i}.weight")


@converter("Zamba2ForCausalLM")
def convert_zamba2(src: Source) -> Converted:
    opts = zamba2_options(src)
    cfg = ModelConfig(**opts)
    state = _embeddings(src, cfg, norm="model.final_layernorm.weight")
    first: dict[str, int] = {}  # share name -> the layer its tensors are stored under
    hybrid = 0
    for i, layer in enumerate(cfg.parsed.layers):
        pre, blk = f"model.layers.{i}.", f"blocks.{i}."
        if layer.family == "M":
            state[blk + "norm.weight"] = src.get(pre + "input_layernorm.weight")
            _mamba(src, pre + "mamba.", blk + "mixer.", state)
            continue
        home = i if layer.share is None else first.setdefault(layer.share, i)
        st = f"model.layers.{home}.shared_transformer."
        if home == i:
            sh = blk + "mixer." if layer.share is None else f"shared.{layer.share}.mixer."
            state[sh + "in_norm.weight"] = src.get(st + "input_layernorm.weight")
            state[sh + "ff_norm.weight"] = src.get(st + "pre_ff_layernorm.weight")
            state[sh + "qkv.weight"] = torch.cat([src.get(st + f"self_attn.{p}_proj.weight") for p in "qkv"])
            state[sh + "out_proj.weight"] = src.get(st + "self_attn.o_proj.weight")
            state[sh + "gate_up.weight"] = src.get(st + "feed_forward.gate_up_proj.weight")
            state[sh + "down.weight"] = src.get(st + "feed_forward.down_proj.weight")
        else:  # a writer that stores every use's tied copy: read (and so accept) them, the first use's are used
            src.skip(f"{pre}shared_transformer.")
        parts = blk + ("mixer." if layer.share is None else "parts.")
        if cfg.zamba.adapter_rank > 0:
            _lora(src, f"{st}feed_forward.gate_up_proj_adapter_list.{hybrid}", parts + "ff_adapter", state)
        if cfg.zamba.attention_adapter:
            for p in "qkv":
                _lora(src, f"{st}self_attn.linear_{p}_adapter_list.{hybrid}", f"{parts}{p}_adapter", state)
        if layer.share is None:  # a layer's own copy holds the other uses' adapters too, which it never runs
            for lists in ("feed_forward.gate_up_proj_adapter_list.", "self_attn.linear_"):
                src.skip(st + lists)
        state[parts + "linear.weight"] = src.get(pre + "linear.weight")
        state[parts + "mamba_norm.weight"] = src.get(pre + "mamba_decoder.input_layernorm.weight")
        _mamba(src, pre + "mamba_decoder.mamba.", parts + "mamba.", state)
        hybrid += 1
    return Converted(cfg, state)
