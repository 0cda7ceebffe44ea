"""The zoo presets at their published shapes: each builds on the meta device with the parameter count its model card
publishes, and with the count transformers' own class gives for the published config.json values.

Published figures (the source of each is in ``PRESETS``) are rounded except LFM2's, so the check is that amer's
count rounds to the figure; the transformers check is exact (the class built on the meta device from the
config.json values written here), apart from a difference named per preset where amer lacks a weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import pytest
import torch

from amer import HybridLM, ModelConfig
from amer.pattern import from_megatron, parse_pattern, preset_names


class Published(NamedTuple):
    figure: float  # the published parameter count
    unit: float  # its last digit's place (0: exact)
    source: str
    cls: str  # the transformers class and config class, and the published config.json values
    config_cls: str
    config: dict[str, Any]
    non_embedding: bool = False  # the figure excludes the embedding
    missing: int = 0  # weights transformers has and amer's preset lacks


NEMOTRON_H_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
GRANITE_TINY_TYPES = (["mamba"] * 5 + ["attention"] + (["mamba"] * 9 + ["attention"]) * 3 + ["mamba"] * 4)

PRESETS: dict[str, Published] = {
    "jamba-1.5-mini": Published(
        52e9, 1e9, "Jamba-1.5 (arXiv 2408.12570) and its model card: 12B active / 52B total parameters",
        "JambaForCausalLM", "JambaConfig",
        dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
             num_key_value_heads=8, num_experts=16, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
             attn_layer_period=8, attn_layer_offset=4, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
             mamba_dt_rank=256, vocab_size=65536, tie_word_embeddings=False)),
    "qwen3-next-80b-a3b": Published(
        80e9, 1e9, "Qwen3-Next-80B-A3B model card: 80B total / 3B activated parameters",
        "Qwen3NextForCausalLM", "Qwen3NextConfig",
        dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
             partial_rotary_factor=0.25, intermediate_size=5120, moe_intermediate_size=512,
             shared_expert_intermediate_size=512, num_experts=512, num_experts_per_tok=10, full_attention_interval=4,
             linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
             linear_value_head_dim=128, vocab_size=151936, tie_word_embeddings=False)),
    "nemotron-h-8b": Published(
        8e9, 1e9, "Nemotron-H (arXiv 2504.03624) and the Nemotron-H-8B-Base-8K model card: 8B parameters",
        "NemotronHForCausalLM", "NemotronHConfig",
        dict(hidden_size=4096, hybrid_override_pattern=NEMOTRON_H_8B, num_hidden_layers=52, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, intermediate_size=21504, mamba_num_heads=128, mamba_head_dim=64,
             n_groups=8, ssm_state_size=128, conv_kernel=4, expand=2, vocab_size=131072, tie_word_embeddings=False,
             mlp_hidden_act="relu2")),
    "granite-4.0-h-tiny": Published(
        7e9, 1e9, "IBM's Granite 4.0 announcement and model card: 7B total / 1B active parameters",
        "GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig",
        dict(hidden_size=1536, num_hidden_layers=40, layer_types=GRANITE_TINY_TYPES, num_attention_heads=12,
             num_key_value_heads=4, num_local_experts=64, num_experts_per_tok=6, intermediate_size=512,
             shared_intermediate_size=1024, mamba_n_heads=48, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
             mamba_d_conv=4, mamba_expand=2, vocab_size=100352, tie_word_embeddings=True,
             position_embedding_type="nope")),
    "lfm2-1.2b": Published(
        1_170_340_608, 0, "LFM2-1.2B model card: Parameters 1,170,340,608",
        "Lfm2ForCausalLM", "Lfm2Config",
        dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=12288, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0,
             block_multiple_of=256, conv_L_cache=3, conv_bias=False, vocab_size=65536, tie_word_embeddings=True,
             layer_types=["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)])),
    "recurrentgemma-2b": Published(
        2e9, 1e9, "RecurrentGemma (arXiv 2404.07839): 2B non-embedding parameters",
        "RecurrentGemmaForCausalLM", "RecurrentGemmaConfig",
        dict(hidden_size=2560, num_hidden_layers=26, vocab_size=256000, intermediate_size=15360, num_attention_heads=10,
             num_key_value_heads=1, head_dim=256, lru_width=2560, attention_window_size=2048, conv1d_width=4,
             block_types=["recurrent", "recurrent", "attention"], partial_rotary_factor=0.5),
        non_embedding=True),
    "falcon-h1-1.5b": Published(
        1_554_859_392, 0, "the Falcon-H1-1.5B-Base model page on the Hugging Face Hub: 1,554,859,392 parameters "
        "(safetensors); the shape in transformers' FalconH1 documentation table",
        "FalconH1ForCausalLM", "FalconH1Config",
        dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             intermediate_size=4608, mamba_d_ssm=3072, mamba_n_heads=48, mamba_d_head=64, mamba_d_state=256,
             mamba_n_groups=1, mamba_d_conv=4, mamba_rms_norm=True, vocab_size=65536, tie_word_embeddings=False)),
    "zamba2-2.7b": Published(
        2.7e9, 1e8, "The Zamba2 Suite technical report (Glorioso et al. 2024, arXiv 2411.15242): 1.2B, 2.7B and 7.4B "
        "parameter models",
        "Zamba2ForCausalLM", "Zamba2Config",
        dict(hidden_size=2560, num_hidden_layers=54, num_attention_heads=32, num_key_value_heads=32,
             intermediate_size=10240, mamba_d_state=64, mamba_d_conv=4, mamba_expand=2, n_mamba_heads=80,
             mamba_ngroups=1, num_mem_blocks=2, adapter_rank=128, use_shared_attention_adapter=False,
             use_mem_rope=False, vocab_size=32000, tie_word_embeddings=True)),
    "deepseek-v3": Published(
        671e9, 1e9, "DeepSeek-V3 (arXiv 2412.19437): 671B total / 37B activated parameters (the hub's 685B adds the "
        "14B multi-token-prediction module)",
        "DeepseekV3ForCausalLM", "DeepseekV3Config",
        dict(hidden_size=7168, num_hidden_layers=61, intermediate_size=18432, moe_intermediate_size=2048,
             num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1,
             num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3, q_lora_rank=1536,
             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280,
             tie_word_embeddings=False)),
}


def amer_count(cfg: ModelConfig, non_embedding: bool = False) -> int:
    with torch.device("meta"):
        return HybridLM(cfg).num_params(non_embedding=non_embedding)


def test_every_zoo_preset_is_listed() -> None:
    assert set(PRESETS) <= set(preset_names())


@pytest.mark.parametrize("name", list(PRESETS))
def test_published_parameter_count(name: str) -> None:
    """amer's count on the meta device rounds to the published figure (LFM2's is exact)."""
    p = PRESETS[name]
    n = amer_count(ModelConfig.from_preset(name), p.non_embedding)
    print(f"{name}: {n:,} (published {p.figure:,.0f}; {p.source})")
    assert abs(n - p.figure) <= p.unit / 2, (n, p.figure)


@pytest.mark.parametrize("name", list(PRESETS))
def test_transformers_count_of_the_published_config(name: str) -> None:
    """transformers' class built from the published config.json values holds the same parameters (less what amer
    lacks, named per preset)."""
    transformers = pytest.importorskip("transformers")
    p = PRESETS[name]
    conf = getattr(transformers, p.config_cls)(**p.config)
    with torch.device("meta"):
        hf = getattr(transformers, p.cls)(conf)
    want = sum(t.numel() for t in hf.parameters())
    assert amer_count(ModelConfig.from_preset(name)) == want - p.missing


def test_the_count_check_sees_one_small_weight_per_layer() -> None:
    """Negative control: Jamba without its dt/B/C norm gains (dt_rank + 2 d_state weights in each of 28 Mamba layers)
    no longer holds transformers' count, by exactly those weights."""
    cfg = ModelConfig.from_preset("jamba-1.5-mini")
    plain = dataclasses.replace(cfg.mamba1, dt_bc_norm="none")
    fewer = ModelConfig(pattern=cfg.pattern, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                                                if f.name not in ("pattern", "family_configs", "family_variants",
                                                                  "family_blocks")},
                        family_configs={**cfg.family_configs, "mamba1": plain}, family_variants=cfg.family_variants)
    assert amer_count(cfg) - amer_count(fewer) == 28 * (256 + 16 + 16)


