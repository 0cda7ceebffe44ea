"""Importing the MoE and MoE-hybrid transformers classes (Qwen2-MoE, Qwen3-MoE, OLMoE, Jamba, Qwen3-Next, LFM2-MoE,
Nemotron-H with its MoE layers): the same logits in amer to 1e-5 in fp32, on a batch and token by token through
amer's decoding caches, and a negative control per class (one source weight perturbed: the logits move).

As in ``test_import.py``: a small random-initialised transformers model is saved with ``save_pretrained`` and the
folder imported (amer reads it without transformers); 1-D weights (norms, biases) are perturbed away from their
1 / 0 initialisation so a weight mapped to the wrong place shows up. Routers are initialised with a larger spread
than transformers' so the choice of experts differs from token to token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import (
    assert_refused,
    assert_same_function_and_control,
    build_source,
    decode_logits,
    edit_config,
    export_round_trip,
    reference_logits,
    tokens,
)

from amer.errors import CheckpointError
from amer.interop import from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def build(path: Path, cls: str, cfg_cls: str, **kw: Any) -> Any:
    """``build_source``, then the routers (and expert biases) spread so routing is decided by real margins and varies
    from token to token; saved again."""
    hf = build_source(path, cls, cfg_cls, **kw)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2 and p.shape[0] > 1:
                p.normal_(0.0, 0.5)
        for name, b in hf.named_buffers():
            if name.endswith(("expert_bias", "e_score_correction_bias")):
                b.uniform_(-0.3, 0.3)
    hf.save_pretrained(path)
    return hf


def refuses(path: Path, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as info:
        from_transformers(path)
    assert "\n" not in str(info.value)


ATTN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
QWEN_MOE = dict(intermediate_size=40, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, **ATTN)


def test_qwen2_moe(tmp_path: Path) -> None:
    """Shared expert with its sigmoid gate, raw top-k weights, dense layers from decoder_sparse_step and
    mlp_only_layers (the variant E.dense), q/k/v biases, one sliding-window layer (the variant A.swa)."""
    hf = build(tmp_path, "Qwen2MoeForCausalLM", "Qwen2MoeConfig", num_hidden_layers=4, decoder_sparse_step=2,
               mlp_only_layers=[3], shared_expert_intermediate_size=24, use_sliding_window=True, sliding_window=3,
               max_window_layers=2, **QWEN_MOE)
    assert_same_function_and_control(hf, tmp_path, "model.layers.1.mlp.shared_expert_gate.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "A.swa E.dense A E A E.dense A E.dense"
    assert not cfg.moe.renormalize and cfg.moe.shared_expert_gate and cfg.attention.qkv_bias
    assert cfg.family_config("E", "dense").n_experts == 1 and cfg.family_config("A", "swa").window == 3


@pytest.mark.parametrize("top_k,norm", [(2, True), (1, True), (2, False)])
def test_qwen3_moe(tmp_path: Path, top_k: int, norm: bool) -> None:
    hf = build(tmp_path, "Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_hidden_layers=3, head_dim=16,
               **{**QWEN_MOE, "num_experts_per_tok": top_k}, norm_topk_prob=norm)
    assert_same_function_and_control(hf, tmp_path, "model.layers.2.mlp.gate.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "(AE)*3" and cfg.moe.renormalize == norm and cfg.attention.qk_norm


def test_qwen3_moe_dense_layers(tmp_path: Path) -> None:
    hf = build(tmp_path, "Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_hidden_layers=3, mlp_only_layers=[0],
               norm_topk_prob=True, **QWEN_MOE)
    assert_same_function_and_control(hf, tmp_path, "model.layers.0.mlp.up_proj.weight")
    assert from_transformers(tmp_path)[1].pattern == "A E.dense A E A E"


def test_olmoe(tmp_path: Path) -> None:
    """q/k RMSNorms over the whole projections (attention.qk_norm_scope 'projection'), raw top-k weights."""
    hf = build(tmp_path, "OlmoeForCausalLM", "OlmoeConfig", num_hidden_layers=2, intermediate_size=16, num_experts=8,
               num_experts_per_tok=2, **ATTN)
    assert_same_function_and_control(hf, tmp_path, "model.layers.0.self_attn.k_norm.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.attention.qk_norm_scope == "projection" and not cfg.moe.renormalize
    edit_config(tmp_path, clip_qkv=8.0)
    refuses(tmp_path, "clip_qkv=8.0")


JAMBA = dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
             num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=4, mamba_expand=2)


@pytest.mark.parametrize("layers,attn,experts,pattern", [
    (4, (2, 0), (2, 1), "(A E.dense S E)*2"),
    (6, (3, 0), (2, 0), "A E S E.dense S E A E.dense S E S E.dense"),
    (3, (4, 2), (1, 0), "SESEAE"),
])
def test_jamba(tmp_path: Path, layers: int, attn: tuple[int, int], experts: tuple[int, int], pattern: str) -> None:
    """S layers with weighted dt/B/C norms, attention without RoPE, MoE every expert_layer_period layers and E.dense
    elsewhere (period 1: every layer routes)."""
    hf = build(tmp_path, "JambaForCausalLM", "JambaConfig", num_hidden_layers=layers, attn_layer_period=attn[0],
               attn_layer_offset=attn[1], expert_layer_period=experts[0], expert_layer_offset=experts[1],
               mamba_proj_bias=layers == 6, **JAMBA)
    assert_same_function_and_control(hf, tmp_path, "model.layers.1.mamba.dt_layernorm.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == pattern
    assert cfg.attention.rope_fraction == 0.0 and cfg.mamba1.dt_bc_norm == "weighted" and not cfg.moe.renormalize


NEXT = dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_conv_kernel_dim=3)


@pytest.mark.parametrize("extra", [dict(), dict(attention_bias=True, norm_topk_prob=False, decoder_sparse_step=2,
                                                mlp_only_layers=[3])])
def test_qwen3_next(tmp_path: Path, extra: dict[str, Any]) -> None:
    """G layers (grouped value heads) and gated attention with partial RoPE and (1 + w) q/k norms; routed E with a
    gated shared expert, E.dense where decoder_sparse_step and mlp_only_layers say. Four layers, DeltaNet heads 16
    wide: each G layer amplifies the rounding of its input (its per-head norms of q, k and the output), and with
    8-wide heads or five layers the fp32 logits of either implementation are ~1e-5 from its own fp64 ones, so a
    1e-5 comparison would measure rounding rather than the mapping; in fp64 amer's decoding equals its forward to
    1e-14."""
    types = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    hf = build(tmp_path, "Qwen3NextForCausalLM", "Qwen3NextConfig", num_hidden_layers=4, layer_types=types,
               **{**NEXT, **extra})
    exact, _ = from_transformers(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        assert (decode_logits(exact, tokens()) - exact(tokens(), taps=False).logits).abs().max() < 1e-10
    assert_same_function_and_control(hf, tmp_path, "model.layers.2.self_attn.q_proj.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.norm_offset == 1.0 and cfg.attention.output_gate and cfg.attention.rope_fraction == 0.25
    assert cfg.pattern == ("G E.dense G E A E.dense G E.dense" if extra else "GEGEAEGE")


QWEN3_5 = {k: v for k, v in NEXT.items() if not k.startswith(("num_experts", "moe_", "shared_expert"))}


@pytest.mark.parametrize("cls,cfg_cls,extra", [
    ("Qwen3_5ForCausalLM", "Qwen3_5TextConfig", dict(attention_bias=True)),
    ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextConfig",
     dict(num_experts=8, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=24,
          rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5,
                           "mrope_section": [1, 1, 2], "mrope_interleaved": True})),
    ("Qwen3_5ForCausalLM", "Qwen3_5TextConfig", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 500.0,
                                                                       "partial_rotary_factor": 0.5})),
], ids=["dense", "moe", "linear-rope"])
def test_qwen3_5(tmp_path: Path, cls: str, cfg_cls: str, extra: dict[str, Any]) -> None:
    """Qwen3.5's text models: Qwen3-Next's layers with the DeltaNet's projections apart (in amer's order), dense
    feed-forwards after every mixer or routed ones in every layer (the router renormalises even a top-1 choice), and
    multimodal RoPE whose position axes coincide for text. Negative control: one row of the DeltaNet's ``b``
    projection perturbed moves the logits. The export writes the same layers as Qwen3-Next."""
    types = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    hf = build(tmp_path, cls, cfg_cls, num_hidden_layers=4, layer_types=types, **{**QWEN3_5, **extra})
    model, cfg = from_transformers(tmp_path)
    assert cfg.norm_offset == 1.0 and cfg.attention.output_gate and cfg.pattern == "GEGEAEGE"
    assert export_round_trip(model, cfg, tmp_path / "out") <= 1e-5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen3NextForCausalLM"]
    assert_same_function_and_control(hf, tmp_path, "model.layers.1.linear_attn.in_proj_b.weight")
    assert (cfg.moe.n_experts, cfg.moe.renormalize_top1) == ((8, True) if "moe_intermediate_size" in extra else
                                                              (1, False))


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_5_vision_language_folder(tmp_path: Path, tied: bool) -> None:
    """A ``Qwen3_5ForConditionalGeneration`` folder (how Qwen3.5 is published): its language model imports as
    ``Qwen3_5ForCausalLM`` (settings under ``text_config``, weights under ``model.language_model.``, the head tied as
    the top level says), the vision tower left out; same logits as the multimodal model on text. Negative control: a
    language-model weight perturbed in the folder moves amer's logits."""
    types = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    text = {**QWEN3_5, "num_hidden_layers": 4, "layer_types": types, "vocab_size": 64, "initializer_range": 0.1}
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=2,
                  temporal_patch_size=1, spatial_merge_size=1)
    torch.manual_seed(0)
    config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=tied)
    hf = transformers.Qwen3_5ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 and "A_log" not in name:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    assert_same_function_and_control(hf, tmp_path, "model.language_model.layers.2.self_attn.k_proj.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "GEGEAEGE" and cfg.tie_embeddings == tied
    assert_refused(tmp_path, {"text_config": None}, "no text_config object in config.json")


LARA = {**QWEN3_5, "num_hidden_layers": 5, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24, "sliding_window": 3}


@pytest.mark.parametrize("extra", [dict(), dict(norm_topk_prob=False, num_experts_per_tok=1, attention_bias=True,
                                                tie_word_embeddings=False, rms_norm_eps=1e-5)])
def test_lara_mini(tmp_path: Path, extra: dict[str, Any]) -> None:
    """Lara-4-Mini's period of five: G, sliding-window attention with RoPE (A.swa, a window of 3 over 12 tokens),
    G, global attention without position encoding (A), A.swa; routed experts with an ungated shared expert in every
    layer, renormalised or raw top-k. The checkpoint's fused DeltaNet ``in_proj`` is read as amer's rows (negative
    control: one of them perturbed moves the logits). The export writes the class back, importing to the same
    configs."""
    hf = build(tmp_path, "LaraMiniForCausalLM", "LaraMiniConfig", **{**LARA, **extra})
    model, cfg = from_transformers(tmp_path)
    assert export_round_trip(model, cfg, tmp_path / "out") <= 1e-5
    _, again = from_transformers(tmp_path / "out")
    assert again.pattern == cfg.pattern and again.family_configs == cfg.family_configs
    assert_same_function_and_control(hf, tmp_path, "model.layers.2.linear_attn.in_proj.weight")
    assert cfg.pattern == "G E A.swa E G E A E A.swa E" and cfg.norm_offset == 0.0
    full, swa = (cfg.layer_config(cfg.parsed.layers[i]) for i in (6, 2))
    assert (full.rope_fraction, full.window, swa.rope_fraction, swa.window) == (0.0, None, 1.0, 3) and full.qk_norm
    assert cfg.moe.shared_expert and not cfg.moe.shared_expert_gate and cfg.moe.renormalize == ("norm_topk_prob"
                                                                                                 not in extra)


LFM3 = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_hidden_layers=5, sliding_window=3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            layer_types=["conv", "sliding_attention", "full_attention", "conv", "full_attention"])


