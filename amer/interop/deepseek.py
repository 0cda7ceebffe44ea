"""DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437) and the DeepSeek-style MoE that Kimi Linear shares.

A decoder layer is ``x + mla(norm1(x))`` then ``x + ffn(norm2(x))``: two amer blocks, ``D`` (multi-head latent
attention, :mod:`amer.interop.mla`) then ``E``. The first ``first_k_dense_replace`` layers have a dense SwiGLU
feed-forward, the others the MoE (sigmoid scores, a selection-only expert bias, group-limited top-k, a routed
scaling factor, always-on shared experts): the dense ones are the E family's variant ``dense``, so the pattern reads
``(D E.dense)*3 (D E)*58`` and taps still count every feed-forward as an E block. The multi-token-prediction modules
stored after the last layer (``num_nextn_predict_layers``) are not part of the causal LM and are left out, as
transformers leaves them out.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from amer.blocks.moe import MoEConfig
from amer.config import ModelConfig
from amer.interop.common import Converted, converter, dense_mlp_weights, shared_options
from amer.interop.llama import _embeddings
from amer.interop.mla import mla_options, mla_weights
from amer.interop.source import Source, unsupported

__all__ = ["DENSE", "convert_deepseek_v3", "deepseek_moe_options", "moe_table", "moe_weights", "runs"]

log = logging.getLogger(__name__)

DENSE = "dense"  # the E variant of a model's dense feed-forward layers
# options of the routed table a dense (one-expert) variant must set back to their defaults
_ROUTED_ONLY = ("shared_expert", "shared_expert_gate", "n_shared_experts", "d_ff_shared", "expert_bias",
                "bias_update_rate", "n_groups", "topk_groups", "d_latent")


def _first(c: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The value of the first of ``keys`` the config holds (transformers and the model's own code name some
    settings differently: ``n_group`` / ``num_expert_group``)."""
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    return default


def deepseek_moe_options(src: Source) -> dict[str, Any]:
    """The E table of a ``DeepseekV3MoE`` / ``KimiLinearMoE`` block (see docs/moe.md)."""
    c = src.config
    E = _first(c, "n_routed_experts", "num_experts", "num_local_experts")
    if not E:
        raise unsupported(src.arch, "no routed experts (n_routed_experts)")
    E = int(E)
    k = int(_first(c, "num_experts_per_tok", "num_experts_per_token", default=8))
    renorm = bool(_first(c, "norm_topk_prob", "moe_renormalize", default=True))
    n_shared = int(_first(c, "n_shared_experts", "num_shared_experts", default=0))
    d_ff = int(c["moe_intermediate_size"])
    table: dict[str, Any] = {
        "n_experts": E, "top_k": k, "d_ff": d_ff, "score": "sigmoid", "expert_bias": True,
        "renormalize": renorm, "renormalize_top1": renorm and k == 1,
        "routed_scale": float(c.get("routed_scaling_factor") or 1.0),
        "n_groups": int(_first(c, "n_group", "num_expert_group", default=1)),
        "topk_groups": int(c.get("topk_group") or 1)}
    if n_shared:
        table.update(shared_expert=True, n_shared_experts=n_shared, d_ff_shared=d_ff)
    if c.get("router_aux_loss_coef") is not None:
        table["aux_loss_coef"] = float(c["router_aux_loss_coef"])
    return table


def moe_table(routed: dict[str, Any], d_ff_dense: int, sparse: list[bool]) -> tuple[dict[str, Any], list[str]]:
    """The E family's table and each layer's E block: routed layers ``E``; dense layers the variant ``dense`` (one
    expert of width ``d_ff_dense``, the routed-only options at their defaults), or plain ``E`` when no layer routes."""
    if not any(sparse):
        return {"n_experts": 1, "d_ff": d_ff_dense}, ["E"] * len(sparse)
    if all(sparse):
        return routed, ["E"] * len(sparse)
    plain = MoEConfig()
    variant = {"n_experts": 1, "d_ff": d_ff_dense, **{k: getattr(plain, k) for k in _ROUTED_ONLY if k in routed}}
    return {**routed, "variants": {DENSE: variant}}, ["E" if s else f"E.{DENSE}" for s in sparse]


def runs(units: list[str]) -> str:
    """A pattern of per-layer units (``"D E.dense"``, ``"D E"``) with each run of equal units written once:
    ``(D E.dense)*3 (D E)*58``."""
    out: list[str] = []
    i = 0
    while i < len(units):
        j = i
        while j < len(units) and units[j] == units[i]:
            j += 1
        out.append(units[i] if j - i == 1 else f"({units[i]})*{j - i}")
        i = j
    return " ".join(out)


