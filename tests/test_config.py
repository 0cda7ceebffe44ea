"""ModelConfig as a dataclass users can copy and change, and the evaluation recording only what it needs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from amer import HybridLM, ModelConfig, MoEConfig, STPConfig
from amer.config import ConfigError, from_dict, to_dict
from amer.stp import STPPolicy
from amer.training.evaluate import evaluate


def test_replace_keeps_every_family_setting() -> None:
    cfg = ModelConfig(pattern="AEMR", d_model=64, moe=MoEConfig(n_experts=4, top_k=1), mamba={"head_dim": 16})
    new = dataclasses.replace(cfg, pattern="AAE")
    assert new.pattern == "AAE" and new.d_model == 64
    assert new.moe == cfg.moe and new.mamba.head_dim == 16
    assert new.parsed.letters == "AAE"
    assert dataclasses.replace(new, moe=MoEConfig(n_experts=2, top_k=1)).moe.n_experts == 2
    assert from_dict(ModelConfig, to_dict(new)) == new


def test_unknown_model_setting_names_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown model setting 'mobe'; did you mean 'moe'\?"):
        ModelConfig(pattern="AE", mobe={"n_experts": 2})
    with pytest.raises(ConfigError, match=r"model.moe must be a MoEConfig or a table"):
        ModelConfig(pattern="AE", moe=3)


def test_evaluation_records_only_the_taps_its_selections_need() -> None:
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_preset("tiny"))
    seen: list = []
    forward = model.forward

    def spy(tokens, **kw):
        seen.append(kw.get("taps"))
        return forward(tokens, **kw)

    model.forward = spy  # type: ignore[method-assign]
    tokens = torch.randint(0, 260, (2, 16))
    batch = {"tokens": tokens, "targets": tokens, "doc_ids": torch.zeros_like(tokens)}
    policy = STPPolicy(STPConfig(enabled=True, layers="M-1,final"), model.pattern)
    res = evaluate(model, [batch], stp={"s": policy})
    assert seen == [[3, 5]] and 0 <= res["stp/s"] <= 2  # M0 and final, resolved once by the policy
    evaluate(model, [batch])
    assert seen[-1] is False  # nothing to measure on the taps: record none
    # the selection fixes the numbers, not how many taps were recorded
    full = evaluate(model, [batch], stp={"s": policy}, taps=True)
    assert full["stp/s"] == res["stp/s"] and full["loss"] == res["loss"]
