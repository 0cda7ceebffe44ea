"""What every source family's converter shares: the registry of importable classes and the weight maps
of the blocks the ecosystem agrees on (attention projections, gated feed-forwards, experts, Mamba-2).

A converter reads a :class:`~amer.interop.source.Source` and returns a :class:`Converted`: the amer
:class:`~amer.config.ModelConfig` the source's options translate to (every difference is a family or
model option, never a special case here) and a state dict in amer's parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from amer.config import ModelConfig
from amer.interop.defaults import MLP_BIAS, NEVER_TIED, NO_ATTENTION_BIAS
from amer.interop.source import Source, unsupported

__all__ = ["Converted", "CONVERTERS", "converter", "layer_letters", "attention_weights", "attention_options",
           "dense_mlp_weights", "mlp_bias", "experts_weights", "mamba_weights", "tied_embeddings", "mamba_options",
           "shared_options", "MAMBA2_KEYS", "BAMBA_KEYS", "NEMOTRON_H_KEYS"]


class Converted(NamedTuple):
    config: ModelConfig
    state: dict[str, Tensor]


CONVERTERS: dict[str, Callable[[Source], Converted]] = {}
EMBED_KEYS = ("model.embed_tokens.weight", "backbone.embeddings.weight")  # where the classes keep the embedding


def converter(*archs: str) -> Callable[[Callable[[Source], Converted]], Callable[[Source], Converted]]:
    """Register a converter for the transformers classes ``archs``."""
    def wrap(fn: Callable[[Source], Converted]) -> Callable[[Source], Converted]:
        for a in archs:
            CONVERTERS[a] = fn
        return fn
    return wrap


def layer_letters(src: Source, types: Any, kinds: dict[str, str]) -> list[str]:
    """``types`` (the config's ``layer_types``, or the class's default for it) as one amer letter per layer by
    ``kinds`` (layer type -> letter); anything else, or a list of another length, is refused in one line."""
    n_layers = int(src.config["num_hidden_layers"])
    if not isinstance(types, list) or len(types) != n_layers or any(t not in kinds for t in types):
        raise unsupported(src.arch, f"layer_types must list {' / '.join(kinds)} for each of the {n_layers} layers "
                          f"(amer maps {', '.join(f'{k} -> {v}' for k, v in kinds.items())}), got {types!r}")
    return [kinds[t] for t in types]


def shared_options(src: Source, *, eps_key: str = "rms_norm_eps") -> dict[str, Any]:
    """ModelConfig's shared fields from the source config."""
    c = src.config
    return {"d_model": int(c["hidden_size"]), "vocab_size": int(c["vocab_size"]),
            "max_seq_len": int(c.get("max_position_embeddings") or 4096),
            "tie_embeddings": tied_embeddings(src),
            "norm_eps": float(c.get(eps_key, 1e-6))}


def tied_embeddings(src: Source) -> bool:
    """Whether the LM head is the embedding, as transformers decides on load: never for the classes that do not tie;
    otherwise as the config says (LFM2's legacy ``tie_embedding`` first), and where it says nothing, when the folder
    stores no head. A stored head that differs from the embedding is used as it is, whatever the config says."""
    if src.arch in NEVER_TIED:
        return False
    tie = src.config.get("tie_word_embeddings")
    if src.arch in ("Lfm2ForCausalLM", "Lfm2MoeForCausalLM"):
        tie = src.config.get("tie_embedding", tie)
    if tie is None:
        return not src.has("lm_head.weight")
    if tie and src.has("lm_head.weight"):
        embed = next((k for k in EMBED_KEYS if src.has(k)), None)
        if embed is not None and (src.shape("lm_head.weight") != src.shape(embed)
                                  or not torch.equal(src.get("lm_head.weight"), src.get(embed))):
            return False
    return bool(tie)


def attention_options(src: Source, *, window: int | None = None) -> dict[str, Any]:
    """The A family's options for a Llama-style self-attention."""
    c = src.config
    theta, fraction, scaling = src.rope()
    n_heads = int(c["num_attention_heads"])
    head_dim = c.get("head_dim") or c.get("attention_head_dim") or int(c["hidden_size"]) // n_heads
    bias = bool(c.get("attention_bias", False)) and src.arch not in NO_ATTENTION_BIAS
    return {"n_heads": n_heads, "n_kv_heads": int(c.get("num_key_value_heads") or n_heads), "head_dim": int(head_dim),
            "rope_theta": theta, "rope_fraction": fraction, "qkv_bias": bias, "out_bias": bias, "window": window,
            **scaling}


