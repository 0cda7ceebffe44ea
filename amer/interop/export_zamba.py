"""amer -> transformers for the shared hybrid layers (the H family): ``M`` / ``H`` layers as ``Zamba2ForCausalLM``,
``S`` / ``H`` layers with ``zamba.companion mamba1`` as ``ZambaForCausalLM``; the inverses of
:mod:`amer.interop.zamba2` and :mod:`amer.interop.zamba`.

Neither class names its sharing: it follows from the layer order and the head. Zamba2's ``num_mem_blocks``
transformers take turns over the hybrid layers (use ``j`` runs block ``j mod num_mem_blocks``) and Zamba's one
transformer serves every hybrid layer, and both tie the copies only while ``tie_word_embeddings`` holds (an untied
head unties them too). So shared blocks export when their uses take turns in that order with a tied head, unshared
``H`` layers when nothing would tie them (Zamba2: one block per hybrid layer; Zamba: an untied head, which one
hybrid layer needs too, since transformers cannot build Zamba's tie without a second); anything else is refused by
name, since the folder would load as another model. A block's tensors are written under its first use's layer,
every use's LoRA adapters in that layer's lists at the use's rank, where transformers looks for them. Zamba2
floors its Mamba-2 time step at ``time_step_min`` and cannot be built with 0; a model without a floor is written
with the smallest normal float32, which binds only where softplus(dt) is below float32's normal range (there the
time step's whole contribution is under 1e-38), and reads back as no floor.
"""

from __future__ import annotations

from typing import Any

import torch

from amer.config import ModelConfig
from amer.interop.export_parts import Tensors, Written, mamba2_out, plain, pre_norms, refuse, shared
from amer.interop.zamba2 import NO_FLOOR
from amer.pattern import LayerSpec

__all__ = ["zamba_target", "zamba_export", "ZAMBA", "ZAMBA2"]

ZAMBA, ZAMBA2 = "ZambaForCausalLM", "Zamba2ForCausalLM"
_ACTS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


def zamba_target(cfg: ModelConfig) -> str | None:
    """Zamba for models with H layers running a Mamba-1, Zamba2 for those running a Mamba-2; None without H."""
    if not any(str(layer.family) == "H" for layer in cfg.parsed.layers):
        return None
    return ZAMBA if cfg.zamba.companion == "mamba1" else ZAMBA2


def _blocks(cfg: ModelConfig, target: str) -> tuple[list[LayerSpec], int]:
    """The hybrid layers and the class's number of transformer blocks, or the refusal naming what the class's fixed
    sharing cannot express."""
    layers = cfg.parsed.layers
    ssm = "S" if target == ZAMBA else "M"
    odd = next((x for x in layers if str(x.family) not in (ssm, "H")), None)
    if odd is not None:
        raise refuse(f"{odd.key} (layer {odd.index}): {target}'s layers are {ssm} or H blocks (pattern "
                     f"{cfg.pattern!r})")
    other = next((x for x in layers if x.share is not None and str(x.family) != "H"), None)
    if other is not None:
        raise refuse(f"the shared block {other.written} (block {other.index}): {target} shares its hybrid "
                     "transformers alone")
    hybrid = [x for x in layers if str(x.family) == "H"]
    if target == ZAMBA and len(hybrid) == 1 and cfg.tie_embeddings:
        raise refuse(f"{target} with a tied head ties the other hybrid layers' transformers to the first's, and "
                     "transformers fails to build it when there is none: with one hybrid layer untie the head "
                     "(tie_embeddings false)")
    names = [x.share or f"#{x.index}" for x in hybrid]  # an unshared layer: a block of its own
    if all(names.count(n) == 1 for n in names):  # each transformer its own
        if target == ZAMBA and len(hybrid) > 1 and cfg.tie_embeddings:
            raise refuse(f"{target} with a tied head ties every hybrid layer's transformer to the first's: share "
                         "one block over the H layers (H:z0) or untie the head (tie_embeddings false)")
        return hybrid, len(hybrid)  # Zamba2: a block per use, none tied
    if not cfg.tie_embeddings:
        raise refuse(f"{target} ties its shared transformers only with a tied head (tie_embeddings true): an "
                     "untied head unties them")
    blocks = list(dict.fromkeys(names))
    shown: dict[str, str] = {}  # a block as the pattern writes it
    for n, x in zip(names, hybrid):
        shown.setdefault(n, x.written)
    if target == ZAMBA and len(blocks) > 1:
        raise refuse(f"{target} with a tied head runs one transformer in every hybrid layer (got "
                     f"{', '.join(shown[n] for n in blocks)})")
    turns = [blocks[j % len(blocks)] for j in range(len(names))]
    if names != turns:
        raise refuse(f"{target}'s {len(blocks)} transformer blocks take turns over the hybrid layers in order ("
                     f"{' '.join(shown[n] for n in turns)}), got {' '.join(x.written for x in hybrid)}")
    return hybrid, len(blocks)


