"""Multi-head latent attention from transformers checkpoints: the D family's options and weights of
``DeepseekV3Attention`` (DeepSeek-V3, also DeepSeek-V2's layout) and ``KimiLinearAttention`` (Kimi Linear's full
attention layers, MLA without rotary position encoding).

The two classes share one weight layout (:mod:`amer.blocks.mla` gives the mapping); DeepSeek-V3's interleaved
rotary pairs (``rope_interleave``, its default) become the block's half-split layout by permuting the rotary rows
of ``q_b_proj`` (or ``q_proj``) per head and of ``kv_a_proj_with_mqa``. YaRN (``rope_type`` "yarn") maps to the
block's ``yarn_*`` options, its ``mscale_all_dim`` correction of the softmax scale included.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from amer.blocks.mla import deinterleave_rows
from amer.interop.source import Source, unsupported

__all__ = ["mla_options", "mla_weights"]

LATENT_NORM_EPS = 1e-6  # both classes build their latent norms without passing rms_norm_eps


def mla_options(src: Source, *, rope: bool = True) -> dict[str, Any]:
    """The D family's options from a DeepSeek-V3-style config (``rope=False``: Kimi Linear's position-free MLA)."""
    c = src.config
    n_heads = int(c["num_attention_heads"])
    if int(c.get("num_key_value_heads") or n_heads) != n_heads:
        raise unsupported(src.arch, "num_key_value_heads differs from num_attention_heads (MLA's heads each "
                          "decompress their own keys and values)")
    opts: dict[str, Any] = {
        "n_heads": n_heads, "q_lora_rank": int(c.get("q_lora_rank") or 0), "kv_lora_rank": int(c["kv_lora_rank"]),
        "qk_nope_head_dim": int(c["qk_nope_head_dim"]), "qk_rope_head_dim": int(c["qk_rope_head_dim"]),
        "v_head_dim": int(c.get("v_head_dim") or c["qk_nope_head_dim"]), "bias": bool(c.get("attention_bias", False)),
        "norm_eps": LATENT_NORM_EPS, "rope": rope}
    if rope:
        opts.update(_rope_options(src))
    return opts


def _rope_options(src: Source) -> dict[str, Any]:
    c = src.config
    params = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "yarn":
        raise unsupported(src.arch, f"rope_type={kind!r} (amer's MLA has plain RoPE and YaRN: 'default' or 'yarn')")
    if params.get("attention_factor") is not None or params.get("truncate", True) is not True:
        raise unsupported(src.arch, "YaRN with an explicit attention_factor or truncate=false (amer derives the "
                          "factor from mscale and truncates the correction range)")
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or float(c["max_position_embeddings"]) / original
    return {"rope_theta": theta, "yarn_factor": float(factor), "yarn_original": original,
            "yarn_beta_fast": float(params.get("beta_fast") or 32),
            "yarn_beta_slow": float(params.get("beta_slow") or 1), "yarn_mscale": float(params.get("mscale") or 0.0),
            "yarn_mscale_all_dim": float(params.get("mscale_all_dim") or 0.0)}


def mla_weights(src: Source, pre: str, blk: int, state: dict[str, Tensor], *, interleaved: bool = False) -> None:
    """An MLA layer (``pre`` ends in ``self_attn.``) into block ``blk``'s D mixer; ``interleaved``: DeepSeek-V3's
    ``rope_interleave`` layout of the rotary rows."""
    c = src.config
    H, rope = int(c["num_attention_heads"]), int(c["qk_rope_head_dim"])
    out = f"blocks.{blk}.mixer."

    def heads(w: Tensor, groups: int) -> Tensor:  # rotary rows of each group to the half-split layout
        return deinterleave_rows(w.view(groups, -1, *w.shape[1:]), rope).reshape(w.shape) if interleaved else w

    q = "q_b_proj" if src.has(pre + "q_b_proj.weight") else "q_proj"
    state[f"{out}{q}.weight"] = heads(src.get(f"{pre}{q}.weight"), H)
    if q == "q_b_proj":
        state[out + "q_a_proj.weight"] = src.get(pre + "q_a_proj.weight")
        state[out + "q_a_norm.weight"] = src.get(pre + "q_a_layernorm.weight")
    state[out + "kv_a_proj.weight"] = heads(src.get(pre + "kv_a_proj_with_mqa.weight"), 1)
    state[out + "kv_a_norm.weight"] = src.get(pre + "kv_a_layernorm.weight")
    state[out + "kv_b_proj.weight"] = src.get(pre + "kv_b_proj.weight")
    state[out + "out_proj.weight"] = src.get(pre + "o_proj.weight")
    for name, ours in (("q_a_proj", "q_a_proj"), ("kv_a_proj_with_mqa", "kv_a_proj"), ("o_proj", "out_proj")):
        b = src.get(f"{pre}{name}.bias", optional=True)
        if b is not None:
            state[f"{out}{ours}.bias"] = heads(b, 1) if name == "kv_a_proj_with_mqa" else b
