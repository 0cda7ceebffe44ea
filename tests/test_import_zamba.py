"""Importing Zamba2: Mamba-2 layers and hybrid layers (the H family) whose shared transformers take turns, with
per-use LoRA adapters, a per-use linear and the concat(stream, embedding) input. Same logits as transformers within
1e-5 (fp32), for the full forward and for token-by-token decoding through amer's caches; negative controls take away
what the import maps (a use's own adapter, the embedding input, the time-step floor, the weight a second use reads)
and see the logits move.

Sources are small random transformers models built here (norm gains perturbed, see test_import.py);
``python -m pytest -s`` prints the measured differences.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import assert_same_function, assert_same_function_and_control, build_source, reference_logits, tokens

from amer.blocks import SharedUse, residual_layer
from amer.errors import InputError
from amer.interop import from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
TYPES = ["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba", "hybrid"]
ZAMBA2 = dict(hidden_size=16, num_hidden_layers=len(TYPES), layers_block_type=TYPES, mamba_d_state=8,
              n_mamba_heads=4, mamba_ngroups=2, chunk_size=4, num_attention_heads=4, intermediate_size=24,
              num_mem_blocks=2, adapter_rank=4)
CASES = {
    "adapters-rope": dict(use_shared_attention_adapter=True, use_mem_rope=True, time_step_min=0.3),
    "gqa-one-block": dict(num_key_value_heads=2, num_mem_blocks=1, hidden_act="gelu_pytorch_tanh",
                          tie_word_embeddings=False),
}


def runs(name: str, tied: bool) -> bool:
    """Whether transformers ever runs parameter ``name``: an untied layer's copy of a shared block also holds the
    adapters of the other uses, which only their own layers run."""
    if tied or "adapter_list." not in name:
        return True
    layer = int(name.split(".")[2])
    rank = [i for i, t in enumerate(TYPES) if t == "hybrid"].index(layer)
    return int(name.split("adapter_list.")[1].split(".")[0]) == rank


def differs(model: Any, hf: Any) -> float:
    with torch.no_grad():
        return (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max().item()


def assert_reads_embedding(model: Any, hf: Any, monkeypatch: pytest.MonkeyPatch, atol: float = 1e-5) -> None:
    """Negative control: the hybrid layers given a zeroed embedding input move the logits well past ``atol``."""
    def zero_embedding(blocks: Any, x: torch.Tensor, caches: Any, doc_ids: Any = None, embed: Any = None) -> Any:
        return residual_layer(blocks, x, caches, doc_ids, None if embed is None else torch.zeros_like(embed))

    with monkeypatch.context() as m:
        m.setattr("amer.model.residual_layer", zero_embedding)
        assert differs(model, hf) > 100 * atol


@pytest.mark.parametrize("case", list(CASES))
def test_zamba2(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two shared blocks over four hybrid layers (z0 z1 z0 z1, two of them adjacent), adapters on q/k/v and the MLP,
    RoPE and a time-step floor that binds; or one block with grouped KV heads and an untied head. Negative controls:
    one use's MLP adapter swapped for another use's of the same block, the embedding input zeroed, the time-step
    floor removed."""
    hf = build_source(tmp_path, "Zamba2ForCausalLM", "Zamba2Config", **{**ZAMBA2, **CASES[case]})
    fwd, dec = assert_same_function(hf, tmp_path)
    assert fwd <= ATOL and dec <= ATOL, (fwd, dec)
    model, cfg = from_transformers(tmp_path)
    blocks = int(CASES[case].get("num_mem_blocks", 2))
    hybrid = iter(range(len(TYPES)))
    tied = CASES[case].get("tie_word_embeddings", True)  # transformers unties the shared blocks with the head
    assert cfg.pattern.split() == ["M" if t == "mamba" else f"H:z{next(hybrid) % blocks}" if tied else "H"
                                   for t in TYPES]
    uses = [b for b in model.blocks if b.layer.family == "H"]
    assert len(uses) == 4 and len(model.shared) == (blocks if tied else 0)
    assert all(isinstance(b, SharedUse) == tied for b in uses)
    assert model.num_params() == sum(p.numel() for n, p in hf.named_parameters() if runs(n, tied))  # shared: once
    first, third = ((uses[0].parts.ff_adapter, uses[2].parts.ff_adapter) if tied
                    else (uses[0].mixer.ff_adapter, uses[2].mixer.ff_adapter))
    with torch.no_grad():
        kept = first[0].weight.clone()
        first[0].weight.copy_(third[0].weight)
        assert differs(model, hf) > 100 * ATOL
        first[0].weight.copy_(kept)
    assert differs(model, hf) <= ATOL

    assert_reads_embedding(model, hf, monkeypatch)
    if "time_step_min" in CASES[case]:
        mamba = model.blocks[0].mixer
        mamba.cfg = replace(mamba.cfg, dt_clamp_min=0.0)
        assert differs(model, hf) > 100 * ATOL


def test_zamba2_second_use_reads_its_own_adapter(tmp_path: Path) -> None:
    """The adapter of the third hybrid layer (use 2 of block z0) is stored under the first use's layer: perturbing
    it in the folder moves amer's logits."""
    hf = build_source(tmp_path, "Zamba2ForCausalLM", "Zamba2Config", **ZAMBA2, **CASES["adapters-rope"])
    key = "model.layers.1.shared_transformer.self_attn.linear_v_adapter_list.2.1.weight"
    fwd, dec = assert_same_function_and_control(hf, tmp_path, key)
    assert max(fwd, dec) <= ATOL


def test_zamba2_refusals(tmp_path: Path) -> None:
    """What amer cannot express is named in one line (the export: tests/test_export_zamba.py)."""
    build_source(tmp_path / "bias", "Zamba2ForCausalLM", "Zamba2Config", **ZAMBA2, add_bias_linear=True)
    with pytest.raises(InputError, match="add_bias_linear"):
        from_transformers(tmp_path / "bias")


def test_a_block_per_hybrid_layer_is_no_sharing(tmp_path: Path) -> None:
    """As many blocks as hybrid layers share nothing: each layer an unshared H, same logits. Control: one block
    fewer, and the first block's second use is a share again."""
    hf = build_source(tmp_path, "Zamba2ForCausalLM", "Zamba2Config", **{**ZAMBA2, "num_mem_blocks": 4})
    fwd, dec = assert_same_function(hf, tmp_path)
    assert max(fwd, dec) <= ATOL
    assert from_transformers(tmp_path)[1].pattern.split() == ["M" if t == "mamba" else "H" for t in TYPES]
    build_source(tmp_path / "three", "Zamba2ForCausalLM", "Zamba2Config", **{**ZAMBA2, "num_mem_blocks": 3})
    assert from_transformers(tmp_path / "three")[1].pattern.split()[-1] == "H:z0"
