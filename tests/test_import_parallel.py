"""Importing Falcon-H1, whose layers run attention and Mamba-2 side by side: the parallel layer ``[AM]`` with its
branches' multipliers, the muP row multipliers folded into the weights, and the three forms of its Mamba-2 output
norm. Same logits as transformers within 1e-5 (fp32), for the full forward and for token-by-token decoding through
amer's caches; negative controls take away what the import maps and see the logits move; the export back.

Sources are small random transformers models built here (norm gains and biases perturbed, see test_import.py);
``python -m pytest -s`` prints the measured differences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import assert_same_function, build_source, export_round_trip, reference_logits, tokens

from amer.blocks import residual_layer
from amer.errors import CheckpointError, InputError
from amer.interop import export_transformers, from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
FALCON_H1 = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, mamba_d_ssm=48, mamba_n_heads=6, mamba_d_head=8, mamba_n_groups=2,
                 mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=4, key_multiplier=0.7,
                 attention_in_multiplier=1.3, attention_out_multiplier=0.8, ssm_in_multiplier=1.2,
                 ssm_out_multiplier=0.9, ssm_multipliers=[0.5, 1.5, 0.8, 1.1, 2.0], mlp_multipliers=[1.4, 0.6],
                 embedding_multiplier=2.0, lm_head_multiplier=0.5)
NORMS = {"none": dict(mamba_rms_norm=False), "gated": dict(mamba_rms_norm=True, mamba_norm_before_gate=False),
         "before_gate": dict(mamba_rms_norm=True, mamba_norm_before_gate=True)}


def differs(model: Any, hf: Any) -> float:
    with torch.no_grad():
        return (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max().item()


@pytest.mark.parametrize("norm", list(NORMS))
def test_falcon_h1(tmp_path: Path, norm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every multiplier off 1, a Mamba inner width (48) that is not a multiple of the width (32), two B/C groups and
    chunks of 4 over 12 tokens; negative controls: each branch's input multiplier, the attention branch's output
    multiplier and the parallel layer itself (its branches run one after the other) are each seen."""
    hf = build_source(tmp_path, "FalconH1ForCausalLM", "FalconH1Config", tie_word_embeddings=norm == "gated",
                      **FALCON_H1, **NORMS[norm])
    fwd, dec = assert_same_function(hf, tmp_path)
    assert fwd <= ATOL and dec <= ATOL, (fwd, dec)
    model, cfg = from_transformers(tmp_path)
    assert cfg.pattern == "([AM]E)*3" and cfg.mamba.norm == norm and cfg.mamba.d_inner == 48
    assert [b.layer.branch for b in model.blocks[:3]] == [0, 1, None] and model.blocks[1].norm is None
    assert differs(model, hf) <= ATOL
    for blk, name in ((model.blocks[1], "input_multiplier"), (model.blocks[3], "input_multiplier"),
                      (model.blocks[0], "residual_scale")):
        kept = getattr(blk, name)
        setattr(blk, name, 1.0)
        assert differs(model, hf) > 100 * ATOL, name
        setattr(blk, name, kept)
    assert differs(model, hf) <= ATOL
    monkeypatch.setattr("amer.model.residual_layer", sequential_layer)
    assert differs(model, hf) > 100 * ATOL


def sequential_layer(blocks: Any, x: torch.Tensor, caches: Any, doc_ids: Any = None, embed: Any = None) -> Any:
    """A parallel layer's branches run one after the other, each on the norm of the stream the last one left."""
    if len(blocks) == 1:
        return residual_layer(blocks, x, caches, doc_ids)
    outs = []
    for blk, cache in zip(blocks, caches):
        y, out = blk.update(blocks[0].norm(x), cache, doc_ids)
        x = x + y
        outs.append(out)
    return x, [x] * len(blocks), outs


def test_falcon_h1_export_round_trip(tmp_path: Path) -> None:
    build_source(tmp_path / "src", "FalconH1ForCausalLM", "FalconH1Config", **FALCON_H1, **NORMS["gated"])
    model, cfg = from_transformers(tmp_path / "src")
    diff = export_round_trip(model, cfg, tmp_path / "out")
    print(f"export FalconH1ForCausalLM: {diff:.2e}")
    assert diff <= ATOL
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["architectures"] == ["FalconH1ForCausalLM"] and conf["ssm_multipliers"] == [1.0] * 5
    back, back_cfg = from_transformers(tmp_path / "out")
    assert back_cfg.pattern == cfg.pattern
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("edit,message", [
    ({"time_step_limit": [0.0, 1.0]}, "time_step_limit"),
    ({"mlp_bias": True}, "feed_forward.gate_proj.bias' is missing"),  # biases the folder does not hold
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mamba_proj_bias": True}, "projectors_bias"),
])
def test_unsupported_settings_fail_in_one_line(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    build_source(tmp_path, "FalconH1ForCausalLM", "FalconH1Config", **FALCON_H1)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=message) as info:
        from_transformers(tmp_path)
    assert "\n" not in str(info.value)


def test_export_refuses_what_falcon_h1_cannot_express(tmp_path: Path) -> None:
    from amer import HybridLM, ModelConfig

    for kw, message in ((dict(pattern="[AM]E[AG]E"), "'\\(\\[AM\\]E\\)\\*L'"),
                        (dict(pattern="([AM]E)*2", residual_scale=0.5), "residual_scale"),
                        (dict(pattern="([AM]E)*2", moe={"update_multiplier": 2.0}), "block options"),
                        (dict(pattern="([AM]E)*2", attention={"window": 4}), "attention.window")):
        cfg = ModelConfig(d_model=32, vocab_size=64, **kw)
        with pytest.raises(InputError, match=message) as info:
            export_transformers(HybridLM(cfg, seed=0), cfg, tmp_path / "out")
        assert "\n" not in str(info.value)