def zamba_export(model: Any, cfg: ModelConfig, target: str) -> Written:
    """(config.json contents, tensors in the class's names) of ``model``."""
    shared(cfg, target)
    pre_norms(cfg, target)
    hybrid, n_blocks = _blocks(cfg, target)
    z, d = cfg.zamba, cfg.d_model
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    conf: dict[str, Any] = {
        "architectures": [target], "model_type": "zamba" if target == ZAMBA else "zamba2", "hidden_size": d,
        "num_hidden_layers": cfg.n_layers, "max_position_embeddings": cfg.max_seq_len,
        "layers_block_type": ["hybrid" if str(x.family) == "H" else "mamba" for x in cfg.parsed.layers],
        "num_attention_heads": z.n_heads, "num_key_value_heads": z.kv_heads(), "intermediate_size": z.d_ff or 4 * d,
        "hidden_act": _ACTS[z.act], "rms_norm_eps": cfg.norm_eps}
    if target == ZAMBA:
        conf.update(_zamba(cfg))
    else:
        conf.update(_zamba2(cfg, n_blocks))
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.final_layernorm.weight": sd["norm.weight"]}
    st = "shared_transf." if target == ZAMBA else "shared_transformer."
    home: dict[int, str] = {}  # block -> the prefix of its first use's transformer
    uses = 0  # hybrid layers so far: a use's rank
    for i, layer in enumerate(cfg.parsed.layers):
        pre, blk = f"model.layers.{i}.", f"blocks.{i}."
        if str(layer.family) != "H":
            out[pre + "input_layernorm.weight"] = sd[blk + "norm.weight"]
            _ssm(cfg, sd, blk + "mixer.", pre + "mamba.", out, target)
            continue
        own = layer.share is None
        src = blk + "mixer." if own else f"shared.{layer.share}.mixer."
        block, uses = uses % n_blocks, uses + 1
        if block not in home:
            home[block] = pre + st
            _transformer(cfg, sd, src, pre + st, out, target)
        parts = blk + ("mixer." if own else "parts.")
        if target == ZAMBA2:
            _adapters(cfg, sd, parts, home[block], uses - 1, out)
        out[pre + "linear.weight"] = sd[parts + "linear.weight"]
        out[pre + "mamba_decoder.input_layernorm.weight"] = sd[parts + "mamba_norm.weight"]
        _ssm(cfg, sd, parts + "mamba.", pre + "mamba_decoder.mamba.", out, target)
    return conf, out


def _zamba(cfg: ModelConfig) -> dict[str, Any]:
    z, s, d = cfg.zamba, cfg.mamba1, cfg.d_model
    plain(z, "zamba", ZAMBA, ("n_heads", "n_kv_heads", "d_ff", "act", "companion"))
    plain(s, "mamba1", ZAMBA, ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "n_heads"))
    return {"attention_hidden_size": 2 * d, "attention_head_dim": 2 * d // z.n_heads, "n_mamba_heads": s.n_heads,
            "hidden_mamba_act": "silu", "mamba_d_state": s.d_state, "mamba_d_conv": s.d_conv,
            "mamba_expand": s.expand, "mamba_dt_rank": s.rank(d), "mamba_conv_bias": s.conv_bias,
            "mamba_proj_bias": s.bias, "time_step_min": s.dt_min, "time_step_max": s.dt_max,
            "time_step_floor": s.dt_init_floor}


def _zamba2(cfg: ModelConfig, n_blocks: int) -> dict[str, Any]:
    z, m, d = cfg.zamba, cfg.mamba, cfg.d_model
    plain(z, "zamba", ZAMBA2, ("n_heads", "n_kv_heads", "d_ff", "act", "adapter_rank", "attention_adapter", "rope",
                               "rope_theta"))
    plain(m, "mamba", ZAMBA2, ("d_state", "d_conv", "expand", "head_dim", "n_groups", "dt_clamp_min", "d_inner"))
    hd = 2 * d // z.n_heads
    if hd % 2 and (hd > 4 or z.rope):  # its config validates a full-width rotation even without use_mem_rope
        raise refuse(f"zamba.n_heads={z.n_heads} makes heads {hd} wide (2 * d_model / n_heads): {ZAMBA2} needs an "
                     f"even width{' with zamba.rope' if hd <= 4 else ' above 4, with RoPE or without'}")
    if m.d_inner not in (None, m.expand * d):
        raise refuse(f"mamba.d_inner={m.d_inner}: {ZAMBA2}'s Mamba-2 is mamba.expand * d_model = {m.expand * d} wide")
    if cfg.norm_eps != 1e-5:
        raise refuse(f"model.norm_eps={cfg.norm_eps}: {ZAMBA2}'s Mamba-2 norms use 1e-5 whatever rms_norm_eps says "
                     "(needs 1e-5)")
    return {"num_mem_blocks": n_blocks, "adapter_rank": z.adapter_rank,
            "use_shared_attention_adapter": z.attention_adapter, "use_mem_rope": z.rope,
            "rope_parameters": {"rope_type": "default", "rope_theta": z.rope_theta}, "use_long_context": False,
            "add_bias_linear": False, "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand,
            "n_mamba_heads": m.inner(d) // m.head_dim, "mamba_ngroups": m.n_groups, "chunk_size": m.chunk_size,
            "use_conv_bias": True, "time_step_min": max(m.dt_clamp_min, NO_FLOOR), "time_step_max": m.dt_max,
            "time_step_floor": m.dt_init_floor}


