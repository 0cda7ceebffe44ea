"""Importing the classes built on multi-head latent attention, KDA and lightning attention with MoE feed-forwards:
DeepSeek-V3 (MLA + dense first layers + group-limited sigmoid routing), Kimi Linear (KDA + position-free MLA + the
same routing) and MiniMax (lightning + softmax attention + Mixtral routing, post-norm residual factors). Same logits
as transformers within 1e-5 (fp32), for the full forward and for token-by-token decoding through amer's caches, each
class with a negative control that removes what the import maps and sees the logits move; all three export back.

Sources are small random transformers models built here (norm gains, biases and the routers' correction biases
perturbed, see test_import.py); ``python -m pytest -s`` prints the measured differences.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import VOCAB, assert_refused, assert_same_function, export_round_trip, reference_logits, tokens

from amer.errors import CheckpointError
from amer.interop import from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
DEEPSEEK = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                topk_group=2, first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=2.5, q_lora_rank=16,
                kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64)
YARN = {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
KIMI = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, num_experts=8, num_experts_per_token=2, num_shared_experts=1, kv_lora_rank=8,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            linear_attn_config={"head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 4, "kda_layers": [1, 2, 4],
                                "full_attn_layers": [3]})
MINIMAX = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, num_local_experts=4, num_experts_per_tok=2, block_size=4,
               layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
               full_attn_alpha_factor=1.3, full_attn_beta_factor=0.7, linear_attn_alpha_factor=0.9,
               linear_attn_beta_factor=1.2, mlp_alpha_factor=1.1, mlp_beta_factor=0.8)


def build(path: Path, cls: str, cfg_cls: str, seed: int = 0, **kw: Any) -> Any:
    """A random transformers model saved to ``path``: 1-D weights and the routers' correction biases perturbed."""
    torch.manual_seed(seed)
    kw.setdefault("vocab_size", VOCAB)
    kw.setdefault("initializer_range", 0.1)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kw)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "A_log" not in name:
                p.add_(0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.3, 0.3)
    model.save_pretrained(path)
    return model


def same_function(hf: Any, path: Path) -> None:
    fwd, dec = assert_same_function(hf, path)
    assert fwd <= ATOL and dec <= ATOL, (fwd, dec)


