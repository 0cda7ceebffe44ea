"""Exporting Griffin's layers (``RE`` / ``AE`` with biased GeGLU feed-forwards) as ``RecurrentGemmaForCausalLM``: round
trips transformers -> amer -> a transformers folder -> ``AutoModelForCausalLM`` to 1e-5 in the logits, a model
built in amer from the recurrentgemma-2b preset's options, and what the class fixes refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import VOCAB, build_source, decode_logits, export_round_trip, tokens

from amer.errors import InputError
from amer.interop import export_transformers, from_transformers
from amer.interop.gemma import embed_scale

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
GRIFFIN = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=1, attention_window_size=5, logits_soft_cap=3.0)


@pytest.mark.parametrize("kw", [
    dict(block_types=["recurrent", "recurrent", "attention"]),
    dict(block_types=["attention", "recurrent"], lru_width=48, tie_word_embeddings=False, attention_bias=True),
    dict(block_types=["recurrent"], conv1d_width=3),
    dict(block_types=["attention"], rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                     "partial_rotary_factor": 0.25}),
], ids=["RRA", "AR-untied", "R-only", "A-only"])
def test_round_trip(tmp_path: Path, kw: dict[str, Any]) -> None:
    build_source(tmp_path / "src", "RecurrentGemmaForCausalLM", "RecurrentGemmaConfig", **{**GRIFFIN, **kw})
    model, cfg = from_transformers(tmp_path / "src")
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["architectures"] == ["RecurrentGemmaForCausalLM"]
    _, again = from_transformers(tmp_path / "out")  # and the folder imports to the same config
    assert again.pattern == cfg.pattern and again.family_configs == cfg.family_configs


def griffin_config(**over: Any) -> Any:
    """A small model with the recurrentgemma-2b preset's options (its shape shrunk)."""
    from amer import ModelConfig
    from amer.presets import load_preset

    model = dict(load_preset("recurrentgemma-2b")["model"])
    model.update(pattern="REAERE", d_model=32, vocab_size=VOCAB, max_seq_len=64, init_std=0.1,
                 embed_scale=embed_scale(32), attention={**model["attention"], "n_heads": 4, "head_dim": 8},
                 recurrent={**model["recurrent"], "lru_width": 32, "n_heads": 4}, moe={**model["moe"], "d_ff": 48})
    for key, value in over.items():
        section, _, name = key.rpartition(".")
        (model[section] if section else model)[name] = value
    return ModelConfig(**model)


def test_a_model_built_in_amer_exports(tmp_path: Path) -> None:
    """A model trained in amer with the preset's options (norm gains and biases away from their initial values, so a
    misplaced one shows) is served by transformers with the same logits."""
    from amer import HybridLM

    torch.manual_seed(0)
    cfg = griffin_config()
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    assert json.loads((tmp_path / "out" / "config.json").read_text())["block_types"] == ["recurrent", "attention",
                                                                                        "recurrent"]


def test_what_the_class_fixes_is_refused_by_name(tmp_path: Path) -> None:
    """Each setting RecurrentGemma fixes is named when it differs (several in one line: a plain amer model differs in
    many); options it has no counterpart for are refused field by field. Control: the preset's options export."""
    from amer import HybridLM, ModelConfig

    plain_cfg = ModelConfig(pattern="RERE", d_model=32, vocab_size=VOCAB, max_seq_len=64, moe={"n_experts": 1})
    refused = [
        (plain_cfg, r"RecurrentGemmaForCausalLM fixes what these settings choose; it needs model.norm_offset 1.0 "
                    r"\(not 0.0\), model.embed_scale 5.65625 \(not 1.0\), moe.bias True \(not False\), moe.activation "
                    r"'gelu_tanh' \(not 'silu'\), recurrent.bias True \(not False\), recurrent.normalise_first False "
                    r"\(not True\), model.logit_softcap set \(it always soft-caps its logits\)$"),
        (griffin_config(**{"recurrent.c": 4.0}), r"recurrent.c 8.0 \(not 4.0\)"),
        (griffin_config(**{"recurrent.normalise_first": True}), r"recurrent.normalise_first False \(not True\)"),
        (griffin_config(**{"attention.window": None}), r"attention.window set \(its attention is local\)"),
        (griffin_config(**{"attention.out_bias": False}), r"attention.out_bias True \(not False\)"),
        (griffin_config(**{"attention.n_heads": 2, "attention.n_kv_heads": 1, "attention.head_dim": None}),
         r"attention.n_heads equal to recurrent.n_heads 4 \(not 2\)"),
        (griffin_config(**{"attention.head_dim": 16}), r"attention.head_dim unset or 8 \(not 16\)"),
        (griffin_config(logit_softcap=None), r"model.logit_softcap set"),
        (griffin_config(**{"attention.qk_norm": True}), r"attention.qk_norm=True has no counterpart in "
                                                          r"RecurrentGemmaForCausalLM"),
        (griffin_config(**{"attention.rope_linear_factor": 2.0}), r"rope_linear_factor=2.0 has no counterpart"),
        (griffin_config(residual_scale=0.5), r"model.residual_scale=0.5 has no counterpart in RecurrentGemma"),
        (griffin_config(norm_placement="post"), r"norm_placement 'post'; RecurrentGemmaForCausalLM places it 'pre'"),
        (griffin_config(pattern="RR"), r"pattern 'RR': transformers classes express .* 'RE' / 'AE' layers"),
    ]
    for cfg, message in refused:
        with pytest.raises(InputError, match=message):
            export_transformers(HybridLM(cfg), cfg, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    export_transformers(HybridLM(griffin_config()), griffin_config(), tmp_path / "ok")
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def test_slow_channels_with_a_closed_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow channel (sigmoid(Lambda)^8 ~ 0.999) whose recurrence gate is nearly closed has 1 - a^2 far below 1e-6;
    its normaliser sqrt(1 - a^2) must keep its value, as transformers computes it. Reference: the exported folder in
    float64 (transformers' own fp32 loses 1 - a^2 to cancellation there, 1.2e-5 off; amer takes it through expm1).
    Forward and decoding both match; negative control: a floor on 1 - a^2 (what amer computed before) in the
    decoding path's normaliser is seen (the training scan's own normaliser is held to that path, values and gradients,
    in tests/test_block_recurrent.py)."""
    import transformers

    from amer import HybridLM
    from amer.blocks import recurrent

    torch.manual_seed(0)
    cfg = griffin_config(pattern="RERE")
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for blk in (model.blocks[0].mixer, model.blocks[2].mixer):
            blk.Lambda.fill_(9.0)
            blk.gate_bias[:, :blk.head_width] = -10.0  # the recurrence gate's logit
    export_transformers(model, cfg, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").double().eval()
    with torch.no_grad():
        ref = hf(input_ids=tokens(), use_cache=False).logits.float()
        assert (model(tokens(), taps=False).logits - ref).abs().max() <= ATOL
        assert (decode_logits(model, tokens()) - ref).abs().max() <= ATOL
        floor = recurrent._BoundedSqrt.forward
        monkeypatch.setattr(recurrent._BoundedSqrt, "forward",
                            staticmethod(lambda ctx, z: floor(ctx, z.clamp(min=1e-6))))
        assert (decode_logits(model, tokens()) - ref).abs().max() > 3 * ATOL