def _transformer(cfg: ModelConfig, sd: Tensors, src: str, dst: str, out: Tensors, target: str) -> None:
    """A hybrid layer's transformer (its two norms, attention and gated MLP) under ``dst``."""
    z, d = cfg.zamba, cfg.d_model
    hd = 2 * d // z.n_heads
    out[dst + "input_layernorm.weight"] = sd[src + "in_norm.weight"]
    out[dst + "pre_ff_layernorm.weight"] = sd[src + "ff_norm.weight"]
    sizes = [z.n_heads * hd, z.kv_heads() * hd, z.kv_heads() * hd]
    for p, w in zip("qkv", sd[src + "qkv.weight"].split(sizes)):
        out[f"{dst}self_attn.{p}_proj.weight"] = w
    out[dst + "self_attn.o_proj.weight"] = sd[src + "out_proj.weight"]
    gate_up = sd[src + "gate_up.weight"]
    if target == ZAMBA:
        out[dst + "feed_forward.gate_proj.weight"], out[dst + "feed_forward.up_proj.weight"] = gate_up.chunk(2)
    else:
        out[dst + "feed_forward.gate_up_proj.weight"] = gate_up
    out[dst + "feed_forward.down_proj.weight"] = sd[src + "down.weight"]


def _adapters(cfg: ModelConfig, sd: Tensors, parts: str, dst: str, j: int, out: Tensors) -> None:
    """Use ``j``'s LoRA adapters into its block's lists; without adapters (rank 0) the MLP's list still holds a
    rank-0 pair for each use, empty tensors that load to the zero update amer's absent adapter is."""
    z, d = cfg.zamba, cfg.d_model
    lists = [("ff_adapter", f"feed_forward.gate_up_proj_adapter_list.{j}")]
    if z.attention_adapter:
        lists += [(f"{p}_adapter", f"self_attn.linear_{p}_adapter_list.{j}") for p in "qkv"]
    for name, key in lists:
        for k in (0, 1):
            w = sd.get(f"{parts}{name}.{k}.weight")
            if w is None:  # rank 0: Linear(d, 0) and Linear(0, 2 d_ff)
                w = torch.zeros((0, d) if k == 0 else (2 * (z.d_ff or 4 * d), 0))
            out[f"{dst}{key}.{k}.weight"] = w


def _ssm(cfg: ModelConfig, sd: Tensors, src: str, dst: str, out: Tensors, target: str) -> None:
    """The state-space mixer at ``src``: Zamba's multi-head Mamba-1 or Zamba2's Mamba-2."""
    if target == ZAMBA:
        _mamba1(cfg.mamba1.n_heads, sd, src, dst, out)
    else:
        mamba2_out(sd, src, dst, out)


def _mamba1(H: int, sd: Tensors, src: str, dst: str, out: Tensors) -> None:
    """An ``H``-head Mamba-1 in Zamba's layout: in_proj rows interleaved (scan input, gate) per channel, the
    selective maps, A and D per head."""
    for name in ("weight", "bias"):
        w = sd.get(src + f"in_proj.{name}")
        if w is not None:
            out[dst + f"in_proj.{name}"] = torch.stack(w.chunk(2), dim=1).flatten(0, 1)
    out[dst + "conv1d.weight"] = sd[src + "conv_weight"].unsqueeze(1)
    if src + "conv_bias" in sd:
        out[dst + "conv1d.bias"] = sd[src + "conv_bias"]
    x_proj = sd[src + "x_proj.weight"]
    out[dst + "x_proj_weight"] = x_proj.reshape(H, -1, x_proj.shape[-1])
    dt = sd[src + "dt_proj.weight"]
    out[dst + "dt_proj_weight"] = dt.reshape(H, -1, dt.shape[-1])
    out[dst + "dt_proj_bias"] = sd[src + "dt_proj.bias"].reshape(H, -1)
    A_log = sd[src + "A_log"]
    out[dst + "A_log"] = A_log.reshape(H, -1, A_log.shape[-1])
    out[dst + "D"] = sd[src + "D"].reshape(H, -1)
    out[dst + "out_proj.weight"] = sd[src + "out_proj.weight"]
    if src + "out_proj.bias" in sd:
        out[dst + "out_proj.bias"] = sd[src + "out_proj.bias"]