@pytest.mark.parametrize("extra", [
    dict(),
    dict(use_sandwich_norm=False, use_attention_gate=False, attention_bias=True, conv_bias=True,
         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                          "full_attention": {"rope_type": "proportional", "rope_theta": 1e4,
                                             "partial_rotary_factor": 0.75}}),
    dict(head_dim=16, rope_parameters={"sliding_attention": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
                                       "full_attention": {"rope_type": "proportional", "rope_theta": 1e4,
                                                          "partial_rotary_factor": 0.25, "factor": 4.0}}),
], ids=["defaults", "plain", "scaled"])
def test_lfm3(tmp_path: Path, extra: dict[str, Any]) -> None:
    """LFM3: short convolutions, sliding-window attention (A.swa, a window of 3 over 12 tokens) and global attention
    with proportional RoPE (partial RoPE once each q/k head's dimensions are reordered), sandwich norms, a sigmoid gate
    per head (amer's per-channel gate with each head's row repeated). Negative control: the gate of a global layer
    perturbed moves the logits. The export writes the class back (gate rows, head order and RoPE base undone),
    importing to the same configs."""
    hf = build_source(tmp_path, "Lfm3ForCausalLM", "Lfm3Config", **{**LFM3, **extra})
    model, cfg = from_transformers(tmp_path)
    assert export_round_trip(model, cfg, tmp_path / "out") <= 1e-5
    _, again = from_transformers(tmp_path / "out")
    assert again.pattern == cfg.pattern and again.family_configs == cfg.family_configs
    perturb = ("model.layers.2.self_attn.q_proj.weight" if extra.get("use_attention_gate") is False
               else "model.layers.4.self_attn.gate_proj.weight")
    assert_same_function_and_control(hf, tmp_path, perturb)
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "C E A.swa E A E C E A E"
    assert cfg.block_options(cfg.parsed.layers[0]).norm_placement == (
        "pre" if extra.get("use_sandwich_norm") is False else "sandwich")


