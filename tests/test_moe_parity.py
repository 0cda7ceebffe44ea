"""The E family against transformers' own MoE blocks (their torch paths), weights copied: the full dispatch and
the decoding-sized path to 1e-5 in fp32, each with a negative control (one weight perturbed). The option ->
class mapping these tests pin down is the table of docs/moe.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from amer import ModelConfig
from amer.blocks.moe import MoEMixer
from amer.blocks.moe_router import route

D = 32


def inputs(B: int = 2, T: int = 11) -> Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))


def _hf_block(module: str, cls: str, config: str, **kw: Any) -> torch.nn.Module:
    mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    conf = getattr(importlib.import_module("transformers"), config)(hidden_size=D, **kw)
    torch.manual_seed(0)
    blk = getattr(mod, cls)(conf).eval()
    with torch.no_grad():
        for name, p in blk.named_parameters():  # standalone blocks are not initialised by transformers
            p.normal_(0.0, 0.3 if name.split(".")[0] in ("gate", "router") else 0.2)
        for name, b in blk.named_buffers():
            if "bias" in name:
                b.uniform_(-0.3, 0.3)
    return blk


def _t(w: Tensor) -> Tensor:
    return w.transpose(1, 2).contiguous()


def _experts(s: dict[str, Tensor], up: str = "gate_up_proj") -> dict[str, Tensor]:
    return {"w_gate_up": _t(s[f"experts.{up}"]), "w_down": _t(s["experts.down_proj"])}


def _shared(s: dict[str, Tensor], pre: str) -> dict[str, Tensor]:
    return {"shared.gate_up.weight": torch.cat([s[pre + "gate_proj.weight"], s[pre + "up_proj.weight"]]),
            "shared.down.weight": s[pre + "down_proj.weight"]}


def _qwen2(s):
    return {"router.weight": s["gate.weight"], **_experts(s), **_shared(s, "shared_expert."),
            "shared_gate.weight": s["shared_expert_gate.weight"]}


def _deepseek(s):
    return {"router.weight": s["gate.weight"], "expert_bias": s["gate.e_score_correction_bias"], **_experts(s),
            **_shared(s, "shared_experts.")}


def _nemotron(s):
    out = {"router.weight": s["gate.weight"], "expert_bias": s["gate.e_score_correction_bias"],
           **_experts(s, "up_proj"), "shared.gate_up.weight": s["shared_experts.up_proj.weight"],
           "shared.down.weight": s["shared_experts.down_proj.weight"]}
    if "fc1_latent_proj.weight" in s:
        out.update({"to_latent.weight": s["fc1_latent_proj.weight"], "from_latent.weight": s["fc2_latent_proj.weight"]})
    return out


# name: (transformers block, its config, the amer options, the weight mapping)
HF_BLOCKS: dict[str, tuple[tuple[str, str, str], dict[str, Any], dict[str, Any], Callable[..., dict]]] = {
    "Qwen2MoeSparseMoeBlock": (
        ("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig"),
        {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24,
         "norm_topk_prob": False},
        {"renormalize": False, "shared_expert": True, "d_ff_shared": 24, "shared_expert_gate": True}, _qwen2),
    "Qwen3MoeSparseMoeBlock": (
        ("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig"),
        {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True},
        {}, lambda s: {"router.weight": s["gate.weight"], **_experts(s)}),
    "OlmoeSparseMoeBlock": (
        ("olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig"),
        {"num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16, "norm_topk_prob": False},
        {"renormalize": False}, lambda s: {"router.weight": s["gate.weight"], **_experts(s)}),
    "DeepseekV3MoE": (
        ("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Config"),
        {"n_routed_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 16, "n_shared_experts": 2,
         "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True},
        {"top_k": 3, "score": "sigmoid", "expert_bias": True, "n_groups": 4, "topk_groups": 2, "routed_scale": 2.5,
         "shared_expert": True, "n_shared_experts": 2, "d_ff_shared": 16}, _deepseek),
    "Lfm2MoeSparseMoeBlock": (
        ("lfm2_moe", "Lfm2MoeSparseMoeBlock", "Lfm2MoeConfig"),
        {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "use_expert_bias": True,
         "routed_scaling_factor": 1.5, "norm_topk_prob": True},
        {"score": "sigmoid", "expert_bias": True, "renormalize_eps": 1e-6, "routed_scale": 1.5},
        lambda s: {"router.weight": s["gate.weight"], "expert_bias": s["expert_bias"], **_experts(s)}),
    "NemotronHMoE": (
        ("nemotron_h", "NemotronHMoE", "NemotronHConfig"),
        {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "moe_shared_expert_intermediate_size": 24, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5},
        {"score": "sigmoid", "expert_bias": True, "n_groups": 2, "topk_groups": 1, "routed_scale": 2.5,
         "activation": "relu2", "shared_expert": True, "d_ff_shared": 24}, _nemotron),
    "NemotronHMoE-latent": (
        ("nemotron_h", "NemotronHMoE", "NemotronHConfig"),
        {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "moe_shared_expert_intermediate_size": 24, "moe_latent_size": 16, "routed_scaling_factor": 2.5},
        {"score": "sigmoid", "expert_bias": True, "routed_scale": 2.5, "activation": "relu2", "shared_expert": True,
         "d_ff_shared": 24, "d_latent": 16}, _nemotron),
    "Qwen3NextSparseMoeBlock": (
        ("qwen3_next", "Qwen3NextSparseMoeBlock", "Qwen3NextConfig"),
        {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "shared_expert_intermediate_size": 24, "norm_topk_prob": True},
        {"shared_expert": True, "d_ff_shared": 24, "shared_expert_gate": True}, _qwen2),
    "GraniteMoeMoE": (
        ("granitemoe", "GraniteMoeMoE", "GraniteMoeConfig"),
        {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16},
        {}, lambda s: {"router.weight": s["router.weight"], **_experts(s)}),
    "GraniteMoeMoE-top1": (
        ("granitemoe", "GraniteMoeMoE", "GraniteMoeConfig"),
        {"num_local_experts": 8, "num_experts_per_tok": 1, "intermediate_size": 16},
        {"top_k": 1, "renormalize_top1": True}, lambda s: {"router.weight": s["router.weight"], **_experts(s)}),
    "Glm4MoeMoE": (
        ("glm4_moe", "Glm4MoeMoE", "Glm4MoeConfig"),
        {"n_routed_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 16, "n_shared_experts": 1,
         "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.8, "norm_topk_prob": True},
        {"top_k": 3, "score": "sigmoid", "expert_bias": True, "n_groups": 2, "topk_groups": 1, "routed_scale": 1.8,
         "shared_expert": True, "d_ff_shared": 16}, _deepseek),
    "MiniMaxM2SparseMoeBlock": (
        ("minimax_m2", "MiniMaxM2SparseMoeBlock", "MiniMaxM2Config"),
        {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16},
        {"score": "sigmoid", "expert_bias": True},
        lambda s: {"router.weight": s["gate.weight"], "expert_bias": s["e_score_correction_bias"], **_experts(s)}),
    "JambaSparseMoeBlock": (
        ("jamba", "JambaSparseMoeBlock", "JambaConfig"),
        {"num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 16},
        {"renormalize": False}, lambda s: {"router.weight": s["router.weight"], **_experts(s)}),
}


def _pair(name: str) -> tuple[torch.nn.Module, MoEMixer]:
    where, hf_cfg, options, mapping = HF_BLOCKS[name]
    blk = _hf_block(*where, **hf_cfg)
    d_ff = hf_cfg.get("moe_intermediate_size", hf_cfg.get("intermediate_size"))
    cfg = ModelConfig(pattern="E", d_model=D, moe={"n_experts": 8, "top_k": 2, "d_ff": d_ff, **options})
    m = MoEMixer(cfg.moe, cfg.dims, cfg.parsed.layers[0])
    m.load_state_dict(mapping(blk.state_dict()), strict=True)
    return blk, m


@pytest.mark.parametrize("name", HF_BLOCKS)
def test_parity_with_the_transformers_block(name: str) -> None:
    """The full dispatch (train mode, with gradients) and the decoding-sized path equal the transformers block
    to 1e-5 in fp32; one perturbed weight of a chosen expert moves the output far past it."""
    blk, m = _pair(name)
    x = inputs()
    with torch.no_grad():
        want = blk(x)
    got = m(x)
    assert (got.y - want).abs().max() <= 1e-5, f"{name}: max |diff| {(got.y - want).abs().max():.2e}"
    with torch.no_grad():
        one = m(x[:1, :1]).y
    assert (one - want[:1, :1]).abs().max() <= 1e-5
    expert = int(route(x[0, 0] @ m.router.weight.T, m.top_k, m.renormalize_top1, bias=m.expert_bias,
                       **m.route_options)[2][0])
    with torch.no_grad():
        m.w_down[expert, 0, 0] += 0.5
        assert (m(x).y - want).abs().max() > 1e-3


def test_parity_needs_the_expert_bias() -> None:
    """Negative control of the selection-only bias: without it DeepSeek-V3's block routes elsewhere."""
    blk, m = _pair("DeepseekV3MoE")
    x = inputs()
    with torch.no_grad():
        want = blk(x)
        m.expert_bias.zero_()
        assert (m(x).y - want).abs().max() > 1e-3