def _experts(src: Source, pre: str, blk: int, n_experts: int, state: dict[str, Tensor]) -> None:
    """Routed experts (``pre`` ends in ``experts.``): per expert gate/up/down Linears (``gate_proj``, ``up_proj``,
    ``down_proj`` as DeepSeek stores them, ``w1``, ``w3``, ``w2`` as Kimi does), or the fused (E, 2F, D) and
    (E, D, F) tensors."""
    out = f"blocks.{blk}.mixer."
    if src.has(pre + "gate_up_proj"):
        state[out + "w_gate_up"] = src.get(pre + "gate_up_proj").transpose(1, 2).contiguous()
        state[out + "w_down"] = src.get(pre + "down_proj").transpose(1, 2).contiguous()
        return
    names = ("gate_proj", "up_proj", "down_proj") if src.has(pre + "0.gate_proj.weight") else ("w1", "w3", "w2")
    gu, dn = [], []
    for e in range(n_experts):
        ex = f"{pre}{e}."
        gu.append(torch.cat([src.get(f"{ex}{names[0]}.weight").T, src.get(f"{ex}{names[1]}.weight").T], dim=1))
        dn.append(src.get(f"{ex}{names[2]}.weight").T)
    state[out + "w_gate_up"] = torch.stack(gu).contiguous()
    state[out + "w_down"] = torch.stack(dn).contiguous()


def moe_weights(src: Source, pre: str, blk: int, table: dict[str, Any], state: dict[str, Tensor]) -> None:
    """A DeepSeek-style MoE (``pre`` ends in ``mlp.`` or ``block_sparse_moe.``) into block ``blk``'s E mixer: the
    router and its correction bias, the routed experts, the shared experts."""
    out = f"blocks.{blk}.mixer."
    state[out + "router.weight"] = src.get(pre + "gate.weight")
    state[out + "expert_bias"] = src.get(pre + "gate.e_score_correction_bias")
    _experts(src, pre + "experts.", blk, int(table["n_experts"]), state)
    if table.get("shared_expert"):
        sh = pre + "shared_experts."
        state[out + "shared.gate_up.weight"] = torch.cat([src.get(sh + "gate_proj.weight"),
                                                          src.get(sh + "up_proj.weight")])
        state[out + "shared.down.weight"] = src.get(sh + "down_proj.weight")


def skip_mtp(src: Source, n_layers: int, prefix: str = "model.layers.") -> None:
    """Leave out the multi-token-prediction layers stored after the last decoder layer (they predict further tokens
    for speculative decoding; the causal LM does not run them)."""
    layer, names = n_layers, []
    while skipped := src.skip(f"{prefix}{layer}."):
        names += skipped
        layer += 1
    if names:
        log.info("%s: left out %d multi-token-prediction tensors (layers %d to %d)", src.arch, len(names), n_layers,
                 layer - 1)


@converter("DeepseekV3ForCausalLM")
def convert_deepseek_v3(src: Source) -> Converted:
    c = src.config
    src.require("hidden_act", ("silu",), "silu", "the E feed-forwards are SwiGLU")
    L = int(c["num_hidden_layers"])
    k_dense = int(c.get("first_k_dense_replace") or 0)
    routed = deepseek_moe_options(src)
    moe, ffn = moe_table(routed, int(c["intermediate_size"]), [i >= k_dense for i in range(L)])
    cfg = ModelConfig(pattern=runs([f"D {e}" for e in ffn]), **shared_options(src), mla=mla_options(src), moe=moe)
    state = _embeddings(src, cfg)
    interleaved = bool(c.get("rope_interleave", True))
    for i in range(L):
        pre, a, e = f"model.layers.{i}.", 2 * i, 2 * i + 1
        state[f"blocks.{a}.norm.weight"] = src.get(pre + "input_layernorm.weight")
        mla_weights(src, pre + "self_attn.", a, state, interleaved=interleaved)
        state[f"blocks.{e}.norm.weight"] = src.get(pre + "post_attention_layernorm.weight")
        if ffn[i] == "E" and moe["n_experts"] > 1:
            moe_weights(src, pre + "mlp.", e, routed, state)
        else:
            dense_mlp_weights(src, pre + "mlp.", e, state)
    skip_mtp(src, L)
    return Converted(cfg, state)