def test_nemotron_h_preset_is_megatron_cores_layout() -> None:
    """The preset's pattern is the model's hybrid_override_pattern through amer.pattern.from_megatron."""
    pattern = ModelConfig.from_preset("nemotron-h-8b").parsed.letters
    assert pattern == parse_pattern(from_megatron(NEMOTRON_H_8B)).letters


def test_zamba2_preset_is_the_class_layout_with_its_blocks_in_turn() -> None:
    """The preset's pattern is Zamba2's default ``layers_block_type`` with the two shared blocks taking turns; the
    same stack with every hybrid layer's transformer its own (negative control) holds seven more transformers."""
    transformers = pytest.importorskip("transformers")
    types = transformers.Zamba2Config().layers_block_type
    cfg = ModelConfig.from_preset("zamba2-2.7b")
    turns = iter(range(len(types)))
    want = " ".join("M" if t != "hybrid" else f"H:z{next(turns) % 2}" for t in types)
    assert cfg.parsed.letters == parse_pattern(want).letters
    unshared = dataclasses.replace(cfg, pattern=want.replace(":z0", "").replace(":z1", ""))
    shared = HybridLM.empty(cfg).shared["z0"]
    assert amer_count(unshared) - amer_count(cfg) == 7 * sum(p.numel() for p in shared.parameters())
