"""LFM3 (Liquid AI 2026, ``Lfm3ForCausalLM``): LFM2's gated short convolutions beside sliding-window and global
attention, with sandwich norms and a per-head output gate.

A layer is LFM2's pair, ``C`` or ``A`` then a SwiGLU ``E``, with each block's output normed before the residual
(``use_sandwich_norm``: ``norm_placement sandwich``). What LFM3 adds maps onto options without approximation:

- the attention's sigmoid gate per head (``g_proj``, saved as ``gate_proj``: one row per head) is
  ``attention.output_gate`` with each head's row repeated over its channels;
- RoPE per layer type: the sliding-window layers (the variant ``swa``) rotate whole heads; the global layers use
  "proportional" RoPE, which rotates the pairs ``(i, i + hd/2)`` for the first ``R = int(f hd / 2)`` of them at
  frequencies ``theta^(-2i / hd)`` and leaves the rest (zero frequencies). That is partial RoPE over ``2R``
  dimensions (``rope_fraction 2R / hd``) with the base ``theta^(2R / hd)``, once each query and key head's
  dimensions are reordered so the rotated pairs come first; q and k are reordered alike (with their norms' gains), so
  the scores do not change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.config import ModelConfig
from amer.interop.common import (
    Converted,
    attention_options,
    attention_weights,
    converter,
    dense_mlp_weights,
    layer_letters,
    shared_options,
)
from amer.interop.lfm2 import W1W3W2, shortconv_weights
from amer.interop.llama import _embeddings
from amer.interop.source import Source

__all__ = ["convert_lfm3"]

_KINDS = {"conv": "C", "sliding_attention": "A.swa", "full_attention": "A"}


def _rope(src: Source, kind: str, head_dim: int) -> tuple[dict[str, Any], Tensor | None]:
    """Layer type ``kind``'s RoPE options, and the order of each head's dimensions that makes proportional RoPE
    amer's partial RoPE (None: keep them)."""
    params = src.config.get("rope_parameters") or {}
    params = params.get(kind, params) if isinstance(params, dict) else {}
    clear = {"rope_linear_factor": None, "rope_scale_factor": None}  # a variant states its own scaling
    if (params.get("rope_type") or "default") != "proportional":
        theta, fraction, scaling = src.rope(params)
        return {"rope_theta": theta, "rope_fraction": fraction, **clear, **scaling}, None
    half, R = head_dim // 2, int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    fraction = 2 * R / head_dim
    # 12 significant digits: the power's rounding off (1e4 ** 0.75 is 999.9999999999995), far below fp32's
    table = {"rope_theta": float(f"{float(params['rope_theta']) ** fraction:.12g}"), "rope_fraction": fraction,
             **clear}
    if float(params.get("factor", 1.0)) != 1.0:
        table["rope_linear_factor"] = float(params["factor"])
    order = [*range(R), *range(half, half + R), *range(R, half), *range(half + R, head_dim)]
    return table, torch.tensor(order)


def _reorder(state: dict[str, Tensor], blk: int, order: Tensor, heads: tuple[int, int]) -> None:
    """Each query and key head's dimensions of block ``blk`` (rows, biases, q/k norm gains) in ``order``."""
    H, Hkv = heads
    hd = len(order)
    out = f"blocks.{blk}.mixer."
    rows = torch.cat([h * hd + order for h in range(H + Hkv)])  # the q heads, then the k heads
    rows = torch.cat([rows, torch.arange((H + Hkv) * hd, (H + 2 * Hkv) * hd)])  # v unchanged
    for name in ("qkv.weight", "qkv.bias"):
        if out + name in state:
            state[out + name] = state[out + name][rows]
    for n in "qk":
        state[f"{out}{n}_norm.weight"] = state[f"{out}{n}_norm.weight"][order]


@converter("Lfm3ForCausalLM")
def convert_lfm3(src: Source) -> Converted:
    c = src.config
    types = c.get("layer_types")
    if types is None:  # as the class derives them
        L = int(c["num_hidden_layers"])
        types = ["full_attention" if i % 4 == 2 else "sliding_attention" if i % 4 == 0 and i > 0 else "conv"
                 for i in range(L)]
    letters = layer_letters(src, types, _KINDS)
    base = attention_options(src)
    hd, H, Hkv = base["head_dim"], base["n_heads"], base["n_kv_heads"]
    gate = bool(c.get("use_attention_gate", True))
    attn: dict[str, Any] = {**base, "qk_norm": True, "output_gate": gate}
    attn.update(_rope(src, "full_attention", hd)[0])
    orders = {kind: _rope(src, kind, hd)[1] for kind in ("full_attention", "sliding_attention")}
    if "sliding_attention" in types:
        attn["variants"] = {"swa": {"window": int(c["sliding_window"]), **_rope(src, "sliding_attention", hd)[0]}}
    sandwich = bool(c.get("use_sandwich_norm", True))
    cfg = ModelConfig(pattern=" ".join(f"{x} E" for x in letters), **shared_options(src, eps_key="norm_eps"),
                      norm_placement="sandwich" if sandwich else "pre", attention=attn,
                      moe={"n_experts": 1, "d_ff": int(c["intermediate_size"])},
                      shortconv={"l_cache": int(c.get("conv_L_cache", 7)), "bias": bool(c.get("conv_bias", False))})
    state = _embeddings(src, cfg, norm="model.embedding_norm.weight")
    for i, kind in enumerate(types):
        pre, blk = f"model.layers.{i}.", 2 * i
        state[f"blocks.{blk}.norm.weight"] = src.get(pre + "operator_norm.weight")
        state[f"blocks.{blk + 1}.norm.weight"] = src.get(pre + "ffn_norm.weight")
        if sandwich:
            state[f"blocks.{blk}.post_norm.weight"] = src.get(pre + "post_operator_norm.weight")
            state[f"blocks.{blk + 1}.post_norm.weight"] = src.get(pre + "post_ffn_norm.weight")
        if kind == "conv":
            shortconv_weights(src, pre + "conv.", blk, state, cfg.shortconv.bias)
        else:
            attn_pre, out = pre + "self_attn.", f"blocks.{blk}.mixer."
            attention_weights(src, attn_pre, blk, state, qk_norm=True)
            if gate:  # one gate per head: its row over each of the head's channels (checkpoints: gate_proj)
                name = "gate_proj" if src.has(attn_pre + "gate_proj.weight") else "g_proj"
                state[out + "gate.weight"] = src.get(f"{attn_pre}{name}.weight").repeat_interleave(hd, dim=0)
                if out + "qkv.bias" in state:  # amer's gate has a bias with the query's; LFM3's none
                    state[out + "gate.bias"] = torch.zeros(H * hd)
            if orders[kind] is not None:
                _reorder(state, blk, orders[kind], (H, Hkv))
        dense_mlp_weights(src, pre + "feed_forward.", blk + 1, state, names=W1W3W2)
    return Converted(cfg, state)