def differs(model: Any, hf: Any) -> float:
    with torch.no_grad():
        return (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max().item()


@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_deepseek_v3(tmp_path: Path, rope: str) -> None:
    """MLA with interleaved rotary rows (and YaRN), a dense first layer (E.dense), then group-limited sigmoid routing
    with a correction bias, routed scaling and two shared experts; negative control: the correction bias zeroed."""
    kw = dict(DEEPSEEK, rope_parameters=YARN) if rope == "yarn" else DEEPSEEK
    hf = build(tmp_path, "DeepseekV3ForCausalLM", "DeepseekV3Config", **kw)
    same_function(hf, tmp_path)
    model, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "D E.dense (D E)*2"
    assert cfg.family_config("E", "dense").n_experts == 1 and cfg.moe.n_groups == 4 and cfg.moe.n_shared_experts == 2
    assert (cfg.mla.yarn_factor == 4.0) == (rope == "yarn")
    for blk in model.blocks[3::2]:
        blk.mixer.expert_bias.zero_()
    assert differs(model, hf) > 100 * ATOL


def test_deepseek_v3_leaves_out_the_multi_token_prediction_layers(tmp_path: Path) -> None:
    """A checkpoint holding DeepSeek's MTP module (``model.layers.<L>.*``) imports the causal LM alone, as
    transformers loads it; any other unknown weight is still an error."""
    from safetensors.torch import load_file, save_file

    hf = build(tmp_path, "DeepseekV3ForCausalLM", "DeepseekV3Config", **DEEPSEEK)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors.update({"model.layers.3.enorm.weight": torch.ones(32), "model.layers.3.eh_proj.weight": torch.ones(32, 64)})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    same_function(hf, tmp_path)
    tensors["model.layers.1.mlp.extra.weight"] = torch.ones(2)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.extra.weight"):
        from_transformers(tmp_path)


def test_kimi_linear(tmp_path: Path) -> None:
    """KDA layers (per-channel decay, sigmoid output gate), a position-free MLA layer, a dense first feed-forward,
    sigmoid routing with a shared expert; negative control: KDA's output gate through silu instead of a sigmoid."""
    hf = build(tmp_path, "KimiLinearForCausalLM", "KimiLinearConfig", **KIMI)
    same_function(hf, tmp_path)
    model, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "G E.dense G E D E G E"
    assert cfg.deltanet.gate == "channel" and not cfg.mla.rope and cfg.moe.score == "sigmoid"
    kda = model.blocks[2].mixer
    kda.cfg = dataclasses.replace(kda.cfg, output_gate="silu")
    assert differs(model, hf) > 100 * ATOL
    # the model's own config.json names the layer kinds in linear_attn_config only, and some settings differently
    conf = json.loads((tmp_path / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim"):
        del conf[key]
    conf.update(first_k_dense_replace=1, moe_layer_freq=1, moe_router_activation_func="sigmoid")
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert from_transformers(tmp_path)[1] == cfg


@pytest.mark.parametrize("window,rope", [(None, None), (5, {"rope_type": "default", "rope_theta": 100.0,
                                                             "partial_rotary_factor": 0.5})])
def test_minimax(tmp_path: Path, window: int | None, rope: dict[str, Any] | None) -> None:
    """Lightning and softmax attention layers (with a sliding window), Mixtral routing, and MiniMax's residual
    factors as block options (a partial_rotary_factor in the config is not read by MiniMax's RoPE); negative control:
    one block's factors back at 1."""
    hf = build(tmp_path, "MiniMaxForCausalLM", "MiniMaxConfig", sliding_window=window, rope_parameters=rope, **MINIMAX)
    same_function(hf, tmp_path)
    model, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "(NE)*2 AE NE" and cfg.attention.window == window
    assert [b.residual_multiplier for b in model.blocks[:6]] == [0.9, 1.1, 0.9, 1.1, 1.3, 1.1]
    model.blocks[4].residual_multiplier = 1.0
    assert differs(model, hf) > 100 * ATOL


def test_minimax_repeating_layers_are_written_once(tmp_path: Path) -> None:
    kw = dict(MINIMAX, num_hidden_layers=8, layer_types=["linear_attention"] * 3 + ["full_attention"] + (
        ["linear_attention"] * 3 + ["full_attention"]))
    build(tmp_path, "MiniMaxForCausalLM", "MiniMaxConfig", **kw)
    assert from_transformers(tmp_path)[1].pattern == "(NENENEAE)*2"


@pytest.mark.parametrize("cls,cfg_cls,kw,edit,message", [
    ("DeepseekV3ForCausalLM", "DeepseekV3Config", DEEPSEEK, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("DeepseekV3ForCausalLM", "DeepseekV3Config", DEEPSEEK, {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("KimiLinearForCausalLM", "KimiLinearConfig", KIMI, {"layer_types": ["linear_attention"] * 3},
     "layer_types must list"),
    ("KimiLinearForCausalLM", "KimiLinearConfig", KIMI, {"mlp_layer_types": ["dense", "moe", "moe", "moe"]},
     "mlp_layer_types must list"),
    ("KimiLinearForCausalLM", "KimiLinearConfig", KIMI, {"moe_router_activation_func": "softmax"},
     "moe_router_activation_func='softmax'"),
    ("MiniMaxForCausalLM", "MiniMaxConfig", MINIMAX, {"layer_types": ["hybrid"] * 4}, "layer_types must list"),
])
def test_unsupported_settings_fail_in_one_line(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any],
                                               edit: dict[str, Any], message: str) -> None:
    build(tmp_path, cls, cfg_cls, **kw)
    assert_refused(tmp_path, edit, message)


# ------------------------------------------------------------------------------------------------
# export back: the folder transformers loads computes the same logits


@pytest.mark.parametrize("cls,cfg_cls,kw", [
    ("DeepseekV3ForCausalLM", "DeepseekV3Config", DEEPSEEK),
    ("DeepseekV3ForCausalLM", "DeepseekV3Config", dict(DEEPSEEK, rope_parameters=YARN, first_k_dense_replace=0,
                                                       q_lora_rank=None, attention_bias=True)),
    ("KimiLinearForCausalLM", "KimiLinearConfig", KIMI),
    ("KimiLinearForCausalLM", "KimiLinearConfig", dict(KIMI, q_lora_rank=16, num_experts_per_token=1,
                                                       mlp_layer_types=["sparse", "dense", "sparse", "dense"])),
    ("MiniMaxForCausalLM", "MiniMaxConfig", dict(MINIMAX, sliding_window=5)),
    ("MiniMaxForCausalLM", "MiniMaxConfig", dict(MINIMAX, num_experts_per_tok=1,
                                                 layer_types=["linear_attention"] * 4)),
])
def test_export_round_trip(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any]) -> None:
    build(tmp_path / "src", cls, cfg_cls, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    diff = export_round_trip(model, cfg, tmp_path / "out")
    print(f"export {cls}: {diff:.2e}")
    assert diff <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [cls]
    back, back_cfg = from_transformers(tmp_path / "out")
    assert back_cfg.pattern == cfg.pattern
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_refuses_what_the_classes_cannot_express(tmp_path: Path) -> None:
    """Patterns and options DeepseekV3ForCausalLM, KimiLinearForCausalLM and MiniMaxForCausalLM lack are refused by
    name, and nothing is written."""
    from amer import HybridLM, ModelConfig
    from amer.errors import InputError
    from amer.interop import export_transformers

    mla = {"n_heads": 4, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
    routed = {"n_experts": 4, "top_k": 2, "d_ff": 16, "score": "sigmoid", "shared_expert": True}
    dense = {"variants": {"dense": {"n_experts": 1, "d_ff": 48, "shared_expert": False}}}
    kda = {"n_k_heads": 4, "gate": "channel", "output_gate": "sigmoid", "out_gate_rank": 8}
    lightning = {"n_heads": 4, "depth_stride": 2, "norm_eps": 1e-6}
    mixtral = {"n_experts": 4, "top_k": 2, "d_ff": 16}
    cases = [
        (dict(pattern="(D E)*2", moe={**routed, "score": "softmax"}), "moe.score sigmoid"),
        (dict(pattern="G E D E", deltanet={"gate": "channel", "n_k_heads": 4}, moe=routed), "has no position encoding"),
        (dict(pattern="D E D M", moe=routed), "layers of D each followed by a feed-forward"),
        (dict(pattern="D E D E.dense", moe={**routed, **dense}), "dense feed-forward layers must all come first"),
        (dict(pattern="(D E)*2", moe={**routed, "shared_expert": False}), "always has shared experts"),
        (dict(pattern="(D E)*2", moe={**routed, "activation": "relu2"}), "SwiGLU"),
        (dict(pattern="(G E)*2", deltanet={**kda, "output_gate": "silu"}, moe=routed), "output_gate='silu'"),
        (dict(pattern="(N E)*2", lightning=lightning, moe=mixtral), "residual from their normed input"),
        (dict(pattern="(N E)*2", lightning={**lightning, "depth_stride": 1, "residual_normed": True},
              moe={**mixtral, "residual_normed": True}), "depth_stride 2"),
        (dict(pattern="(N E)*2", lightning={**lightning, "residual_normed": True},
              moe={**mixtral, "score": "sigmoid", "residual_normed": True}), "route as Mixtral"),
    ]
    for kw, message in cases:
        cfg = ModelConfig(**{"d_model": 32, "vocab_size": VOCAB, "max_seq_len": 64, "norm_eps": 1e-6, "mla": mla, **kw})
        with pytest.raises(InputError, match=message):
            export_transformers(HybridLM(cfg), cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_position_free_mla_with_a_yarn_softmax_scale_is_refused_for_kimi(tmp_path: Path) -> None:
    """Without RoPE, YaRN's frequencies do nothing but its mscale_all_dim still scales every softmax, which a Kimi
    Linear folder has no place for: refused by name (it exported, 0.24 off). Control: YaRN without that scale, which
    changes nothing here, still exports and round trips."""
    from amer import HybridLM, ModelConfig
    from amer.errors import InputError
    from amer.interop import export_transformers

    def model(**yarn: Any) -> tuple[Any, Any]:
        cfg = ModelConfig(pattern="D E", d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1, norm_eps=1e-6,
                          mla={"n_heads": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                               "v_head_dim": 8, "rope": False, "norm_eps": 1e-6, "yarn_factor": 40.0, **yarn},
                          moe={"n_experts": 4, "top_k": 2, "d_ff": 24, "score": "sigmoid", "expert_bias": True,
                               "shared_expert": True})
        torch.manual_seed(0)
        return HybridLM(cfg).eval(), cfg

    with pytest.raises(InputError, match="mla.yarn_mscale_all_dim=1.0 with mla.yarn_factor scales the softmax"):
        export_transformers(*model(yarn_mscale_all_dim=1.0), tmp_path / "x")
    assert export_round_trip(*model(), tmp_path / "ok") <= ATOL