def test_lfm3_proportional_rope_needs_the_reordered_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control for the reordering: with each head's dimensions kept in LFM3's order, amer's partial RoPE
    rotates other pairs and the logits move."""
    hf = build_source(tmp_path, "Lfm3ForCausalLM", "Lfm3Config", **LFM3)
    monkeypatch.setattr("amer.interop.lfm3._reorder", lambda *args: None)
    model, _ = from_transformers(tmp_path)
    with torch.no_grad():
        assert (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max() > 1e-3


def test_lfm3_built_in_amer(tmp_path: Path) -> None:
    """LFM3's layers built in amer (sandwich norms, a sliding variant, partial RoPE on the global layers) export as
    LFM3. Refused by name: a per-channel output gate (LFM3 gates per head; the control ties each head's rows and
    exports), blocks of two norm placements, Llama 3.1 scaling on partial RoPE."""
    from amer import HybridLM, ModelConfig
    from amer.errors import InputError
    from amer.interop import export_transformers

    def config(**over: Any) -> ModelConfig:
        attention = {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "rope_fraction": 0.5,
                     "variants": {"swa": {"window": 4, "rope_fraction": 1.0, "rope_theta": 500.0}},
                     **over.pop("attention", {})}
        return ModelConfig(**{"pattern": "C E A.swa E A E", "d_model": 32, "vocab_size": 64, "max_seq_len": 64,
                              "init_std": 0.1, "norm_placement": "sandwich", "attention": attention,
                              "moe": {"n_experts": 1}, **over})

    torch.manual_seed(0)
    cfg = config()
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    assert export_round_trip(model, cfg, tmp_path / "lfm3") <= 1e-5
    assert json.loads((tmp_path / "lfm3" / "config.json").read_text())["architectures"] == ["Lfm3ForCausalLM"]
    gated = config(attention={"output_gate": True})
    model = HybridLM(gated).eval()
    with pytest.raises(InputError, match="differs within a head"):
        export_transformers(model, gated, tmp_path / "gated")
    with torch.no_grad():
        for block in (model.blocks[2], model.blocks[4]):
            w = block.mixer.gate.weight.view(4, 8, -1)
            w.copy_(w[:, :1].expand_as(w))
    assert export_round_trip(model, gated, tmp_path / "per-head") <= 1e-5
    swa_sandwich = {"variants": {"swa": {"window": 4, "rope_fraction": 1.0, "norm_placement": "sandwich"}}}
    for over, match in ((dict(norm_placement="pre", attention=swa_sandwich), "all pre-normed or all sandwich"),
                        (dict(attention={"rope_scale_factor": 8.0}), "proportional RoPE has linear scaling alone")):
        bad = config(**over)
        with pytest.raises(InputError, match=match):
            export_transformers(HybridLM(bad), bad, tmp_path / "bad")


LFM2_MOE = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4, num_dense_layers=1,
                layer_types=["conv", "full_attention", "conv", "conv"])


@pytest.mark.parametrize("extra", [dict(routed_scaling_factor=1.5), dict(use_expert_bias=False, conv_bias=True),
                                   dict(num_experts_per_tok=1, tie_word_embeddings=False)])
def test_lfm2_moe(tmp_path: Path, extra: dict[str, Any]) -> None:
    """C and attention layers; dense first layers (E.dense), then the sigmoid router with its selection-only expert
    bias, renormalised with an epsilon and scaled."""
    hf = build(tmp_path, "Lfm2MoeForCausalLM", "Lfm2MoeConfig", **{**LFM2_MOE, **extra})
    perturb = "model.layers.2.feed_forward.gate.weight" if "use_expert_bias" in extra else \
        "model.layers.3.feed_forward.expert_bias"
    assert_same_function_and_control(hf, tmp_path, perturb)
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "C E.dense A E C E C E" and cfg.moe.score == "sigmoid"
    assert cfg.moe.expert_bias == ("use_expert_bias" not in extra)


NEMOTRON = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=8, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
                routed_scaling_factor=2.5)


@pytest.mark.parametrize("types,extra", [
    (["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"], dict(n_group=2, topk_group=1)),
    (["linear_attention", "moe", "full_attention", "moe"], dict(moe_latent_size=16)),
])
def test_nemotron_h_moe(tmp_path: Path, types: list[str], extra: dict[str, Any]) -> None:
    """Nemotron-H's moe layers: sigmoid routing with the selection-only correction bias, group-limited top-k, routed
    scaling, squared-ReLU experts and shared expert, a latent width; its MLP layers beside them are E.dense."""
    hf = build(tmp_path, "NemotronHForCausalLM", "NemotronHConfig", layers_block_type=types,
               num_hidden_layers=len(types), **NEMOTRON, **extra)
    assert_same_function_and_control(hf, tmp_path, "backbone.layers.1.mixer.gate.e_score_correction_bias")
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == {6: "M E A E.dense M E", 4: "MEAE"}[len(types)]
    assert cfg.moe.score == "sigmoid" and cfg.moe.activation == "relu2" and cfg.moe.routed_scale == 2.5


def test_multi_token_prediction_weights_are_left_out(tmp_path: Path) -> None:
    """Qwen3-Next's (and Nemotron-H's) checkpoints carry a multi-token-prediction head that the causal LM never runs
    (transformers drops it on load): the import leaves it out; any other weight amer has no place for is still an
    error (negative control)."""
    from safetensors.torch import load_file, save_file

    build(tmp_path, "Qwen3NextForCausalLM", "Qwen3NextConfig", num_hidden_layers=2,
          layer_types=["linear_attention", "full_attention"], **NEXT)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "mtp.fc.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    from_transformers(tmp_path)
    save_file({**weights, "model.layers.0.mlp.extra.weight": torch.zeros(4)}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    refuses(tmp_path, "no place for weight 'model.layers.0.mlp.extra.weight'")


@pytest.mark.parametrize("cls,cfg_cls,kw,edit,message", [
    ("JambaForCausalLM", "JambaConfig", dict(num_hidden_layers=2, **JAMBA), {"hidden_act": "gelu"},
     "hidden_act='gelu'"),
    ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(num_hidden_layers=2, layer_types=["linear_attention",
                                                                                        "full_attention"], **NEXT),
     {"layer_types": ["linear_attention", "sliding_attention"]}, "layer_types must list"),
    ("Lfm2MoeForCausalLM", "Lfm2MoeConfig", LFM2_MOE, {"layer_types": ["conv", "mamba", "conv", "conv"]},
     "layer_types must list conv / full_attention"),
    ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(num_hidden_layers=2, **QWEN_MOE), {"hidden_act": "gelu"},
     "hidden_act='gelu'"),
])
def test_what_amer_cannot_express_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, cls: str,
                                                          cfg_cls: str, kw: dict[str, Any], edit: dict[str, Any],
                                                          message: str) -> None:
    """``amer import`` of a source using something amer lacks: one line naming it, exit code 2, nothing written."""
    from amer.cli import main

    build(tmp_path / "src", cls, cfg_cls, **kw)
    edit_config(tmp_path / "src", **edit)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"cannot import {cls}" in err and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
