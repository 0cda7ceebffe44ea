"""Exporting the shared hybrid layers (the H family): ``M`` / ``H`` layers as ``Zamba2ForCausalLM``, ``S`` / ``H``
layers running a Mamba-1 as ``ZambaForCausalLM``. Round trips transformers -> amer -> a transformers folder ->
``AutoModelForCausalLM`` to 1e-5 in the logits, folders that import back to the same pattern and configs, models
built in amer (the zamba2-2.7b preset's options, rank-0 adapters, unshared layers), negative controls on what the
writer places (each use's adapter at its rank, Zamba's interleaved in_proj rows), and the sharing the classes
cannot express refused by name."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_import import VOCAB, build_source, export_round_trip, reference_logits, tokens
from test_import_zamba import CASES as ZAMBA2_CASES
from test_import_zamba import ZAMBA2
from test_import_zamba1 import CASES as ZAMBA_CASES
from test_import_zamba1 import ZAMBA

from amer import HybridLM, ModelConfig
from amer.errors import InputError
from amer.interop import export_transformers, from_transformers

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
SOURCES = [("Zamba2ForCausalLM", "Zamba2Config", {**ZAMBA2, **kw}) for kw in ZAMBA2_CASES.values()] + [
    ("ZambaForCausalLM", "ZambaConfig", {**ZAMBA, **kw}) for kw in ZAMBA_CASES.values()]


@pytest.mark.parametrize("cls,cfg_cls,kw", SOURCES, ids=[f"zamba2-{c}" for c in ZAMBA2_CASES]
                         + [f"zamba-{c}" for c in ZAMBA_CASES])
def test_round_trip(tmp_path: Path, cls: str, cfg_cls: str, kw: dict[str, Any]) -> None:
    """The import's sources (shared blocks in turn with adapters and RoPE; untied heads, whose blocks are each
    layer's own; Zamba's one shared transformer) written back: same logits, same class, and the folder imports to
    the same pattern and configs."""
    build_source(tmp_path / "src", cls, cfg_cls, **kw)
    model, cfg = from_transformers(tmp_path / "src")
    assert export_round_trip(model, cfg, tmp_path / "out") <= ATOL
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["architectures"] == [cls]
    _, again = from_transformers(tmp_path / "out")
    assert again.pattern == cfg.pattern and again.family_configs == cfg.family_configs


def zamba2_config(pattern: str = "M (MM H:z0 MM H:z1)*2 M H:z0 M", **over: Any) -> ModelConfig:
    """A small model with the zamba2-2.7b preset's options (its shape shrunk)."""
    from amer.presets import load_preset

    model = dict(load_preset("zamba2-2.7b")["model"])
    model.update(pattern=pattern, d_model=16, vocab_size=VOCAB, max_seq_len=64, init_std=0.1,
                 zamba={**model["zamba"], "n_heads": 4, "d_ff": 24, "adapter_rank": 4},
                 mamba={**model["mamba"], "head_dim": 8, "d_state": 8, "chunk_size": 4})
    for key, value in over.items():
        section, _, name = key.rpartition(".")
        if section:
            model[section] = {**model.get(section, {}), name: value}
        else:
            model[name] = value
    return ModelConfig(**model)


def trained(cfg: ModelConfig) -> HybridLM:
    """A model as training leaves it: norm gains, biases and the adapters' second halves (zero at initialisation)
    away from their initial values, so a misplaced one shows."""
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "norm" in name or "adapter" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


BUILT = {"preset": {}, "rank-0": {"zamba.adapter_rank": 0}, "unshared": {"pattern": "M H M M H:x H M"},
         "attention-adapters": {"zamba.attention_adapter": True, "zamba.rope": True, "zamba.rope_theta": 37.0,
                                "zamba.act": "silu"},
         "no-floor": {"mamba.dt_clamp_min": 0.0}, "mixed": {"pattern": "M H:a M H M M H:a"}}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers initialising rank-0 pairs
