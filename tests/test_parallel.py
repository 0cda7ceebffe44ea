"""Parallel layers ``[AM]``: the grammar, the configuration checks, the taps and selectors, and the mixer contract's
clauses for a model with parallel layers (causality, gradients, decoding with one cache per branch, prefill in
pieces, packed documents, FLOPs, the meta device), each against an independent computation or with a negative
control. Patterns without brackets keep every index, tap and key they had (one block per residual layer).
"""

from __future__ import annotations

from typing import Any

import pytest
import test_mixer_contract as contract
import torch
from test_documents import check_model_packed_equals_alone
from test_mixer_contract import VOCAB, D

from amer import HybridLM, ModelConfig
from amer.errors import ConfigError, PatternError
from amer.pattern import parse_pattern
from amer.tap import resolve_selector, tap_label, tap_names

ATOL = 1e-5
SMALL = {"attention": contract.SMALL["A"], "mamba": contract.SMALL["M"], "moe": contract.SMALL["E"],
         "deltanet": contract.SMALL["G"]}
PATTERN = "([AM]E)*2 [A G M]"


def config(pattern: str = PATTERN, **kw: Any) -> ModelConfig:
    tables = {k: dict(v) for k, v in SMALL.items()}
    for key, extra in kw.pop("tables", {}).items():
        tables[key].update(extra)
    return ModelConfig(pattern=pattern, d_model=D, vocab_size=VOCAB, max_seq_len=64, init_std=0.1, **tables, **kw)


def model(pattern: str = PATTERN, seed: int = 1, **kw: Any) -> HybridLM:
    return HybridLM(config(pattern, **kw), seed=seed)


