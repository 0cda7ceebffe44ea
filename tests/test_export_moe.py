"""Exporting MoE models and the hybrids around them back to transformers (``amer export --format transformers``):
Jamba, Qwen3-Next, Granite-4.0-H (GraniteMoeHybrid), Qwen2-MoE, Qwen3-MoE, OLMoE, LFM2-MoE and Lara-4-Mini, each a
round trip (transformers -> amer -> a transformers folder -> ``AutoModelForCausalLM.from_pretrained``) to 1e-5 in the
logits, and models built in amer with those patterns; what a class cannot express is refused by name, in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import VOCAB, export_round_trip, tokens, word_tokenizer
from test_import_moe import JAMBA, LFM2_MOE, NEMOTRON, NEXT, QWEN_MOE, build

from amer import HybridLM, ModelConfig
from amer.errors import InputError
from amer.interop import export_transformers, from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
HYBRID = dict(hidden_size=32, intermediate_size=16, num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=4,
              mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=8, shared_intermediate_size=24)


CASES = [
    ("JambaForCausalLM", "JambaConfig", dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1,
                                             expert_layer_period=2, expert_layer_offset=0, **JAMBA)),
    ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3],
                                                     attention_bias=True, layer_types=["linear_attention",
                                                     "full_attention", "linear_attention", "linear_attention"],
                                                     **NEXT)),
    ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", dict(
        num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], num_local_experts=4, num_experts_per_tok=2,
        embedding_multiplier=1.7, residual_multiplier=0.6, attention_multiplier=0.4, logits_scaling=0.5,
        position_embedding_type="rope", **HYBRID)),
    ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", dict(
        num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"], num_local_experts=0, **HYBRID)),
    ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3],
                                                   shared_expert_intermediate_size=24, use_sliding_window=True,
                                                   sliding_window=3, max_window_layers=2, **QWEN_MOE)),
    ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=True,
                                                   head_dim=16, **QWEN_MOE)),
    ("OlmoeForCausalLM", "OlmoeConfig", dict(num_hidden_layers=2, intermediate_size=16, num_experts=8,
                                             num_experts_per_tok=2, hidden_size=32, num_attention_heads=4,
                                             num_key_value_heads=2)),
    ("Lfm2MoeForCausalLM", "Lfm2MoeConfig", dict(routed_scaling_factor=1.5, conv_bias=True, **LFM2_MOE)),
    ("NemotronHForCausalLM", "NemotronHConfig", dict(layers_block_type=["linear_attention", "moe", "full_attention",
                                                                        "mlp", "linear_attention", "moe"],
                                                     num_hidden_layers=6, n_group=2, topk_group=1, **NEMOTRON)),
    ("NemotronHForCausalLM", "NemotronHConfig", dict(layers_block_type=["linear_attention", "moe", "moe"],
                                                     num_hidden_layers=3, moe_latent_size=16, **NEMOTRON)),
]


@pytest.mark.parametrize("cls,cfg_cls,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_round_trip(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any]) -> None:
    build(tmp_path / "src", cls, cfg_cls, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [cls]
    _, again = from_transformers(tmp_path / "out")  # and the exported folder imports to the same model
    assert again.pattern == cfg.pattern and again.family_variants == cfg.family_variants


def fresh(pattern: str, **kw: Any) -> tuple[HybridLM, ModelConfig]:
    """A model built in amer (as trained here; initialised with a wide spread so routing and gates vary)."""
    cfg = ModelConfig(pattern=pattern, d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1, **kw)
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and not name.endswith(("A_log", ".D", "dt_bias")):
                p.add_(0.2 * torch.randn_like(p))
    return model, cfg


ROUTED = {"n_experts": 4, "top_k": 2, "d_ff": 24}
DENSE = {"variants": {"dense": {"n_experts": 1}}}


@pytest.mark.parametrize("cls,pattern,kw", [
    ("JambaForCausalLM", "(S E.dense A E S E.dense S E)*2",
     dict(attention={"rope_fraction": 0.0}, mamba1={"dt_bc_norm": "weighted", "dt_bc_norm_eps": 1e-5, "d_state": 8},
          moe={**ROUTED, "renormalize": False, **DENSE})),
    ("Qwen3NextForCausalLM", "G E.dense G E A E",
     dict(norm_offset=1.0, attention={"qk_norm": True, "output_gate": True, "rope_fraction": 0.5, "head_dim": 16},
          deltanet={"n_k_heads": 2, "n_v_heads": 4, "head_k_dim": 16},
          moe={**ROUTED, "shared_expert": True, "n_shared_experts": 2, "d_ff_shared": 8, "shared_expert_gate": True,
               "variants": {"dense": {"n_experts": 1, "shared_expert": False, "shared_expert_gate": False}}})),
    ("GraniteMoeHybridForCausalLM", "MEAEME", dict(mamba={"head_dim": 16, "d_state": 16, "chunk_size": 8},
                                                   moe={**ROUTED, "shared_expert": True, "renormalize_top1": True})),
    ("NemotronHForCausalLM", "MAEME.dense", dict(
        attention={"rope_fraction": 0.0}, mamba={"head_dim": 16, "d_state": 16, "chunk_size": 8},
        moe={**ROUTED, "activation": "relu2", "score": "sigmoid", "expert_bias": True, "shared_expert": True,
             "n_groups": 2, "topk_groups": 1, "routed_scale": 2.0,
             "variants": {"dense": {"n_experts": 1, "shared_expert": False, "n_groups": 1, "topk_groups": 1}}})),
])
def test_models_built_in_amer(tmp_path: Path, cls: str, pattern: str, kw: dict[str, Any]) -> None:
    """A hybrid trained in amer is served by transformers: its pattern exported as the class that expresses it (a
    Qwen3-Next model with norm_offset 0 would be written with its gains shifted; here the offset is Qwen's own)."""
    model, cfg = fresh(pattern, **kw)
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [cls]


def test_qwen3_next_gains_shift_with_the_norm_offset(tmp_path: Path) -> None:
    """amer's plain RMSNorm gains (norm_offset 0) are written as Qwen3-Next's 1 + w; negative control: the folder's
    final norm perturbed, the round trip fails."""
    model, cfg = fresh("G E A E", attention={"qk_norm": True, "output_gate": True, "rope_fraction": 0.25,
                                             "head_dim": 16},
                       deltanet={"n_k_heads": 2, "head_k_dim": 16}, moe={"n_experts": 1, "d_ff": 24})
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "out" / "model.safetensors")
    weights["model.norm.weight"] += 0.1
    save_file(weights, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    with torch.no_grad():
        assert (hf(input_ids=tokens()).logits - model(tokens(), taps=False).logits).abs().max() > 100 * ATOL


@pytest.mark.parametrize("pattern,kw,message", [
    ("S E A E A E S E", dict(attention={"rope_fraction": 0.0}, mamba1={"dt_bc_norm": "weighted",
                                                                        "dt_bc_norm_eps": 1e-5},
                              moe={**ROUTED, "renormalize": False}), "attention layers are not periodic"),
    ("SEAE", dict(attention={"rope_fraction": 0.0}, moe={**ROUTED, "renormalize": False}), "mamba1.dt_bc_norm"),
    ("SEAE", dict(attention={"rope_fraction": 0.0}, mamba1={"dt_bc_norm": "weighted", "dt_bc_norm_eps": 1e-5},
                  moe=ROUTED), "raw top-k probabilities"),
    ("GEAE", dict(attention={"qk_norm": True}, moe=ROUTED), "output gate"),
    ("GEAE", dict(attention={"qk_norm": True, "output_gate": True}, moe={**ROUTED, "score": "sigmoid"}),
     "moe.score='sigmoid' has no counterpart in Qwen3NextForCausalLM"),
    ("MEAE.dense", dict(mamba={"head_dim": 16}, moe={**ROUTED, "shared_expert": True,
                                                      "variants": {"dense": {"n_experts": 1, "shared_expert": False}}}),
     "all routed or all dense"),
    ("AEAE", dict(attention={"qk_norm": True}, moe={**ROUTED, "expert_bias": True}), "moe.expert_bias"),
    ("A E A E.dense", dict(moe={**ROUTED, **DENSE}), "a shared expert with a sigmoid gate"),
    ("CEAE", dict(attention={"qk_norm": True}, moe=ROUTED), "sigmoid"),
    ("MAEM", dict(attention={"rope_fraction": 0.0}, moe={"n_experts": 1}), "feed-forwards are relu2"),
    ("MAEM", dict(moe={"n_experts": 1, "activation": "relu2"}), "no position encoding"),
    ("AEAE", dict(attention={"qk_norm": True}, moe={**ROUTED, "update_multiplier": 0.5}),
     r"E \(layer 1\) has the block option update_multiplier=0.5, which Qwen3MoeForCausalLM lacks"),
    # options the Llama-style classes have no counterpart for (written as if absent, they are another function)
    # (an output gate is Qwen3-Next's alone: that class is named, with what else its attention has)
    ("AEAE", dict(attention={"output_gate": True}, moe={"n_experts": 1}), r"Qwen3NextForCausalLM's attention has "
     r"per-head q/k norms and an output gate"),
    ("AEAE", dict(attention={"softcap": 2.0}, moe=ROUTED), r"attention.softcap=2.0 has no counterpart"),
    ("AEAE", dict(attention={"qk_norm": True, "qk_norm_scope": "projection"}, moe={"n_experts": 1}),
     r"attention.qk_norm_scope='projection' has no counterpart"),
    ("AEAE", dict(attention={"window": 4, "qkv_bias": True, "out_bias": True}, moe={"n_experts": 1}),
     r"MistralForCausalLM \(sliding-window attention\) has no attention biases"),
    # capacity dispatch drops tokens in evaluation too; every target class's experts are dropless
    ("AEAE", dict(moe={**ROUTED, "dispatch": "capacity"}), r"moe.dispatch='capacity' has no counterpart in "
     "MixtralForCausalLM"),
    ("AEAE", dict(attention={"qk_norm": True}, moe={**ROUTED, "renormalize": False, "dispatch": "capacity"}),
     r"moe.dispatch='capacity' has no counterpart in Qwen3MoeForCausalLM"),
    ("(NE)*2 AE", dict(attention={"n_heads": 4, "head_dim": 8, "residual_normed": True},
                       moe={**ROUTED, "residual_normed": True, "input_multiplier": 1.2},
                       lightning={"n_heads": 4, "head_dim": 8, "depth_stride": 2, "norm_eps": 1e-6,
                                  "residual_normed": True}),
     r"E has the block option input_multiplier=1.2, which MiniMaxForCausalLM lacks"),
])
def test_what_the_classes_cannot_express_is_refused(tmp_path: Path, pattern: str, kw: dict[str, Any],
                                                    message: str) -> None:
    model, cfg = fresh(pattern, **{"mamba": {"head_dim": 16}, **kw})
    with pytest.raises(InputError, match=message) as info:
        export_transformers(model, cfg, tmp_path / "x")
    assert "\n" not in str(info.value) and not (tmp_path / "x").exists()


def test_cli_exports_an_imported_hybrid_and_refuses_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``amer import`` then ``amer export --format transformers`` of a Jamba folder: transformers loads it with the
    same logits; a pattern no class expresses (Jamba's layout with its attention layers not periodic) is one line on
    stderr and exit code 2, nothing written."""
    from amer.cli import main
    from amer.hub import save_pretrained

    hf = build(tmp_path / "src", "JambaForCausalLM", "JambaConfig", num_hidden_layers=4, attn_layer_period=2,
               attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0, **JAMBA)
    word_tokenizer(tmp_path / "src")  # as a hub checkpoint has: the export writes it back with its special ids
    assert main(["import", str(tmp_path / "src"), str(tmp_path / "amer")]) == 0
    assert main(["export", str(tmp_path / "amer"), str(tmp_path / "hf"), "--format", "transformers"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    with torch.no_grad():
        assert (back(input_ids=tokens()).logits - hf(input_ids=tokens()).logits).abs().max() <= ATOL
    model, cfg = fresh("S E A E A E S E", attention={"rope_fraction": 0.0},
                       mamba1={"dt_bc_norm": "weighted", "dt_bc_norm_eps": 1e-5}, moe={**ROUTED, "renormalize": False})
    save_pretrained(model, tmp_path / "odd")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "odd"), str(tmp_path / "x"), "--format", "transformers"]) == 2
    err = capsys.readouterr().err
    assert "attention layers are not periodic" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_settings_without_effect_do_not_block_an_export(tmp_path: Path) -> None:
    """The control of the field-by-field refusals: a q/k norm scope without q/k norms, Llama 3.1 factors without its
    scale factor and a capacity factor under dropless dispatch change nothing, and the model round trips."""
    model, cfg = fresh("AEAE", attention={"qk_norm_scope": "projection", "rope_scale_low": 2.0},
                       moe={**ROUTED, "renormalize_top1": True, "capacity_factor": 0.5})
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL


ATTENTION_ONLY = [
    ("Qwen3NextForCausalLM", "Qwen3NextConfig", dict(NEXT, num_hidden_layers=2, layer_types=["full_attention"] * 2)),
    ("JambaForCausalLM", "JambaConfig", dict(JAMBA, num_hidden_layers=2, attn_layer_period=1, attn_layer_offset=0,
                                             expert_layer_period=1, expert_layer_offset=0)),
    ("Lfm2MoeForCausalLM", "Lfm2MoeConfig", dict(LFM2_MOE, layer_types=["full_attention"] * 4)),
    ("MiniMaxForCausalLM", "MiniMaxConfig", "MINIMAX"),
]


@pytest.mark.parametrize("cls,cfg_cls,kw", ATTENTION_ONLY, ids=[c[0] for c in ATTENTION_ONLY])
def test_attention_only_hybrids_export_as_their_class(tmp_path: Path, cls: str, cfg_cls: str, kw: Any) -> None:
    """A hybrid checkpoint whose layers are all attention (an ablation, a distilled stack) exports as its own class:
    what its attention or router has is that class's alone (Qwen3-Next's output gate, Jamba's position-free attention
    before routed experts, LFM2-MoE's sigmoid router after per-head q/k norms, MiniMax's residual_normed blocks).
    They were routed to Qwen3-MoE, Qwen2-MoE or Mixtral and refused there."""
    if kw == "MINIMAX":
        from test_import_latent import MINIMAX

        kw = dict(MINIMAX, layer_types=["full_attention"] * 4)
    build(tmp_path / "src", cls, cfg_cls, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    assert {str(layer.family) for layer in cfg.parsed.layers} == {"A", "E"}
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [cls]


@pytest.mark.parametrize("types", [["full_attention", "mlp"], ["mlp", "mlp"], ["full_attention", "mlp", "mlp"]])
def test_nemotron_h_without_mamba_layers(tmp_path: Path, types: list[str]) -> None:
    """Nemotron-H layouts without Mamba-2 layers (attention and squared-ReLU MLPs): squared-ReLU MLPs are the class's
    alone, so they export as Nemotron-H (they were routed by the absence of M and refused)."""
    build(tmp_path / "src", "NemotronHForCausalLM", "NemotronHConfig", layers_block_type=types,
          num_hidden_layers=len(types), **NEMOTRON)
    model, cfg = from_transformers(tmp_path / "src")
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["NemotronHForCausalLM"]


TRAIT_CASES = [  # (a model that has one hybrid class's defining trait and settings that class lacks, what is named)
    (dict(pattern="MMM", mamba={"head_dim": 16, "residual_normed": True}), "residual_normed=True, which Mamba2"),
    (dict(pattern="A E A.swa E", attention={"qkv_bias": True, "rope_fraction": 0.5, "variants": {"swa": {"window": 4}}},
          moe={"n_experts": 1}), "rope_fraction=0.5 has no counterpart in Qwen2ForCausalLM"),
    (dict(pattern="(AE)*2", attention={"qk_norm": True, "rope_fraction": 0.5}, moe={"n_experts": 1}),
     "rope_fraction=0.5 has no counterpart in the Llama, Mistral, Qwen3"),
    (dict(pattern="A.swa E A E", norm_placement="sandwich", norm_offset=1.0, embed_scale=32 ** 0.5, logit_softcap=30.0,
          attention={"softcap": 20.0, "rope_fraction": 0.0, "variants": {"swa": {"window": 4}}},
          moe={"n_experts": 1, "activation": "gelu_tanh"}), "rope_fraction=0.0 has no counterpart in Gemma2"),
    (dict(pattern="(AE)*2", norm_placement="post", moe={"n_experts": 1},
          attention={"qk_norm": True, "qk_norm_scope": "projection", "output_gate": True}),
     "output_gate=True has no counterpart in Olmo2ForCausalLM"),
    (dict(pattern="(AE)*2", attention={"qk_norm": True, "rope_fraction": 0.0}, moe={"n_experts": 4}),
     "rope_fraction=0.0 has no counterpart in Qwen3MoeForCausalLM"),
    (dict(pattern="(AE)*2", attention={"qk_norm": True}, moe={"n_experts": 1, "activation": "relu2"}),
     "moe.activation='relu2' has no counterpart in the Llama, Mistral and Qwen3 classes"),
]


@pytest.mark.parametrize("kw,message", TRAIT_CASES, ids=range(len(TRAIT_CASES)))
def test_a_trait_sends_attention_stacks_to_a_hybrid_only_when_it_fits(tmp_path: Path, kw: dict[str, Any],
                                                                       message: str) -> None:
    """Attention-only stacks go to a hybrid class for its defining trait (an output gate, position-free attention,
    squared-ReLU MLPs, residual_normed blocks, partial RoPE) only when the rest of their layout is that class's;
    otherwise the class the model is closest to names the setting the user changed, not the hybrid's defaults."""
    cfg = ModelConfig(d_model=32, vocab_size=VOCAB, max_seq_len=64, **kw)
    with pytest.raises(InputError, match=message):
        export_transformers(HybridLM(cfg), cfg, tmp_path / "x")


def lara_config(pattern: str = "G E A.swa E G E A E", **over: Any) -> ModelConfig:
    """Lara-4-Mini's layers built in amer: DeltaNet, sliding-window attention with RoPE, global attention without."""
    attention = {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "rope_fraction": 0.0,
                 "variants": {"swa": {"window": 5, "rope_fraction": 1.0}}, **over.pop("attention", {})}
    moe = {"n_experts": 4, "top_k": 2, "d_ff": 16, "shared_expert": True, "d_ff_shared": 24, **over.pop("moe", {})}
    return ModelConfig(pattern=pattern, d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1,
                       attention=attention, deltanet={"n_k_heads": 2, "n_v_heads": 4}, moe=moe, **over)


def test_lara_mini_built_in_amer(tmp_path: Path) -> None:
    """A model built in amer with Lara-4-Mini's layers (norms and biases moved off their initial values) is served by
    transformers with the same logits; its folder names the layer kinds. The same stack with a gated shared expert
    and an output gate is Qwen3-Next's (control: the trait decides the class)."""
    torch.manual_seed(0)
    cfg = lara_config()
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    assert export_round_trip(model, cfg, tmp_path / "lara") <= ATOL
    conf = json.loads((tmp_path / "lara" / "config.json").read_text())
    assert conf["architectures"] == ["LaraMiniForCausalLM"] and conf["sliding_window"] == 5
    assert conf["layer_types"] == ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]
    gated = lara_config("G E A E", attention={"output_gate": True, "rope_fraction": 0.25, "variants": {}},
                        moe={"shared_expert_gate": True}, norm_offset=1.0)
    export_transformers(HybridLM(gated), gated, tmp_path / "next")
    assert json.loads((tmp_path / "next" / "config.json").read_text())["architectures"] == ["Qwen3NextForCausalLM"]