@pytest.mark.parametrize("case", list(BUILT))
def test_models_built_in_amer_export(tmp_path: Path, case: str) -> None:
    """The preset's options (two blocks in turn, MLP adapters); no adapters at all (the class's rank-0 pairs, empty
    tensors); a transformer per hybrid layer, a share name used once included (one Zamba2 block per layer, so
    nothing ties); q/k/v adapters with RoPE; no time-step floor (written as the smallest normal float32); an
    unshared layer between a shared block's uses (a block used once). Each folder imports back to the same configs
    and, where no block is used once, the same pattern."""
    cfg = zamba2_config(**BUILT[case])
    assert export_round_trip(trained(cfg), cfg, tmp_path / "out") <= ATOL
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["num_mem_blocks"] == (3 if case == "unshared" else 2)  # mixed: H:a and the H between its uses
    assert conf["time_step_min"] == (torch.finfo(torch.float32).tiny if case == "no-floor" else 0.001)
    _, again = from_transformers(tmp_path / "out")
    assert again.pattern.split() == [x.written for x in cfg.parsed.layers] or case in ("unshared", "mixed")
    assert again.zamba == replace(cfg.zamba, n_kv_heads=cfg.zamba.kv_heads()) and again.mamba == cfg.mamba


def test_zamba_built_in_amer(tmp_path: Path) -> None:
    """A Zamba stack built in amer: multi-head Mamba-1 with projection biases and no conv bias, one shared
    transformer, another norm epsilon, a RoPE base without RoPE (no effect: it passes); a single hybrid layer, shared
    or not, and names used once, with an untied head (transformers cannot build Zamba's tie with one hybrid layer:
    refused by name)."""
    mamba1 = {"n_heads": 2, "d_state": 8, "dt_rank": 4, "bias": True, "conv_bias": False}
    cfg = ModelConfig(pattern="S H:t S S H:t", d_model=16, vocab_size=VOCAB, max_seq_len=64, tie_embeddings=True,
                      init_std=0.1, norm_eps=1e-3, mamba1=mamba1,
                      zamba={"companion": "mamba1", "n_heads": 4, "act": "gelu_tanh", "rope_theta": 5.0})
    assert export_round_trip(trained(cfg), cfg, tmp_path / "shared") <= ATOL
    _, again = from_transformers(tmp_path / "shared")
    assert again.pattern == "S H:z0 S S H:z0" and again.norm_eps == 1e-3 and again.mamba1 == cfg.mamba1
    for pattern in ("S H:a S H:b", "S H:t S", "S H S"):  # names used once share nothing
        cfg = ModelConfig(pattern=pattern, d_model=16, vocab_size=VOCAB, max_seq_len=64, tie_embeddings=False,
                          init_std=0.1, zamba={"companion": "mamba1", "n_heads": 4},
                          mamba1={**mamba1, "dt_bc_norm_eps": 1e-3})  # no effect without dt/B/C norms
        assert export_round_trip(trained(cfg), cfg, tmp_path / pattern) <= ATOL
    cfg = replace(cfg, tie_embeddings=True)
    with pytest.raises(InputError, match="with one hybrid layer untie the head"):
        export_transformers(HybridLM(cfg), cfg, tmp_path / "tied")


def logit_gap(model: HybridLM, hf: Any) -> float:
    with torch.no_grad():
        return (model(tokens(), taps=False).logits - reference_logits(hf, tokens())).abs().max().item()


