"""Importing the classes whose blocks differ in where the norms sit: Gemma 2 and Gemma 3 (text) with sandwich norms,
OLMo 2 with norms after each sub-layer. Same logits as transformers within 1e-5 (fp32), for the full forward and
for token-by-token decoding through amer's caches, each class with a negative control that removes what the
import maps (a soft cap, a RoPE scaling, the post-norms) and sees the logits move; and the export back.

Sources are small random transformers models built here (norm gains and biases perturbed, see test_import.py);
``python -m pytest -s`` prints the measured differences.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import (
    VOCAB,
    assert_refused,
    assert_same_function,
    build_source,
    export_round_trip,
    reference_logits,
    tokens,
)

from amer.errors import InputError
from amer.interop import from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16)
GEMMA2 = dict(SMALL, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
              final_logit_softcapping=3.0)
GEMMA3 = dict(SMALL, sliding_window=4, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})


def same_function(hf: Any, path: Path) -> tuple[float, float]:
    fwd, dec = assert_same_function(hf, path)
    assert fwd <= ATOL and dec <= ATOL, (fwd, dec)
    return fwd, dec


def differs(model: Any, hf: Any) -> float:
    with torch.no_grad():
        return (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max().item()


@pytest.mark.parametrize("tied", [True, False])
def test_gemma2(tmp_path: Path, tied: bool) -> None:
    """Sliding and global layers alternate (window 4 < 12 tokens), both soft caps act; negative control: one layer's
    attention soft cap removed."""
    hf = build_source(tmp_path, "Gemma2ForCausalLM", "Gemma2Config", tie_word_embeddings=tied, attention_bias=not tied,
                      **GEMMA2)
    same_function(hf, tmp_path)
    model, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "A.swa E A E A.swa E A E" and cfg.norm_placement == "sandwich"
    assert cfg.attention.softcap == 1.5 and cfg.logit_softcap == 3.0 and cfg.norm_offset == 1.0
    assert [b.mixer.window for b in model.blocks[::2]] == [4, None, 4, None]
    model.blocks[2].mixer.softcap = None
    assert differs(model, hf) > 100 * ATOL


def test_gemma3(tmp_path: Path) -> None:
    """Per-layer-type RoPE (a local base on the sliding layers, linear scaling on the global one) and (1 + w) q/k
    norms; negative control: the global layer without its linear scaling."""
    hf = build_source(tmp_path, "Gemma3ForCausalLM", "Gemma3TextConfig", **GEMMA3)
    same_function(hf, tmp_path)
    model, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "A.swa E A E A.swa E A.swa E" and cfg.attention.qk_norm
    swa = cfg.family_config("A", "swa")
    assert (cfg.attention.rope_theta, cfg.attention.rope_linear_factor, cfg.attention.window) == (100.0, 4.0, None)
    assert (swa.rope_theta, swa.rope_linear_factor, swa.window) == (10.0, None, 4)
    glob = model.blocks[2].mixer
    glob.cfg_rope = dataclasses.replace(glob.cfg_rope, rope_linear_factor=None)
    glob.init_buffers()
    assert differs(model, hf) > 100 * ATOL
    # a config.json written before per-type RoPE parameters says the same with rope_theta, rope_scaling and
    # rope_local_base_freq
    conf = json.loads((tmp_path / "config.json").read_text())
    del conf["rope_parameters"]
    conf.update(rope_theta=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_local_base_freq=10.0)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    assert from_transformers(tmp_path)[1] == cfg


def test_olmo2(tmp_path: Path) -> None:
    """Norms after each sub-layer and q/k norms over all heads at once; negative control: the post-norms dropped."""
    hf = build_source(tmp_path, "Olmo2ForCausalLM", "Olmo2Config", **SMALL)
    same_function(hf, tmp_path)
    model, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "(AE)*4" and cfg.norm_placement == "post" and cfg.attention.qk_norm_scope == "projection"
    assert model.blocks[0].norm is None and model.blocks[0].mixer.q_norm.weight.shape == (4 * 16,)
    for blk in model.blocks:
        blk.post_norm = None
    assert differs(model, hf) > 100 * ATOL


@pytest.mark.parametrize("cls,cfg_cls,kw,edit,message", [
    ("Gemma2ForCausalLM", "Gemma2Config", GEMMA2, {"hidden_activation": "relu"}, "hidden_activation='relu'"),
    ("Gemma2ForCausalLM", "Gemma2Config", GEMMA2, {"layer_types": ["sliding_attention"] * 3}, "layer_types must list"),
    ("Gemma3ForCausalLM", "Gemma3TextConfig", GEMMA3, {"use_bidirectional_attention": True},
     "use_bidirectional_attention"),
    ("Gemma3ForCausalLM", "Gemma3TextConfig", GEMMA3,
     {"rope_parameters": {"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rope_type='dynamic'"),
    ("Olmo2ForCausalLM", "Olmo2Config", SMALL, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_settings_fail_in_one_line(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any],
                                               edit: dict[str, Any], message: str) -> None:
    build_source(tmp_path, cls, cfg_cls, **kw)
    assert_refused(tmp_path, edit, message)


# ------------------------------------------------------------------------------------------------
# export back: the folder transformers loads computes the same logits


@pytest.mark.parametrize("cls,cfg_cls,kw", [
    ("Gemma2ForCausalLM", "Gemma2Config", GEMMA2),
    ("Gemma3ForCausalLM", "Gemma3TextConfig", GEMMA3),
    ("Olmo2ForCausalLM", "Olmo2Config", dict(SMALL, attention_bias=True, tie_word_embeddings=True)),
])
def test_export_round_trip(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any]) -> None:
    build_source(tmp_path / "src", cls, cfg_cls, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    diff = export_round_trip(model, cfg, tmp_path / "out")
    print(f"export {cls}: {diff:.2e}")
    assert diff <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [cls]
    back, back_cfg = from_transformers(tmp_path / "out")
    assert back_cfg.pattern == cfg.pattern
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_refuses_what_the_norm_classes_cannot_express(tmp_path: Path) -> None:
    """Sandwich or post norms with options no Gemma / OLMo 2 class has are refused by name, and a model whose norm
    placement or residual options are off the default no longer exports as Llama."""
    from amer import HybridLM, ModelConfig
    from amer.interop import export_transformers

    base = dict(d_model=32, vocab_size=VOCAB, max_seq_len=64, moe={"n_experts": 1, "d_ff": 48})
    cases = [
        (dict(pattern="(AE)*2", norm_placement="sandwich", norm_offset=1.0, embed_scale=32 ** 0.5), "activation"),
        (dict(pattern="(AE)*2", norm_placement="post"), "qk_norm"),
        (dict(pattern="(AE)*2", attention={"residual_multiplier": 0.5}), "residual_multiplier"),
        (dict(pattern="(AE)*2", moe={"n_experts": 1, "norm_placement": "post"}), "mix norm placements"),
    ]
    for kw, message in cases:
        cfg = ModelConfig(**{**base, **kw})
        with pytest.raises(InputError, match=message):
            export_transformers(HybridLM(cfg), cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_llama_linear_rope_scaling(tmp_path: Path) -> None:
    """RoPE's linear scaling (``rope_type`` linear) is ``attention.rope_linear_factor`` for any Llama-style class;
    negative control: the same weights without it."""
    rope = {"rope_type": "linear", "rope_theta": 100.0, "factor": 3.0}
    hf = build_source(tmp_path, "LlamaForCausalLM", "LlamaConfig", rope_parameters=rope,
                      **{k: v for k, v in SMALL.items() if k != "head_dim"})
    same_function(hf, tmp_path)
    model, cfg = from_transformers(tmp_path)
    assert cfg.attention.rope_linear_factor == 3.0
    for blk in model.blocks[::2]:
        blk.mixer.cfg_rope = dataclasses.replace(cfg.attention, rope_linear_factor=None)
        blk.mixer.init_buffers()
    assert differs(model, hf) > 100 * ATOL


def test_gemma3_multimodal_folder(tmp_path: Path) -> None:
    """A ``Gemma3ForConditionalGeneration`` folder (how the larger Gemma 3 models are published): its language model
    imports as ``Gemma3ForCausalLM`` (settings under ``text_config``, weights under ``language_model.model.``, the
    vision tower and projector left out); same logits as the multimodal model on text. Negative control: a language
    model weight perturbed in the folder moves amer's logits."""
    from test_import import assert_same_function_and_control

    text = {**GEMMA3, "vocab_size": 64, "initializer_range": 0.1}
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4)
    torch.manual_seed(0)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=60, eoi_token_index=61, image_token_index=62)
    hf = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    assert_same_function_and_control(hf, tmp_path, "language_model.model.layers.1.self_attn.k_proj.weight")
    _, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "A.swa E A E A.swa E A.swa E" and cfg.tie_embeddings