@pytest.mark.parametrize("pattern,attention", [
    ("A.swa E A E", {}),
    ("G E A.swa E A.g E", {"variants": {"swa": {"window": 5, "rope_fraction": 1.0, "n_kv_heads": 4},
                                        "g": {"n_kv_heads": 4}}}),
    ("G E A.swa E A E", {"rope_theta": 77.0}),
], ids=["attention-only", "variants-own-heads", "global-rope-base"])
def test_lara_mini_layouts(tmp_path: Path, pattern: str, attention: dict[str, Any]) -> None:
    """Attention layers alone with Lara-4-Mini's experts go to its class too; attention layers that are all variants
    are written from their own configuration (here 4 KV heads, the family table 2); a global layer's RoPE base,
    unused, may differ from the sliding layers'."""
    torch.manual_seed(0)
    cfg = lara_config(pattern, attention=attention)
    model = HybridLM(cfg).eval()
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LaraMiniForCausalLM"]


@pytest.mark.parametrize("over,match", [
    (dict(attention={"variants": {"swa": {"window": 5, "rope_fraction": 0.5}}}), "either a window with RoPE"),
    (dict(attention={"rope_fraction": 1.0}), "either a window with RoPE on whole heads or neither"),
    (dict(pattern="G E A.swa E A.w E", attention={"variants": {"swa": {"window": 5, "rope_fraction": 1.0},
                                                               "w": {"window": 7, "rope_fraction": 1.0}}}),
     "one sliding_window"),
    (dict(pattern="G E A.swa E A.h E", attention={"variants": {"swa": {"window": 5, "rope_fraction": 1.0},
                                                               "h": {"n_kv_heads": 4}}}),
     "differ in more than the window and RoPE"),
    (dict(pattern="G E G E.d", moe={"variants": {"d": {"n_experts": 1, "shared_expert": False}}}),
     "routes every layer"),
    (dict(norm_offset=1.0), "model.norm_offset=1.0 has no counterpart in LaraMiniForCausalLM"),
], ids=["partial-rope", "global-rope", "two-windows", "two-configs", "dense-layer", "norm-offset"])
def test_what_lara_mini_cannot_express_is_refused(tmp_path: Path, over: dict[str, Any], match: str) -> None:
    cfg = lara_config(**over)
    with pytest.raises(InputError, match=match):
        export_transformers(HybridLM(cfg), cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