def attention_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], *, qk_norm: bool = False,
                      out_name: str = "o_proj", norm_names: tuple[str, str] = ("q_norm", "k_norm")) -> None:
    """q/k/v/o projections (and their biases, q/k norms) of ``pre`` into block ``blk``'s A mixer; a fused
    ``qkv_proj`` (Phi-3) is taken whole. ``out_name`` / ``norm_names``: the output projection's and the q/k norms'
    names in the source (LFM2: ``out_proj``, ``q_layernorm`` / ``k_layernorm``)."""
    out = f"blocks.{blk}.mixer."
    if src.has(f"{pre}qkv_proj.weight"):
        state[out + "qkv.weight"] = src.get(f"{pre}qkv_proj.weight")
        fused_bias = src.get(f"{pre}qkv_proj.bias", optional=True)
        if fused_bias is not None:
            state[out + "qkv.bias"] = fused_bias
    else:
        state[out + "qkv.weight"] = torch.cat([src.get(f"{pre}{n}_proj.weight") for n in "qkv"])
        biases = [src.get(f"{pre}{n}_proj.bias", optional=True) for n in "qkv"]
        if any(b is not None for b in biases):
            state[out + "qkv.bias"] = torch.cat([b if b is not None else torch.zeros(w.shape[0]) for b, w in
                                                 zip(biases, (src.get(f"{pre}{n}_proj.weight") for n in "qkv"))])
    state[out + "out_proj.weight"] = src.get(f"{pre}{out_name}.weight")
    ob = src.get(f"{pre}{out_name}.bias", optional=True)
    if ob is not None:
        state[out + "out_proj.bias"] = ob
    if qk_norm:
        state[out + "q_norm.weight"] = src.get(f"{pre}{norm_names[0]}.weight")
        state[out + "k_norm.weight"] = src.get(f"{pre}{norm_names[1]}.weight")


def mlp_bias(src: Source) -> bool:
    """Whether the source's dense MLP has biases: ``mlp_bias`` in the classes that read it (:data:`MLP_BIAS`)."""
    return src.arch in MLP_BIAS and bool(src.config.get("mlp_bias", False))


def dense_mlp_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], *, gated: bool = True,
                      names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), bias: bool = False) -> None:
    """A dense (gated) feed-forward into block ``blk``'s one-expert E mixer: w_gate_up (1, D, 2F), w_down (1, F, D),
    and with ``bias`` b_gate_up (1, 2F), b_down (1, D)."""
    gate, up, down = names
    out = f"blocks.{blk}.mixer."
    if gated and src.has(f"{pre}gate_up_proj.weight"):  # fused (Phi-3): (2F, D), the gate's rows first
        w = src.get(f"{pre}gate_up_proj.weight").T
    elif gated:
        w = torch.cat([src.get(f"{pre}{gate}.weight").T, src.get(f"{pre}{up}.weight").T], dim=1)
    else:
        w = src.get(f"{pre}{up}.weight").T
    state[out + "w_gate_up"] = w.unsqueeze(0).contiguous()
    state[out + "w_down"] = src.get(f"{pre}{down}.weight").T.unsqueeze(0).contiguous()
    if bias:
        b = [src.get(f"{pre}{n}.bias") for n in ((gate, up) if gated else (up,))]
        state[out + "b_gate_up"] = torch.cat(b).unsqueeze(0)
        state[out + "b_down"] = src.get(f"{pre}{down}.bias").unsqueeze(0)


def experts_weights(src: Source, pre: str, blk: int, n_experts: int, state: dict[str, Tensor]) -> None:
    """Routed experts (Mixtral's w1 gate, w3 up, w2 down per expert, or the fused ``experts.gate_up_proj``) and
    the router of ``pre`` into block ``blk``'s E mixer."""
    out = f"blocks.{blk}.mixer."
    state[out + "router.weight"] = src.get(f"{pre}gate.weight")
    if src.has(f"{pre}experts.gate_up_proj"):  # fused layout: (E, 2F, D) gate then up, (E, D, F)
        state[out + "w_gate_up"] = src.get(f"{pre}experts.gate_up_proj").transpose(1, 2).contiguous()
        state[out + "w_down"] = src.get(f"{pre}experts.down_proj").transpose(1, 2).contiguous()
        return
    gu, dn = [], []
    for e in range(n_experts):
        ex = f"{pre}experts.{e}."
        gu.append(torch.cat([src.get(ex + "w1.weight").T, src.get(ex + "w3.weight").T], dim=1))
        dn.append(src.get(ex + "w2.weight").T)
    state[out + "w_gate_up"] = torch.stack(gu).contiguous()
    state[out + "w_down"] = torch.stack(dn).contiguous()


