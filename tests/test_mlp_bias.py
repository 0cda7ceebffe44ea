"""MLP biases (``mlp_bias``): the classes whose MLP reads it (Llama, Granite, Bamba, Falcon-H1, Nemotron-H) import with
the same logits as biased dense E blocks (``moe.bias``) and export back with them; a class that never reads it
(Mistral) imports without; partial RoPE or MLP biases on Mamba-2 / attention hybrids export as Bamba, which
Granite-4.0-H cannot express.

Sources are small random transformers models built here (norm gains and biases perturbed, see test_import.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_import import (
    HYBRID,
    LLAMA,
    assert_same_function,
    assert_same_function_and_control,
    build_source,
    export_round_trip,
)
from test_import_parallel import FALCON_H1

from amer.errors import CheckpointError, InputError
from amer.interop import export_transformers, from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
NEMOTRON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                n_groups=2, chunk_size=8,
                layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention"])
BIASED = [
    ("LlamaForCausalLM", "LlamaConfig", dict(LLAMA), "model.layers.1.mlp.up_proj.bias"),
    ("GraniteForCausalLM", "GraniteConfig", dict(LLAMA, embedding_multiplier=2.0, residual_multiplier=0.5),
     "model.layers.0.mlp.gate_proj.bias"),
    ("BambaForCausalLM", "BambaConfig", dict(HYBRID, attn_layer_indices=[1]),
     "model.layers.2.feed_forward.down_proj.bias"),
    ("FalconH1ForCausalLM", "FalconH1Config", dict(FALCON_H1), "model.layers.0.feed_forward.gate_proj.bias"),
    ("NemotronHForCausalLM", "NemotronHConfig", dict(NEMOTRON), "backbone.layers.1.mixer.up_proj.bias"),
]


@pytest.mark.parametrize("cls,cfg_cls,kw,perturb", BIASED, ids=[c[0] for c in BIASED])
def test_mlp_biases_import_and_export(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any], perturb: str) -> None:
    """Forward and decoding equal the source's; a perturbed bias is seen (negative control: the biases are read, and
    Falcon-H1's MLP multipliers scale them); the export writes them back as the class's mlp_bias."""
    build_source(tmp_path / "src", cls, cfg_cls, mlp_bias=True, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    assert cfg.moe.bias or cfg.family_config("E", "dense").bias
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["architectures"] == [cls] and conf["mlp_bias"] is True
    hf = build_source(tmp_path / "ctl", cls, cfg_cls, mlp_bias=True, **kw)
    assert_same_function_and_control(hf, tmp_path / "ctl", perturb)


@pytest.mark.parametrize("cls,cfg_cls,kw", [
    ("MistralForCausalLM", "MistralConfig", LLAMA),
    ("Phi3ForCausalLM", "Phi3Config", dict(LLAMA, pad_token_id=0, eos_token_id=1)),
    ("Lfm2ForCausalLM", "Lfm2Config", dict(LLAMA, layer_types=["conv", "full_attention", "conv"])),
    ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(LLAMA, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=16)),
], ids=["Mistral", "Phi3", "Lfm2", "Qwen3Moe"])
def test_classes_that_ignore_the_bias_keys_import_without(tmp_path: Path, cls: str, cfg_cls: str,
                                                         kw: dict[str, Any]) -> None:
    """Their MLPs have no biases whatever mlp_bias says, and (but Qwen3-MoE's) their attention projections none
    whatever attention_bias says (the keys were refused before, or the import looked for bias weights the folder
    cannot hold)."""
    bias = {"attention_bias": cls != "Qwen3MoeForCausalLM"}
    hf = build_source(tmp_path, cls, cfg_cls, mlp_bias=True, **bias, **kw)
    assert_same_function(hf, tmp_path)
    _, cfg = from_transformers(tmp_path)
    assert not cfg.layer_config(cfg.parsed.layers[1]).bias and not cfg.attention.qkv_bias


def test_nemotron_h_mlp_bias_with_moe_layers_is_refused(tmp_path: Path) -> None:
    """Nemotron-H's mlp_bias also puts biases on the routed layers' shared expert and latent projections, which the
    routed E block has not: refused in one line, by import and by export."""
    build_source(tmp_path / "src", "NemotronHForCausalLM", "NemotronHConfig", mlp_bias=True,
                 **dict(NEMOTRON, layers_block_type=["linear_attention", "moe", "full_attention", "mlp",
                                                     "linear_attention"], n_routed_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, n_group=1, topk_group=1))
    with pytest.raises(CheckpointError, match="mlp_bias with MoE layers"):
        from_transformers(tmp_path / "src")
    from amer import HybridLM, ModelConfig

    dense = {"n_experts": 1, "bias": True, "shared_expert": False}
    cfg = ModelConfig(pattern="M E.dense A E", d_model=32, vocab_size=64, max_seq_len=64,
                      attention={"rope_fraction": 0}, mamba={"head_dim": 16},
                      moe={"n_experts": 4, "top_k": 2, "activation": "relu2", "score": "sigmoid", "expert_bias": True,
                           "shared_expert": True, "variants": {"dense": dense}})
    with pytest.raises(InputError, match="moe.bias with routed layers"):
        export_transformers(HybridLM(cfg), cfg, tmp_path / "x")


@pytest.mark.parametrize("kw", [dict(attn_layer_indices=[1]), dict(attn_layer_indices=[0, 3], head_dim=16),
                                dict(attn_layer_indices=[], mlp_bias=True),
                                dict(attn_layer_indices=[0, 1, 2, 3], mlp_bias=True, attention_bias=True)],
                         ids=["plain", "head_dim", "mamba-only", "attention-only"])
def test_bamba_exports_as_bamba(tmp_path: Path, kw: dict[str, Any]) -> None:
    """Bamba's half-rotary attention and MLP biases have no counterpart in Granite-4.0-H: such models export as Bamba
    and import back to the same config. Control: whole-head RoPE without biases still exports as Granite-4.0-H."""
    build_source(tmp_path / "src", "BambaForCausalLM", "BambaConfig", **{**HYBRID, **kw})
    model, cfg = from_transformers(tmp_path / "src")
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BambaForCausalLM"]
    _, again = from_transformers(tmp_path / "out")
    assert again.pattern == cfg.pattern and again.family_configs == cfg.family_configs
    if len(kw) > 1 or not kw["attn_layer_indices"]:
        return
    import dataclasses

    from amer import HybridLM

    whole = dataclasses.replace(cfg, family_configs={
        **cfg.family_configs, "attention": dataclasses.replace(cfg.attention, rope_fraction=1.0)})

    export_transformers(HybridLM(whole), whole, tmp_path / "granite")
    assert json.loads((tmp_path / "granite" / "config.json").read_text())["architectures"] == [
        "GraniteMoeHybridForCausalLM"]


def test_a_biased_feed_forward_of_another_activation_names_the_activation(tmp_path: Path) -> None:
    """Bamba has MLP biases, so a GeGLU with biases is refused for its activation alone (the message said "silu
    without biases"); control: Granite-4.0-H, without MLP biases, still says both."""
    from amer import HybridLM, ModelConfig

    base = dict(pattern="M E A E", d_model=32, vocab_size=64, max_seq_len=64, mamba={"head_dim": 16})
    for moe, message in (({"n_experts": 1, "bias": True, "activation": "gelu_tanh"},
                          r"BambaForCausalLM's feed-forwards are silu \(moe.activation 'gelu_tanh'"),
                         ({"n_experts": 1, "activation": "gelu_tanh"},
                          r"GraniteMoeHybridForCausalLM's feed-forwards are silu without biases")):
        cfg = ModelConfig(**base, moe=moe)
        with pytest.raises(InputError, match=message):
            export_transformers(HybridLM(cfg), cfg, tmp_path / "x")