def ids(T: int = 20, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# grammar


def test_parallel_layers_parse_and_round_trip() -> None:
    p = parse_pattern("([AM]E)*2 [A.swa M]@7")
    assert [(s.name, s.depth, s.branch) for s in p.layers[:5]] == [
        ("A0", 0, 0), ("M0", 0, 1), ("E0", 1, None), ("A1", 2, 0), ("M1", 2, 1)]
    assert p.depth == 7 and len(p) == 11 and p.layers[-1].variant is None
    assert p.letters == "[AM]E[AM]E[A.swa M][AM]E"
    assert parse_pattern(p.letters).layers == p.layers
    assert [[s.name for s in blocks] for blocks in p.residual_layers][:2] == [["A0", "M0"], ["E0"]]
    plain = parse_pattern("(AEME)*2|AR")  # without brackets: depth is the block index, no branches
    assert all(s.depth == s.index and s.branch is None for s in plain) and plain.depth == len(plain) == 10


@pytest.mark.parametrize("text,message,position", [
    ("A[]E", "empty parallel layer '\\[\\]'", 1),
    ("[A]E", "needs at least two blocks", 0),
    ("E[AM", "unbalanced '\\[': no matching '\\]'", 1),
    ("AM]", "unbalanced '\\]'", 2),
    ("[A(M)*2]", "a group cannot appear inside a parallel layer", 2),
    ("[A|M]", "a stage boundary", 2),
    ("[AM@2]", "'@DEPTH' cannot appear inside", 3),
    ("[A[MA]]", "a parallel layer cannot appear inside", 2),
    ("[A*2]", "a repeat count cannot appear inside", 2),
    ("[Am]", "unknown block 'm'", 2),
])
def test_parallel_layer_errors_are_positioned(text: str, message: str, position: int) -> None:
    with pytest.raises(PatternError, match=message) as info:
        parse_pattern(text)
    assert info.value.position == position and f"at position {position}" in str(info.value)
    assert "\n" not in str(info.value)


def test_branches_must_share_one_pre_norm() -> None:
    for table, what in (({"norm_placement": "sandwich"}, "sandwich"), ({"residual_multiplier": 0.5}, "0.5"),
                        ({"residual_normed": True}, "True")):
        with pytest.raises(ConfigError, match=f"branch of a parallel layer.*{what}") as info:
            config("[AM]E", tables={"mamba": table})
        assert "\n" not in str(info.value)
    config("[AM]E", tables={"moe": {"norm_placement": "sandwich"}})  # a block alone may (negative control)


# ------------------------------------------------------------------------------------------------
# the layer's arithmetic, taps and selectors


def test_parallel_layer_is_one_norm_and_a_sum_of_branches() -> None:
    """Against the layer written out by hand; negative control: the branches run one after the other differ."""
    m = model("[AM]E", tables={"attention": {"input_multiplier": 1.5, "update_multiplier": 0.5},
                               "mamba": {"input_multiplier": 0.7, "update_multiplier": 2.0}}).eval()
    a, mb, e = m.blocks
    assert mb.norm is None and [k for k in m.state_dict() if k.endswith("norm.weight")] == [
        "blocks.0.norm.weight", "blocks.2.norm.weight", "norm.weight"]
    with torch.no_grad():
        out = m(ids())
        x = m.embed(ids())
        h = a.norm(x)
        ya, ym = a.mixer(1.5 * h).y * 0.5, mb.mixer(0.7 * h).y * 2.0
        layer = x + ya + ym
        torch.testing.assert_close(out.taps.select("L0")[0].hidden, layer, rtol=0, atol=ATOL)
        torch.testing.assert_close(out.taps.select("A0")[0].hidden, x + ya, rtol=0, atol=ATOL)
        torch.testing.assert_close(out.taps.select("M0")[0].hidden, x + ym, rtol=0, atol=ATOL)
        after = x + ya
        sequential = after + mb.mixer(0.7 * a.norm(after)).y * 2.0
        assert (sequential - layer).abs().max() > 100 * ATOL


def test_taps_selectors_and_the_depth_trajectory() -> None:
    p = parse_pattern(PATTERN)
    names = tap_names(p)
    assert names == ["embed", "A0", "M0", "A0+M0", "E0", "A1", "M1", "A1+M1", "E1", "A2", "G0", "M2", "A2+G0+M2",
                     "final"]
    assert [names[i] for i in resolve_selector("L0,L-1", p)] == ["A0+M0", "A2+G0+M2"]
    assert [names[i] for i in resolve_selector("M", p)] == ["M0", "M1", "M2"]
    assert [names[i] for i in resolve_selector("L1:3", p)] == ["E0", "A1+M1"]
    assert [names[i] for i in resolve_selector("L", p)] == ["A0+M0", "E0", "A1+M1", "E1", "A2+G0+M2"]
    assert tap_label("A2+G0+M2") == "[AGM]" and tap_label("M2") == "M"
    out = model()(ids())
    assert [t.name for t in out.taps] == names
    assert [t.name for t in out.taps.residual_stream] == ["embed", "A0+M0", "E0", "A1+M1", "E1", "A2+G0+M2"]
    assert out.taps.final.name == "final" and len(out.taps.blocks) == 9
    partial = model()(ids(), taps="M1,L-1")
    assert [t.name for t in partial.taps] == ["M1", "A2+G0+M2"]
    torch.testing.assert_close(partial.logits, out.logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# the contract's clauses for a model with parallel layers


def test_causal() -> None:
    m = model().eval()
    x = ids()
    with torch.no_grad():
        base = m(x).logits
        for t in (0, 7, 19):
            y = x.clone()
            y[:, t] = (y[:, t] + 1) % VOCAB
            moved = (m(y).logits - base).abs().amax(dim=(0, 2))
            if t:
                assert moved[:t].max() == 0, t
            assert moved[t] > 0


def test_every_branch_gets_gradients() -> None:
    m = model()
    m(ids()).logits.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("splits", [(20,), (1,) * 20, (7, 1, 12)])
def test_decoding_with_one_cache_per_branch(splits: tuple[int, ...]) -> None:
    """Prefill in pieces and token steps through the caches give the forward's logits; each branch keeps its own
    cache (a KV cache, a Mamba state, a DeltaNet state). Negative control: sharing the Mamba branch's cache slot
    with the next layer's breaks it."""
    m = model().eval()
    x = ids()
    with torch.no_grad():
        want = m(x).logits
        cache = m.init_cache(2, 20)
        assert len(cache) == len(m.blocks) and cache[0] is not None and cache[1] is not None
        got, t = [], 0
        for n in splits:
            out = m(x[:, t:t + n], cache=cache)
            cache, t = out.cache, t + n
            got.append(out.logits)
        torch.testing.assert_close(torch.cat(got, 1), want, rtol=0, atol=ATOL)
        cache = m.init_cache(2, 20)
        out = m(x[:, :10], cache=cache)
        broken = list(out.cache)
        broken[1] = broken[4]  # M0's state replaced by M1's
        tail = m(x[:, 10:], cache=broken).logits
        assert (tail - want[:, 10:]).abs().max() > 100 * ATOL


def test_packed_documents_equal_alone() -> None:
    """Every tap (branches and layers) and the logits of a document in a packed row are its own, alone."""
    check_model_packed_equals_alone(model(), ids(24), ((0, 5, 8, 17), (0, 1, 16)))


def test_flops_params_and_the_meta_device() -> None:
    cfg = config()
    with torch.device("meta"):
        meta = HybridLM(cfg)
    m = HybridLM(cfg, seed=0)
    assert meta.num_params() == m.num_params()
    norms = sum(p.numel() for n, p in m.named_parameters() if n.endswith(".norm.weight"))
    assert norms == D * 5  # one norm per residual layer: 3 parallel layers and 2 E blocks
    from amer.bench.flops import forward_macs

    macs = forward_macs(cfg, 16)  # every branch counted: the same blocks one after the other cost the same
    assert macs == forward_macs(config("(AME)*2 AGM"), 16) and macs["M/ssd"] > 0


def test_compile_and_checkpointing_leave_branches_eager() -> None:
    from amer.training.checkpointing import apply_activation_checkpointing
    from amer.training.compile import compiles_block

    m = model()
    assert "parallel layer" in compiles_block(m.blocks[0]) and compiles_block(m.blocks[2]) is None
    assert apply_activation_checkpointing(m, "blocks") == 2  # the two E blocks
    out = m(ids())
    torch.testing.assert_close(out.logits, model()(ids()).logits, rtol=0, atol=0)


def test_pipeline_stages_cut_between_residual_layers() -> None:
    p = parse_pattern("[AM]E|[AM]E")
    assert [s.stage for s in p] == [0, 0, 0, 1, 1, 1] and p.letters == "[AM]E|[AM]E"


def test_curvature_walks_the_residual_layers() -> None:
    """The curvature engine's depth trajectory is embed, each residual layer, final: a parallel layer's combined tap
    is on it (boundary types like ``[AM]->E``), its branches are not."""
    from amer.analysis.curvature import evaluate

    g = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, VOCAB, (2, 16), generator=g),
                "doc_ids": torch.zeros(2, 16, dtype=torch.long)}]
    res = evaluate(model("([AM]E)*2").eval(), batches, n_bootstrap=10, progress=False)
    assert [b["name"] for b in res["boundaries"]] == ["embed->A0+M0", "A0+M0->E0", "E0->A1+M1", "A1+M1->E1",
                                                      "E1->final"]
    assert res["pattern"] == "[AM]E[AM]E" and {"embed->[AM]", "[AM]->E", "E->[AM]"} <= set(res["boundary_types"])
