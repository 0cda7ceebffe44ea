"""Initialisation is owned by each block: residual-writing projections are scaled by 1/sqrt(2L) (GPT-2),
the MoE shared expert included, and ``reset_parameters`` re-draws every weight."""

from __future__ import annotations

import math

import pytest
import torch

from amer import HybridLM, ModelConfig, MoEConfig

L_PATTERN = "(AEMR)*2E"  # 9 layers


def build(seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern=L_PATTERN, d_model=128, init_std=0.02, vocab_size=300,
                      moe=MoEConfig(n_experts=4, d_ff=256, shared_expert=True, d_ff_shared=256))
    return HybridLM(cfg)


def residual_writers(model: HybridLM) -> dict[str, torch.Tensor]:
    """The weights whose output is added to the residual stream."""
    out = {}
    for i, blk in enumerate(model.blocks):
        mixer = blk.mixer
        if hasattr(mixer, "out_proj"):
            out[f"{i}.out_proj"] = mixer.out_proj.weight
        if hasattr(mixer, "w_down"):
            out[f"{i}.w_down"] = mixer.w_down
        if getattr(mixer, "shared", None) is not None:
            out[f"{i}.shared.down"] = mixer.shared.down.weight
    return out


def test_every_residual_writer_is_scaled_by_depth() -> None:
    model = build()
    out_std = 0.02 / math.sqrt(2 * 9)
    writers = residual_writers(model)
    assert any(k.endswith("shared.down") for k in writers)
    for name, w in writers.items():
        assert w.std().item() == pytest.approx(out_std, rel=0.1), name
    # control: an input projection keeps the unscaled std, so the check above can tell the two apart
    qkv = model.blocks[0].mixer.qkv.weight
    assert qkv.std().item() == pytest.approx(0.02, rel=0.1)
    assert abs(qkv.std().item() - out_std) > 0.5 * out_std


def test_reset_parameters_redraws_every_block_weight() -> None:
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        torch.nn.init.constant_(p, 0.123)
    torch.manual_seed(0)
    model.reset_parameters()
    for name, p in model.named_parameters():
        assert not torch.all(p == 0.123), f"{name} was not re-initialised"
    # the same distribution, not the same draws: the stds match what construction gave
    for name, p in model.named_parameters():
        if p.numel() > 64 and before[name].std() > 0:
            assert p.std().item() == pytest.approx(before[name].std().item(), rel=0.25), name


def test_per_unit_initialisation_builds_each_layer_from_its_variant_and_block_options() -> None:
    """The meta-device build with per-unit seeds builds every layer from its own config (``cfg.layer_config``) and
    block options (``cfg.block_options``): the sliding-window variant keeps its window, the dense E variant its one
    expert, sandwich norms their second norm; re-initialising one block alone on its unit's seed reproduces it,
    norms included."""
    from amer.model import seeded

    cfg = ModelConfig(pattern="A.swa E A E.dense", d_model=32, vocab_size=64, max_seq_len=64,
                      norm_placement="sandwich", attention={"n_heads": 4, "variants": {"swa": {"window": 4}}},
                      moe={"n_experts": 4, "d_ff": 32, "variants": {"dense": {"n_experts": 1, "d_ff": 48}}})
    model = HybridLM(cfg, seed=5)
    assert model.blocks[0].mixer.window == 4 and model.blocks[2].mixer.window != 4
    assert [b.mixer.n_experts for b in model.blocks[1::2]] == [4, 1]
    assert all(b.norm is not None and b.post_norm is not None for b in model.blocks)
    blk = model.blocks[3]
    before = {k: v.clone() for k, v in blk.state_dict().items()}
    with torch.no_grad():
        for p in blk.parameters():
            p.fill_(3.0)
    unit = next(u for u in model.init_units() if u.name == "blocks.3")
    with seeded(5, "blocks.3"):
        unit.init(unit.module)
    for k, v in blk.state_dict().items():
        assert torch.equal(v, before[k]), k