# config keys of a Mamba-2 mixer: Mamba2ForCausalLM's, and the hybrids' (Bamba, Granite-4.0-H, Nemotron-H)
MAMBA2_KEYS = {"d_state": "state_size", "d_conv": "conv_kernel", "expand": "expand", "head_dim": "head_dim",
               "n_heads": "num_heads", "n_groups": "n_groups", "chunk_size": "chunk_size", "bias": "use_bias",
               "conv_bias": "use_conv_bias", "act": "hidden_act"}
BAMBA_KEYS = {"d_state": "mamba_d_state", "d_conv": "mamba_d_conv", "expand": "mamba_expand",
              "head_dim": "mamba_d_head",
              "n_heads": "mamba_n_heads", "n_groups": "mamba_n_groups", "chunk_size": "mamba_chunk_size",
              "bias": "mamba_proj_bias", "conv_bias": "mamba_conv_bias", "act": "mamba_hidden_act"}
# (Nemotron-H's Mamba projections take their biases from use_bias: its mamba_proj_bias is never read)
NEMOTRON_H_KEYS = {**MAMBA2_KEYS, "head_dim": "mamba_head_dim", "n_heads": "mamba_num_heads",
                   "d_state": "ssm_state_size", "act": "mamba_hidden_act"}


def mamba_options(src: Source, keys: dict[str, str] = MAMBA2_KEYS) -> dict[str, Any]:
    """The M family's options from a Mamba-2 mixer's config (``keys``: where each setting lives). Nemotron-H's
    inner width is heads x head_dim whatever ``expand`` says (``mamba.d_inner`` where it is no multiple of the
    model width); the other classes' is ``expand`` x hidden_size."""
    c = src.config
    d = int(c["hidden_size"])
    expand = c.get(keys["expand"], 2)
    n_heads, head_dim = int(c[keys["n_heads"]]), c[keys["head_dim"]]
    head_dim = int(expand * d) // n_heads if head_dim == "auto" else int(head_dim)  # Bamba's, Granite-4.0-H's
    d_inner = n_heads * head_dim
    own_width: dict[str, Any] = {}
    if src.arch == "NemotronHForCausalLM":
        if d_inner % d:
            own_width = {"d_inner": d_inner}
    elif int(expand * d) != d_inner:
        raise unsupported(src.arch, f"Mamba heads x head_dim ({n_heads} x {head_dim}) differ from expand x "
                          f"hidden_size ({expand} x {d})")
    elif d_inner % d:
        raise unsupported(src.arch, f"Mamba inner width {d_inner} is not a whole multiple of hidden_size {d} "
                          "(amer's mamba.expand is an integer)")
    if not src.time_step_limit_is_open():
        raise unsupported(src.arch, f"time_step_limit={c.get('time_step_limit')!r} (amer's Mamba-2 does not clamp "
                          "the time step; supported: (0, inf))")
    src.require(keys["act"], ("silu",), "silu", "amer's Mamba-2 uses silu")
    return {"d_state": int(c[keys["d_state"]]), "d_conv": int(c[keys["d_conv"]]), "expand": max(1, d_inner // d),
            "head_dim": head_dim, "n_groups": int(c.get(keys["n_groups"], 1)),
            "chunk_size": int(c.get(keys["chunk_size"], 256)), "bias": bool(c.get(keys["bias"], False)),
            **own_width}


def mamba_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], *, norm: bool = True) -> None:
    """A transformers Mamba-2 mixer (``pre`` ends in ``mixer.``) into block ``blk``'s M mixer (``norm`` False: one
    without an output norm, ``mamba.norm = "none"``)."""
    out = f"blocks.{blk}.mixer."
    state[out + "in_proj.weight"] = src.get(pre + "in_proj.weight")
    conv = src.get(pre + "conv1d.weight")  # (C, 1, K)
    state[out + "conv_weight"] = conv.squeeze(1)
    cb = src.get(pre + "conv1d.bias", optional=True)
    state[out + "conv_bias"] = cb if cb is not None else torch.zeros(conv.shape[0])
    for name in ("dt_bias", "A_log", "D"):
        state[out + name] = src.get(pre + name)
    if norm:
        state[out + "norm_weight"] = src.get(pre + "norm.weight")
    state[out + "out_proj.weight"] = src.get(pre + "out_proj.weight")
    for lin in ("in_proj", "out_proj"):
        b = src.get(f"{pre}{lin}.bias", optional=True)
        if b is not None:
            state[f"{out}{lin}.bias"] = b