def test_each_use_reads_its_own_adapter(tmp_path: Path) -> None:
    """Negative control: in the exported model, the adapters of uses 0 and 2 (both block z0's, written into the first
    use's lists at their ranks) swapped move the logits; swapped back they match."""
    cfg = zamba2_config()
    model = trained(cfg)
    export_transformers(model, cfg, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert logit_gap(model, hf) <= ATOL
    lists = hf.model.layers[3].shared_transformer.feed_forward.gate_up_proj_adapter_list
    with torch.no_grad():
        first, third = lists[0][1].weight, lists[2][1].weight
        kept = first.clone()
        first.copy_(third)
        third.copy_(kept)
        assert logit_gap(model, hf) > 100 * ATOL
        third.copy_(first)
        first.copy_(kept)
    assert logit_gap(model, hf) <= ATOL


def test_zamba_rows_are_interleaved(tmp_path: Path) -> None:
    """Negative control: Zamba's in_proj rows alternate (scan input, gate); stacked halves, as amer holds them, move
    the logits."""
    build_source(tmp_path / "src", "ZambaForCausalLM", "ZambaConfig", **ZAMBA)
    model, cfg = from_transformers(tmp_path / "src")
    export_transformers(model, cfg, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert logit_gap(model, hf) <= ATOL
    w = hf.model.layers[0].mamba.in_proj.weight
    with torch.no_grad():
        w.copy_(torch.cat([w[0::2], w[1::2]]))
    assert logit_gap(model, hf) > 100 * ATOL


REFUSALS = [
    (dict(pattern="M H:a M H:b H:b M H:a"), "take turns over the hybrid layers in order"),
    (dict(pattern="M H:a M H:a M H"), r"take turns over the hybrid layers in order \(H:a H H:a\), got H:a H:a H"),
    (dict(d_model=20, **{"zamba.n_heads": 8}), "makes heads 5 wide .* above 4, with RoPE or without"),
    (dict(d_model=12, **{"zamba.n_heads": 8, "zamba.rope": True}), "makes heads 3 wide .* with zamba.rope"),
    (dict(**{"mamba.d_inner": 48}), "mamba.d_inner=48: Zamba2ForCausalLM's Mamba-2 is mamba.expand"),
    (dict(tie_embeddings=False), "only with a tied head"),
    (dict(pattern="M H:z0 A"), "layers are M or H blocks"),
    (dict(pattern="M:s M:s H"), "shares its hybrid transformers alone"),
    (dict(norm_eps=1e-6), "norm_eps=1e-06"),
    (dict(**{"mamba.bias": True}), "mamba.bias=True has no counterpart in Zamba2ForCausalLM"),
    (dict(embed_scale=2.0), "model.embed_scale=2.0"),
    (dict(pattern="M H.v:z0 M H.v:z1", **{"zamba.variants": {"v": {"d_ff": 8}}}), "no variants"),
]


@pytest.mark.parametrize("over,match", REFUSALS, ids=[m.split()[0] for _, m in REFUSALS])
def test_what_zamba2_cannot_express_is_refused(tmp_path: Path, over: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        export_transformers(HybridLM(cfg := zamba2_config(**over)), cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_what_zamba_cannot_express_is_refused(tmp_path: Path) -> None:
    """Zamba has one shared transformer, tied exactly when the head is, and no RoPE or adapters; a shared block
    outside the H family still names the classes that have one. Control: one block over every hybrid layer exports."""
    base = dict(d_model=16, vocab_size=VOCAB, max_seq_len=64, tie_embeddings=True, mamba1={"n_heads": 2})
    z = {"companion": "mamba1", "n_heads": 4}
    cases = [(dict(pattern="S H:a S H:a S H:b"), "runs one transformer in every hybrid layer"),
             (dict(pattern="S H:a S H:b"), "ties every hybrid layer's transformer"),
             (dict(pattern="S H S H"), "ties every hybrid layer's transformer"),
             (dict(pattern="S H:a S H:a", tie_embeddings=False), "only with a tied head"),
             (dict(pattern="S H:a S H:a", zamba={**z, "rope": True}), "zamba.rope=True has no counterpart"),
             (dict(pattern="S H:a S H:a", mamba1={"n_heads": 2, "dt_bc_norm": "weighted"}), "mamba1.dt_bc_norm")]
    for over, match in cases:
        cfg = ModelConfig(**{**base, "zamba": z, **over})
        with pytest.raises(InputError, match=match):
            export_transformers(HybridLM(cfg), cfg, tmp_path / "out")
    cfg = ModelConfig(pattern="A:a E A:a E", d_model=16, vocab_size=VOCAB, max_seq_len=64, moe={"n_experts": 1})
    with pytest.raises(InputError, match="only Zamba and Zamba2 reuse a block's weights"):
        export_transformers(HybridLM(cfg), cfg, tmp_path / "out")
    cfg = ModelConfig(**{**base, "pattern": "S H:a S H:a", "zamba": z})
    export_transformers(HybridLM(cfg), cfg, tmp_path / "out")
