"""HybridLM end to end: shapes, gradients, causality, cached decoding, taps, MoE outputs, presets, config errors.

Every test builds small fp32 models on CPU. A two-layer model of each family on its own is held to
the mixer contract in test_mixer_contract.py (gradients, causality, cached decoding, compile); here the
stacks are mixed, because the failure modes of a hybrid (a cache that one family forgets to advance,
a tap recorded under the wrong branch) only show up when families are combined.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amer import (
    AttentionConfig,
    ConfigError,
    Family,
    HybridLM,
    MambaConfig,
    ModelConfig,
    MoEConfig,
    RecurrentConfig,
    SelectorError,
    parse_pattern,
)
from amer.config import from_dict

VOCAB = 64
B, T = 2, 20
FAMILY_PATTERNS = ["AA", "MM", "EE", "RR"]
MIXED_PATTERNS = ["AEMR", "(AEME)*2R"]
ALL_PATTERNS = FAMILY_PATTERNS + MIXED_PATTERNS


def small_config(pattern: str, **overrides) -> ModelConfig:
    """Width 32; Mamba chunk 8 so T=20 spans three chunks and chunked prefills split mid-chunk.

    init_std 0.1 (not the training default 0.02) makes every block's update a large part of the
    logits, so a decoding cache that loses state moves them by >1e-2, far above the 1e-5 tolerance.
    """
    cfg = dict(
        pattern=pattern,
        init_std=0.1,
        d_model=32,
        vocab_size=VOCAB,
        max_seq_len=64,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        mamba=MambaConfig(d_state=8, head_dim=16, expand=2, chunk_size=8),
        moe=MoEConfig(n_experts=4, top_k=2, d_ff=48),
        recurrent=RecurrentConfig(n_heads=2),
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def build(pattern: str, seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(small_config(pattern, **overrides)).eval()


def tokens(seed: int = 1, b: int = B, t: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def zero_grad(p: torch.nn.Parameter) -> bool:
    return p.grad is None or not bool(p.grad.any())


# ------------------------------------------------------------------------------------------------
# forward, backward, causality


@pytest.mark.parametrize("pattern", MIXED_PATTERNS)
def test_logits_shape_and_gradients_reach_every_parameter(pattern: str) -> None:
    model = build(pattern).train()
    x = tokens()
    out = model(x)
    assert out.logits.shape == (B, T, VOCAB)
    assert out.logits.dtype == torch.float32
    loss = F.cross_entropy(out.logits.flatten(0, 1), x.roll(-1, 1).flatten()) + sum(out.aux_losses.values())
    loss.backward()
    dead = [n for n, p in model.named_parameters() if zero_grad(p)]
    assert not dead, f"parameters without gradient for pattern {pattern!r}: {dead}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("pattern", MIXED_PATTERNS)
def test_causality_future_token_never_changes_past_logits(pattern: str) -> None:
    model = build(pattern)
    x = tokens()
    with torch.no_grad():
        ref = model(x, taps=False).logits
        for t in (0, 7, 13, T - 1):
            y = x.clone()
            y[:, t] = (y[:, t] + 1 + torch.arange(B)) % VOCAB
            got = model(y, taps=False).logits
            torch.testing.assert_close(got[:, :t], ref[:, :t], atol=1e-6, rtol=0,
                                       msg=lambda m: f"{pattern}: token {t} leaked into earlier logits: {m}")
            # the probe must be able to see a change: position t itself does move
            assert (got[:, t] - ref[:, t]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# incremental decoding


@pytest.mark.parametrize("pattern", MIXED_PATTERNS)
def test_prefill_equals_token_by_token_decoding(pattern: str) -> None:
    model = build(pattern)
    x = tokens()
    with torch.no_grad():
        full = model(x, taps=False).logits
        cache = model.init_cache(B, T)
        steps = []
        for t in range(T):
            out = model(x[:, t : t + 1], taps=False, cache=cache)
            assert out.logits.shape == (B, 1, VOCAB)
            cache = out.cache
            steps.append(out.logits)
        stepped = torch.cat(steps, dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", MIXED_PATTERNS)
@pytest.mark.parametrize("split", [1, 7, 16])
def test_chunked_prefill_equals_full_forward(pattern: str, split: int) -> None:
    model = build(pattern)
    x = tokens()
    with torch.no_grad():
        full = model(x, taps=False).logits
        out1 = model(x[:, :split], taps=False, cache=model.init_cache(B, T))
        out2 = model(x[:, split:], taps=False, cache=out1.cache)
    torch.testing.assert_close(torch.cat([out1.logits, out2.logits], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["AEMR", "(AEME)*2R"])
def test_greedy_generate_matches_full_forward_rerun(pattern: str) -> None:
    model = build(pattern, init_std=0.2)  # spread logits so greedy argmax has no near-ties
    prompt = tokens(t=6)
    n_new = 5
    got = model.generate(prompt, n_new, temperature=0.0)
    assert got.shape == (B, 6 + n_new)
    seq = prompt
    with torch.no_grad():
        for _ in range(n_new):
            nxt = model(seq, taps=False).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(got, seq)


def _greedy_rerun(model, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    seq = prompt
    with torch.no_grad():
        for _ in range(n_new):
            seq = torch.cat([seq, model(seq, taps=False).logits[:, -1].argmax(-1)[:, None]], dim=1)
    return seq


def test_decoding_rope_table_follows_cache_size_and_dtype() -> None:
    """Decoding reads RoPE angles from a table built per cache size, device and dtype: a second cache size
    and a model converted to fp64 must each get their own table, not a stale one."""
    model = build("AEMR", init_std=0.2)
    prompt = tokens(t=6)
    for n_new in (3, 7):  # caches of 9 and 13 positions
        assert torch.equal(model.generate(prompt, n_new, temperature=0.0), _greedy_rerun(model, prompt, n_new))
    model.double()
    got = model.generate(prompt, 4, temperature=0.0)
    assert torch.equal(got, _greedy_rerun(model, prompt, 4))
    attn = next(b.mixer for b in model.blocks if b.layer.family == "A")
    assert attn._rope_table[0][2] == torch.float64 and attn._rope_table[1][0].dtype == torch.float64


def test_equal_length_prompts_take_the_same_path_as_ragged_ones() -> None:
    """``generate`` skips the per-row masks when every prompt has the same length and there is no stop token;
    with a stop token that never comes, the masked loop must give the same tokens."""
    from amer.generate import decode

    model = build("AEMR", init_std=0.2)
    prompts = tokens(t=6).tolist()
    fast = decode(model, prompts, 5)
    masked = decode(model, prompts, 5, eos_id=model.cfg.vocab_size + 7)  # an id no row can produce
    assert fast == masked and all(len(c) == 5 for c in fast)


# ------------------------------------------------------------------------------------------------
# taps


def expected_layers(pattern: str) -> list[tuple[int, str, int]]:
    """(absolute index, family letter, family index), derived from the letters independently of Pattern."""
    letters = parse_pattern(pattern).letters.replace("|", "")
    seen: dict[str, int] = {}
    rows = []
    for i, ch in enumerate(letters):
        rows.append((i, ch, seen.get(ch, 0)))
        seen[ch] = seen.get(ch, 0) + 1
    return rows


@pytest.mark.parametrize("pattern", ALL_PATTERNS + ["AEMEAR"])
def test_taps_count_order_and_fields(pattern: str) -> None:
    model = build(pattern)
    x = tokens()
    out = model(x)
    rows = expected_layers(pattern)
    L = len(rows)
    taps = out.taps
    assert len(taps) == L + 2 == model.cfg.n_layers + 2
    assert [t.kind for t in taps] == ["embed"] + ["block"] * L + ["final"]
    assert taps[0].layer == -1 and taps[0].family is None and taps[0].name == "embed"
    assert taps[-1].layer == L and taps[-1].family is None and taps[-1].name == "final"
    for tap, (i, ch, fi) in zip(taps[1:-1], rows):
        assert (tap.layer, tap.family, tap.index) == (i, Family(ch), fi)
        assert tap.name == f"{ch}{fi}"
    for tap in taps:
        assert tap.hidden.shape == (B, T, model.cfg.d_model)
        assert tap.hidden.requires_grad and tap.hidden.grad_fn is not None  # on the graph, not detached
    # the embedding tap is the embedding, the final tap is what the LM head reads
    assert torch.equal(taps[0].hidden, model.embed(x))
    torch.testing.assert_close(model.lm_head(taps[-1].hidden), out.logits)
    # block taps are the residual stream: each one is the next block's input
    with torch.no_grad():
        for blk, before, after in zip(model.blocks, taps[:-2], taps[1:-1]):
            assert torch.equal(blk(before.hidden)[0], after.hidden)


def test_select_returns_the_named_taps() -> None:
    model = build("(AEME)*2R")  # A0 E0 M0 E1 A1 E2 M1 E3 R0
    out = model(tokens())
    picked = out.taps.select("A-1,M0,L3,final")
    assert [t.name for t in picked] == ["M0", "E1", "A1", "final"]  # depth order, not selector order
    assert [t.layer for t in picked] == [2, 3, 4, 9]
    for tap in picked:
        pos = tap.layer + 1
        assert tap.hidden is out.taps[pos].hidden
    assert [t.name for t in out.taps.select("E")] == ["E0", "E1", "E2", "E3"]
    with pytest.raises(SelectorError, match=r"selector 'A5' selects nothing: the pattern has attention blocks A0..A1"):
        out.taps.select("A5")


@pytest.mark.parametrize("pattern, k", [("AEMR", 1), ("(AEME)*2R", 4), ("(AEME)*2R", 0), ("MMRR", 2)])
def test_backward_from_one_tap_reaches_earlier_blocks_only(pattern: str, k: int) -> None:
    model = build(pattern).train()
    out = model(tokens())
    h = out.taps[k + 1].hidden  # the tap of block k
    assert out.taps[k + 1].layer == k
    probe = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    (h * probe).sum().backward()
    assert not zero_grad(model.embed.weight)
    for i, blk in enumerate(model.blocks):
        for name, p in blk.named_parameters():
            if i <= k:
                assert not zero_grad(p), f"block {i} ({blk.layer.name}) param {name} got no gradient from tap L{k}"
            else:
                assert p.grad is None, f"block {i} ({blk.layer.name}) param {name} got a gradient from tap L{k}"
    assert model.norm.weight.grad is None


def test_taps_false_and_partial_recording() -> None:
    model = build("AEMEAR")
    x = tokens()
    full = model(x)
    none = model(x, taps=False)
    assert none.taps is None
    torch.testing.assert_close(none.logits, full.logits, atol=0, rtol=0)

    part = model(x, taps="A-1")
    assert len(part.taps) == 1
    (tap,) = part.taps
    assert (tap.name, tap.layer) == ("A1", 4)
    assert torch.equal(tap.hidden, full.taps[5].hidden)
    assert [t.name for t in part.taps.select("A-1")] == ["A1"]
    with pytest.raises(SelectorError, match=r"tap M0 was not recorded"):
        part.taps.select("M0")
    with pytest.raises(SelectorError, match=r"tap final was not recorded"):
        _ = part.taps.final

    two = model(x, taps="final,E0")
    assert [t.name for t in two.taps] == ["E0", "final"]
    with pytest.raises(SelectorError, match="selects nothing"):
        model(x, taps="R3")


# ------------------------------------------------------------------------------------------------
# MoE auxiliary losses and stats


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_aux_losses_and_stats(pattern: str) -> None:
    model = build(pattern).train()
    out = model(tokens())
    n_e = parse_pattern(pattern).count("E")
    if n_e:
        assert set(out.aux_losses) == {"moe_lb", "moe_z"}
        for v in out.aux_losses.values():
            assert v.dim() == 0 and v.requires_grad and torch.isfinite(v) and v > 0
        assert "moe/drop_frac" in out.stats
        assert float(out.stats["moe/drop_frac"]) == 0.0  # dropless dispatch drops nothing
        for i in range(n_e):
            assert f"moe/drop_frac/E{i}" in out.stats
    else:
        assert out.aux_losses == {}
        assert not any(k.startswith("moe/") for k in out.stats)


def test_capacity_dispatch_reports_drops() -> None:
    moe = MoEConfig(n_experts=4, top_k=2, d_ff=48, dispatch="capacity", capacity_factor=0.25,
                    capacity_block=8)
    model = build("AE", moe=moe)
    out = model(tokens())
    assert 0.0 < float(out.stats["moe/drop_frac"]) < 1.0


# ------------------------------------------------------------------------------------------------
# the large preset and the CLI


def test_nam56r_builds_on_meta_device() -> None:
    cfg = ModelConfig.from_preset("nam56r")
    assert cfg.n_layers == 52
    with torch.device("meta"):
        model = HybridLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    n = model.num_params()
    assert n > 1e9
    counts = {f: parse_pattern(cfg.pattern).count(f) for f in "AMER"}
    assert counts == {"A": 13, "M": 13, "E": 22, "R": 4}


def test_cli_patterns_lists_nam56r_with_parameter_count(capsys: pytest.CaptureFixture[str]) -> None:
    from amer.cli import main

    assert main(["patterns"]) == 0
    lines = capsys.readouterr().out.splitlines()
    with torch.device("meta"):
        n = HybridLM(ModelConfig.from_preset("nam56r")).num_params()
    (row,) = [ln for ln in lines if ln.split() and ln.split()[0] == "nam56r"]
    assert f"{n / 1e9:.2f}B" in row
    assert "AEMEAEMEAEMR@52" in row
    for name in ("tiny", "small"):
        assert any(ln.split() and ln.split()[0] == name for ln in lines)


# ------------------------------------------------------------------------------------------------
# config validation


def test_unknown_key_suggests_closest_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'd_modle'; did you mean 'd_model'\?"):
        from_dict(ModelConfig, {"pattern": "AM", "d_modle": 32})
    with pytest.raises(ConfigError, match=r"unknown key 'attention\.n_head'; did you mean 'n_heads'\?"):
        from_dict(ModelConfig, {"attention": {"n_head": 4}})
    with pytest.raises(ConfigError, match=r"unknown key 'model\.moe\.topk'; did you mean 'top_k'\?"):
        ModelConfig.from_preset("tiny", moe={"topk": 2})


def test_config_value_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"attention\.n_heads \(6\) must be divisible by attention\.n_kv_heads \(4\)"):
        AttentionConfig(n_heads=6, n_kv_heads=4)
    with pytest.raises(ConfigError, match=r"accepted n_kv_heads: \[1, 2, 3, 6\]"):
        from_dict(ModelConfig, {"attention": {"n_heads": 6, "n_kv_heads": 4}})
    with pytest.raises(ConfigError, match=r"moe\.top_k \(5\) must be between 1 and moe\.n_experts \(4\)"):
        MoEConfig(n_experts=4, top_k=5)
    with pytest.raises(ConfigError, match=r"mamba\.head_dim \(24\)"):
        small_config("AM", mamba=MambaConfig(head_dim=24))
    with pytest.raises(ConfigError, match=r"d_model \(30\) must be divisible by attention\.n_heads \(4\)"):
        small_config("A", d_model=30)
    with pytest.raises(ConfigError, match=r"moe\.dispatch must be one of"):
        from_dict(ModelConfig, {"moe": {"dispatch": "sparse"}})
    # a family's constraints only apply when the pattern uses that family
    assert small_config("AE", mamba=MambaConfig(head_dim=24)).n_layers == 2


def test_empty_then_assign_is_the_model_holding_those_tensors() -> None:
    cfg = ModelConfig(pattern="AEMR", d_model=32, max_seq_len=64)
    torch.manual_seed(0)
    built = HybridLM(cfg).eval()
    state = {k: v.clone() for k, v in built.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    model = HybridLM.empty(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.assign(state).eval()
    assert model.embed.weight.data_ptr() == state["embed.weight"].data_ptr()  # the tensor itself, no copy
    assert model.lm_head.weight is model.embed.weight
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, built(ids).logits)  # RoPE frequencies computed, not left on meta
    # a buffer that weights do not carry and no init_buffers() computes is named, not left as meta
    odd = HybridLM.empty(cfg)
    odd.blocks[1].register_buffer("table", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(RuntimeError, match="blocks.1.table"):
        odd.assign(state)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: every weight must be given
        HybridLM.empty(cfg).assign({k: v for k, v in state.items() if k != "norm.weight"})
