"""Megatron-Core hybrid layer patterns and transformers layer-type lists as amer patterns (amer.translate).

The symbol table is Megatron-Core's ``Symbols`` (``megatron/core/models/hybrid/hybrid_layer_allocation.py``); the
layer-type names are those of transformers 5.25's configs. Every translation is checked by parsing it and counting
blocks per family against the source's own count; the layer-type lists of real converters' sources give the same
stack as the converter builds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from amer import ModelConfig
from amer.cli import main
from amer.errors import PatternError
from amer.pattern import from_layer_types, from_megatron, parse_pattern

# Nemotron-H-8B's hybrid_override_pattern (52 layers: 24 Mamba-2, 4 attention, 24 MLP)
NEMOTRON_H_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"


def families(pattern: str) -> str:
    return "".join(layer.family for layer in parse_pattern(pattern).layers)


@pytest.mark.parametrize("symbol,block", [("M", "M"), ("G", "G"), ("*", "A"), ("+", "D"), ("-", "E"), ("E", "E")])
def test_each_megatron_symbol(symbol: str, block: str) -> None:
    assert from_megatron(symbol) == block
    assert from_megatron(f"M{symbol}|{symbol}M") == f"M{block}|{block}M"


def test_megatron_layer_counts_and_stages() -> None:
    """Counts per family equal Megatron's per-symbol counts; '|' keeps the stages; MLP beside MoE is E.dense."""
    pattern = from_megatron(NEMOTRON_H_8B)
    assert pattern == NEMOTRON_H_8B.replace("-", "E").replace("*", "A")
    parsed = parse_pattern(pattern)
    assert (parsed.count("M"), parsed.count("A"), parsed.count("E"), len(parsed)) == (24, 4, 24, 52)
    staged = from_megatron("M-M*-|M-ME|G+E")
    assert staged == "ME.dense MAE.dense|ME.dense ME|GDE"
    cfg = ModelConfig(pattern=staged, d_model=32, moe={"n_experts": 4, "variants": {"dense": {"n_experts": 1}}})
    assert cfg.parsed.n_stages == 3 and [layer.variant for layer in cfg.parsed.of_family("E")] == ["dense"] * 3 + [
        None, None]
    assert from_megatron("-E", dense="mlp") == "E.mlp E"


@pytest.mark.parametrize("text,position,message", [
    ("M-M-D-", 4, "'D' at position 4 is DeepSeek sparse attention"),
    ("M*M*/MM/MM", 4, "multi-token-prediction"),
    ("M-Mx", 3, "'x' at position 3 is not a Megatron-Core layer symbol"),
    ("M- M", 2, "' ' at position 2"),
    ("M-||M-", 3, "empty pipeline stage at position 3"),
    ("|M", 0, "empty pipeline stage at position 0"),
    ("M-|", 2, "empty pipeline stage after the '|' at position 2"),
    ("  ", 0, "is empty"),
])
def test_megatron_errors_name_the_symbol_and_its_position(text: str, position: int, message: str) -> None:
    with pytest.raises(PatternError, match=message) as info:
        from_megatron(text)
    assert info.value.position == position and "\n" not in str(info.value)


def test_layer_type_names() -> None:
    assert from_layer_types(["sliding_attention", "full_attention"]) == "A.swa EAE"
    assert from_layer_types(["conv", "conv", "full_attention"]) == "CECEAE"
    assert from_layer_types(["linear_attention", "full_attention"], linear="N") == "NEAE"
    assert from_layer_types(["mamba", "attention"], ffn=False, linear="M") == "MA"
    # a whole config: the model type says what linear_attention is; Nemotron-H names its feed-forward layers
    assert from_layer_types({"model_type": "minimax", "layer_types": ["linear_attention", "full_attention"]}) == "NEAE"
    assert from_layer_types({"model_type": "nemotron_h", "layers_block_type": ["mamba", "moe", "attention", "mlp"]}) \
        == "MEAE.dense"
    assert from_layer_types({"model_type": "nemotron_h", "hybrid_override_pattern": "M-M*-"}) == "MEMAE"
    assert from_layer_types({"model_type": "recurrent_gemma", "block_types": ["recurrent", "recurrent", "attention"],
                             "num_hidden_layers": 4}) == "REREAERE"


@pytest.mark.parametrize("types,kw,message", [
    (["full_attention", "chunked_attention"], {}, "'chunked_attention' \\(layer 1\\) is attention within fixed"),
    (["hybrid"], {}, "'hybrid' \\(layer 0\\) is a layer that runs a shared attention block"),
    (["full_attention", "linear_attention"], {}, "'linear_attention' \\(layer 1\\) names a different block"),
    (["linear_attention"], {"linear": "X"}, "linear='X' is not a block letter"),
    (["mamba", "mlp"], {"ffn": True, "linear": "M"}, "'mlp' \\(layer 1\\) is a feed-forward layer"),
    (["full_attention", "cross_attention"], {}, "'cross_attention' \\(layer 1\\) is not one amer maps"),
    ([], {}, "non-empty list"),
    ({"model_type": "llama"}, {}, "lists no layer types"),
])
def test_layer_type_errors(types: Any, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(PatternError, match=message) as info:
        from_layer_types(types, **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cls,cfg_cls,kw", [
    ("NemotronHForCausalLM", "NemotronHConfig", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                                      num_key_value_heads=2, head_dim=8, mamba_num_heads=4,
                                                      mamba_head_dim=16, n_groups=2, ssm_state_size=16,
                                                      layers_block_type=["mamba", "mlp", "attention", "mlp"])),
    ("MiniMaxForCausalLM", "MiniMaxConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                  num_local_experts=4,
                                                  layer_types=["linear_attention", "full_attention",
                                                               "linear_attention"])),
    ("Gemma2ForCausalLM", "Gemma2Config", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
])
def test_a_converted_source_has_the_stack_its_layer_types_say(tmp_path: Path, cls: str, cfg_cls: str,
                                                               kw: dict[str, Any]) -> None:
    """The stack amer's converter builds from a saved transformers folder is the one its config's layer types
    translate to (block families in order)."""
    transformers = pytest.importorskip("transformers")
    from amer.interop import from_transformers

    getattr(transformers, cls)(getattr(transformers, cfg_cls)(vocab_size=64, **kw)).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    _, cfg = from_transformers(tmp_path)
    assert families(from_layer_types(conf)) == families(cfg.pattern)


def test_cli_prints_the_pattern(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["patterns", "--from-megatron", "M-M*-|M-M*-"]) == 0
    assert capsys.readouterr().out.strip() == "MEMAE|MEMAE"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_next",
                                                       "layer_types": ["linear_attention"] * 3 + ["full_attention"]}))
    assert main(["patterns", "--from-layer-types", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "GEGEGEAE"
    assert main(["patterns", "--from-layer-types", '["linear_attention"]', "--linear", "S"]) == 0
    assert capsys.readouterr().out.strip() == "SE"
    assert main(["patterns", "--from-megatron", "M/M"]) == 2
    err = capsys.readouterr().err
    assert "'/' at position 1" in err and len(err.strip().splitlines()) == 1
