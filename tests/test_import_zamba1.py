"""Importing Zamba: multi-head Mamba-1 layers (the S family with ``n_heads``) and hybrid layers (the H family running
a Mamba-1) that share one transformer. Same logits as transformers within 1e-5 (fp32), for the full forward and for
token-by-token decoding through amer's caches; negative controls undo what the import maps (the heads' own selective
maps, the interleaved in_proj rows, the embedding input) and see the logits move.

Sources are small random transformers models built here (norm gains perturbed, see test_import.py);
``python -m pytest -s`` prints the measured differences.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_import import assert_same_function, build_source
from test_import_zamba import assert_reads_embedding, differs

from amer import ModelConfig
from amer.blocks import SharedUse
from amer.blocks.mamba1 import Mamba1Mixer
from amer.config import ConfigError
from amer.errors import InputError
from amer.interop import from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
TYPES = ["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"]
ZAMBA = dict(hidden_size=16, num_hidden_layers=len(TYPES), layers_block_type=TYPES, mamba_d_state=8,
             n_mamba_heads=2, mamba_dt_rank=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=24)
CASES = {
    "tied": dict(),
    "untied-gqa-bias": dict(num_key_value_heads=2, n_mamba_heads=4, hidden_act="gelu_pytorch_tanh",
                            mamba_proj_bias=True, tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_zamba(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three hybrid layers sharing the transformer (two of them adjacent), multi-head Mamba-1 everywhere; or untied
    transformers with grouped KV heads, four Mamba heads and projection biases. Negative controls: two Mamba heads'
    x_proj swapped, the in_proj rows left interleaved, the embedding input zeroed."""
    hf = build_source(tmp_path, "ZambaForCausalLM", "ZambaConfig", **{**ZAMBA, **CASES[case]})
    with torch.no_grad():  # larger selective maps, so the scans (not the D skip) carry most of each Mamba's output
        for name, p in hf.named_parameters():
            if name.endswith("x_proj_weight"):
                p.mul_(8.0)
    hf.save_pretrained(tmp_path)
    fwd, dec = assert_same_function(hf, tmp_path)
    assert fwd <= ATOL and dec <= ATOL, (fwd, dec)
    model, cfg = from_transformers(tmp_path)
    tied = CASES[case].get("tie_word_embeddings", True)
    assert cfg.pattern.split() == ["S" if t == "mamba" else "H:z0" if tied else "H" for t in TYPES]
    assert cfg.zamba.companion == "mamba1" and cfg.mamba1.n_heads == hf.config.n_mamba_heads
    uses = [b for b in model.blocks if b.layer.family == "H"]
    assert len(model.shared) == int(tied) and all(isinstance(b, SharedUse) == tied for b in uses)
    assert model.num_params() == sum(p.numel() for p in hf.parameters())  # the shared transformer counted once

    mambas = [m for m in model.modules() if isinstance(m, Mamba1Mixer)]
    assert len(mambas) == len(TYPES)
    with torch.no_grad():
        for name in ("x_proj", "in_proj"):
            kept = [getattr(m, name).weight.clone() for m in mambas]
            for m, w in zip(mambas, kept, strict=True):
                half = w.shape[0] // 2
                if name == "x_proj":  # the first half of the heads' maps <-> the second's
                    getattr(m, name).weight.copy_(torch.cat([w[half:], w[:half]]))
                else:  # back to Zamba's interleaved (scan input, gate) rows
                    getattr(m, name).weight.copy_(torch.stack([w[:half], w[half:]], 1).reshape_as(w))
            assert differs(model, hf) > 100 * ATOL, name
            for m, w in zip(mambas, kept, strict=True):
                getattr(m, name).weight.copy_(w)
    assert differs(model, hf) <= ATOL

    assert_reads_embedding(model, hf, monkeypatch, ATOL)


def test_zamba_refusals(tmp_path: Path) -> None:
    """What amer cannot express is named in one line (the export: tests/test_export_zamba.py)."""
    build_source(tmp_path / "act", "ZambaForCausalLM", "ZambaConfig", **ZAMBA, hidden_mamba_act="gelu")
    with pytest.raises(InputError, match="hidden_mamba_act"):
        from_transformers(tmp_path / "act")


def test_companion_and_heads_are_checked() -> None:
    """A companion outside the family's list, and Mamba-1 heads that do not divide the inner width, are refused."""
    with pytest.raises(ConfigError, match="zamba.companion must be"):
        ModelConfig(pattern="H", d_model=16, zamba={"companion": "attention"})
    with pytest.raises(ConfigError, match="mamba1.n_heads"):
        ModelConfig(pattern="S", d_model=16, mamba1={"n_heads": 3})
    cfg = ModelConfig(pattern="S H", d_model=16, vocab_size=32, zamba={"companion": "mamba1"})
    assert cfg.companion_config(cfg.parsed.layers[1]) is cfg.mamba1
