"""State-space models without attention: Mamba-2 (``Mamba2ForCausalLM``), Mamba-1 (``MambaForCausalLM``) and
Falcon-Mamba (``FalconMambaForCausalLM``). Each layer is ``x + mixer(norm(x))``, exactly one amer block, so L
layers become the pattern ``M*L`` (Mamba-2) or ``S*L`` (Mamba-1, Falcon-Mamba: the S family with its dt/B/C
norms off, or weightless for Falcon-Mamba, ``mamba1.dt_bc_norm``)."""

from __future__ import annotations

import math

import torch

from amer.config import ModelConfig
from amer.interop.common import Converted, converter, mamba_options, mamba_weights, shared_options
from amer.interop.llama import _embeddings
from amer.interop.source import Source, unsupported

__all__ = ["convert_mamba2", "convert_mamba1", "mamba1_options", "mamba1_weights"]


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


def mamba1_options(src: Source) -> dict[str, object]:
    """The S family's options from a Mamba-1 mixer's config (MambaConfig / FalconMambaConfig keys)."""
    c = src.config
    d = int(c["hidden_size"])
    expand = c.get("expand", 2)
    inner = int(c.get("intermediate_size") or expand * d)
    if inner % d:
        raise unsupported(src.arch, f"Mamba inner width {inner} is not a whole multiple of hidden_size {d} "
                          "(amer's mamba1.expand is an integer)")
    src.require("hidden_act", ("silu",), "silu", "amer's Mamba-1 applies silu after its convolution")
    rank = c.get("time_step_rank", "auto")
    rank = math.ceil(d / 16) if rank == "auto" else int(rank)
    return {"d_state": int(c["state_size"]), "d_conv": int(c.get("conv_kernel", 4)), "expand": inner // d,
            "dt_rank": rank, "conv_bias": bool(c.get("use_conv_bias", True)), "bias": bool(c.get("use_bias", False))}


def mamba1_weights(src: Source, pre: str, blk: int, state: dict[str, torch.Tensor], *, norms: bool = False) -> None:
    """A transformers Mamba-1 mixer (``pre`` ends in ``mixer.`` or ``mamba.``) into block ``blk``'s S mixer; ``norms``:
    Jamba's weighted dt/B/C norms."""
    out = f"blocks.{blk}.mixer."
    state[out + "conv_weight"] = src.get(pre + "conv1d.weight").squeeze(1)  # (E, 1, K) -> (E, K)
    cb = src.get(pre + "conv1d.bias", optional=True)
    if cb is not None:
        state[out + "conv_bias"] = cb
    for name in ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
                 "out_proj.weight"):
        state[out + name] = src.get(pre + name)
    for lin in ("in_proj", "out_proj"):
        b = src.get(f"{pre}{lin}.bias", optional=True)
        if b is not None:
            state[f"{out}{lin}.bias"] = b
    if norms:
        for n in ("dt", "b", "c"):
            state[f"{out}{n}_norm.weight"] = src.get(f"{pre}{n}_layernorm.weight")


@converter("MambaForCausalLM", "FalconMambaForCausalLM")
def convert_mamba1(src: Source) -> Converted:
    c = src.config
    L = int(c["num_hidden_layers"])
    shared = shared_options(src, eps_key="layer_norm_epsilon")
    shared["max_seq_len"] = int(c.get("max_position_embeddings") or 1 << 20)  # no positional limit of its own
    opts = mamba1_options(src)
    if src.arch == "FalconMambaForCausalLM":  # weightless RMSNorms on dt (before dt_proj), B and C
        opts.update(dt_bc_norm="weightless", dt_bc_norm_eps=float(c.get("mixer_rms_eps", 1e-6)))
    cfg = ModelConfig(pattern=f"(S)*{L}", **shared, mamba1=opts)
    # mamba_ssm's own checkpoints name the embedding in the singular (transformers renames it on load)
    embed = "backbone.embeddings.weight" if src.has("backbone.embeddings.weight") else "backbone.embedding.weight"
    state = _embeddings(src, cfg, embed=embed, norm="backbone.norm_f.weight")
    for i in range(L):
        pre = f"backbone.layers.{i}."
        state[f"blocks.{i}.norm.weight"] = src.get(pre + "norm.weight")
        mamba1_weights(src, pre + "mixer.", i, state)
    return Converted(cfg, state)
