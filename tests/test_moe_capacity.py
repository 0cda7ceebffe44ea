"""Causal, row-local, document-local capacity MoE: no future token, no other row and no other packed document
changes a token's routing or output, decoding equals the full forward, a roomy capacity equals dropless; the
old batch-wide queue and a budget shared across documents fail."""

from __future__ import annotations

import math

import pytest
import torch

from amer import HybridLM, ModelConfig, MoEConfig
from amer.blocks import DocIds
from amer.blocks.moe import MoEMixer, route
from amer.ops.moe import dense_reference, dispatch_capacity, expert_capacity, swiglu_expert
from amer.ops.moe_capacity import CapacityCache, block_capacity, dispatch_causal_capacity

E, K, D = 4, 2, 32


def make(dtype: torch.dtype = torch.float32, seed: int = 0, **moe) -> MoEMixer:
    torch.manual_seed(seed)
    moe = {"n_experts": E, "top_k": K, "dispatch": "capacity", **moe}
    cfg = ModelConfig(pattern="E", d_model=D, moe=MoEConfig(**moe))
    mixer = MoEMixer(cfg.moe, cfg.dims, cfg.parsed.layers[0]).to(dtype)
    with torch.no_grad():  # peaked router: many tokens want the same experts, so small capacities drop
        mixer.router.weight.normal_(0.0, 1.0)
        mixer.router.weight[0] += 0.5
    return mixer


def model(seed: int = 0, **moe) -> HybridLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern="AEME", d_model=D, vocab_size=64, max_seq_len=64,
                      moe=MoEConfig(n_experts=E, top_k=K, dispatch="capacity", **moe))
    m = HybridLM(cfg).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, MoEMixer):
                mod.router.weight.normal_(0.0, 1.0)
                mod.router.weight[0] += 0.5
    return m


def reference_keep(idx: torch.Tensor, capacity: int, block: int, position: torch.Tensor | None = None) -> torch.Tensor:
    """The drop policy written as a loop: per row and document, token-major, expert e keeps at most
    floor(n * capacity / block) slots of the document's first n tokens."""
    B, T, k = idx.shape
    keep = torch.zeros(B, T, k, dtype=torch.bool)
    for b in range(B):
        kept = [0] * E
        for t in range(T):
            p = t if position is None else int(position[b, t])
            if p == 0:
                kept = [0] * E
            for j in range(k):
                e = int(idx[b, t, j])
                keep[b, t, j] = kept[e] < (p + 1) * capacity // block
                kept[e] += int(keep[b, t, j])
    return keep


def doc_ids(cuts: list[tuple[int, ...]] | tuple[tuple[int, ...], ...], length: int) -> torch.Tensor:
    """(B, T) document ids from each row's document starts."""
    ids = torch.zeros(len(cuts), length, dtype=torch.long)
    for r, starts in enumerate(cuts):
        for s in starts[1:]:
            ids[r, s:] += 1
    return ids


def causal_leak(fn, x: torch.Tensor, t: int) -> float:
    """Largest change of outputs before position ``t`` when token ``t`` (and every later one) changes."""
    x2 = x.clone()
    x2[:, t:] = torch.randn_like(x2[:, t:]) * 3
    with torch.no_grad():
        return float((fn(x2)[:, :t] - fn(x)[:, :t]).abs().max())


# ------------------------------------------------------------------------------------------------ policy


@pytest.mark.parametrize("packed", [False, True])
def test_capacity_formula_and_drop_policy_match_the_loop(packed: bool) -> None:
    assert block_capacity(128, 2, 8, 1.25) == 40 and block_capacity(16, 2, 4, 100.0) == 16
    assert block_capacity(4, 1, 64, 0.01) == 1
    mixer = make(capacity_factor=0.5, capacity_block=8)
    x = torch.randn(3, 21, D)
    docs = DocIds(doc_ids([(0,), (0, 1, 9, 17), (0, 8, 11)], 21)) if packed else None
    out = mixer(x, doc_ids=docs)
    _, _, idx = route(x.float() @ mixer.router.weight.T, K)
    C = block_capacity(8, K, E, 0.5)
    keep = reference_keep(idx, C, 8, None if docs is None else docs.position)
    assert C == 2 and (~keep).any() and keep.any()
    torch.testing.assert_close(out.stats["moe/drop_frac"], (~keep).float().mean())
    # the output is the dense oracle with the dropped slots' weights zeroed
    probs = (x.float() @ mixer.router.weight.T).softmax(-1)
    top = probs.gather(-1, idx)
    w = top / top.sum(-1, keepdim=True) * keep
    dense = torch.zeros(3, 21, E).scatter(-1, idx, w)
    torch.testing.assert_close(out.y, dense_reference(x, dense, mixer.w_gate_up, mixer.w_down), rtol=1e-5, atol=1e-5)


def test_any_packing_matches_the_loop_and_fits_the_buffer() -> None:
    """Random packings (one-token documents only, a few long ones, anything between), block sizes and
    capacities, routings peaked on one expert or spread: the dispatch keeps what the loop keeps, so no kept
    slot ever overflows its static buffer region into another's."""
    g = torch.Generator().manual_seed(11)
    for trial in range(24):
        B, T = 2, int(torch.randint(1, 41, (1,), generator=g))
        block = [1, 3, 8, 16][trial % 4]
        C = int(torch.randint(1, block + 1, (1,), generator=g))
        p_start = [1.0, 0.3, 0.05][trial % 3]
        starts = torch.rand(B, T, generator=g) < p_start
        starts[:, 0] = True
        ids = starts.long().cumsum(1)
        if trial % 2:  # every token asks expert 0 and expert 1
            idx = torch.tensor([0, 1]).expand(B, T, K).clone()
        else:
            idx = torch.rand(B, T, E, generator=g).topk(K, -1).indices
        x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        w = torch.rand(B, T, K, generator=g, dtype=torch.float64)
        wgu = torch.randn(E, D, 8, generator=g, dtype=torch.float64)
        wd = torch.randn(E, 4, D, generator=g, dtype=torch.float64)
        docs = DocIds(ids)
        y, dropped, _ = dispatch_causal_capacity(x, idx, w, wgu, wd, capacity=C, block=block, position=docs.position)
        keep = reference_keep(idx, C, block, docs.position)
        dense = torch.zeros(B, T, E, dtype=torch.float64).scatter(-1, idx, w * keep)
        assert int(dropped) == int((~keep).sum()), trial
        torch.testing.assert_close(y, dense_reference(x, dense, wgu, wd), rtol=1e-10, atol=1e-10, msg=str(trial))


def test_hand_computed_budget() -> None:
    """One row, block 2, capacity 1 (one slot earned per two tokens), k 1: t0->e0 dropped (nothing earned yet),
    t1->e0 kept, t2->e0 dropped (still one slot earned), t3->e1 kept; as two documents [0, 2) and [2, 4),
    t2 is its document's first token (dropped) and t3 its second (kept)."""
    Fh = 5
    g = torch.Generator().manual_seed(0)
    wgu = torch.randn(2, 3, 2 * Fh, generator=g, dtype=torch.float64)
    wd = torch.randn(2, Fh, 3, generator=g, dtype=torch.float64)
    x = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    idx = torch.tensor([[[0], [0], [0], [1]]])
    w = torch.ones(1, 4, 1, dtype=torch.float64)
    y, dropped, counts = dispatch_causal_capacity(x, idx, w, wgu, wd, capacity=1, block=2)
    assert int(dropped) == 2 and (y[0, [0, 2]] == 0).all() and (y[0, [1, 3]] != 0).all()
    assert counts.tolist() == [[1, 1]]  # the document's kept slots: e0 once (t1), e1 once (t3)
    idx = torch.tensor([[[0], [1], [1], [1]]])
    y, dropped, counts = dispatch_causal_capacity(x, idx, w, wgu, wd, capacity=1, block=2,
                                                  position=torch.tensor([[0, 1, 0, 1]]))
    assert int(dropped) == 2 and (y[0, [0, 2]] == 0).all() and (y[0, [1, 3]] != 0).all()
    assert counts.tolist() == [[0, 1]]  # the last document's: e1 once (t3)
    with pytest.raises(ValueError, match="position"):
        dispatch_causal_capacity(x, idx, w, wgu, wd, capacity=1, block=2, start=2, position=torch.zeros(1, 4))


# ----------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("block,factor", [(5, 0.5), (128, 0.05)])
def test_future_tokens_never_change_earlier_outputs(block: int, factor: float) -> None:
    mixer = make(capacity_factor=factor, capacity_block=block)
    x = torch.randn(2, 24, D)
    assert float(mixer(x).stats["moe/drop_frac"]) > 0  # the test is about a layer that does drop
    for t in (1, 7, 13, 23):
        assert causal_leak(lambda z: mixer(z).y, x, t) <= 1e-6, t


def test_future_tokens_never_change_earlier_logits() -> None:
    m = model(capacity_factor=0.5, capacity_block=8)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(ids, taps=False)
        assert float(out.stats["moe/drop_frac"]) > 0
        for t in (3, 9, 20, 31):
            ids2 = ids.clone()
            ids2[:, t:] = (ids2[:, t:] + 7) % 64
            diff = (m(ids2, taps=False).logits[:, :t] - out.logits[:, :t]).abs().max()
            assert diff <= 1e-6, (t, float(diff))


def test_rows_are_independent() -> None:
    m = model(capacity_factor=0.5, capacity_block=8)
    ids = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = m(ids, taps=False).logits
        other = ids.clone()
        other[0] = (other[0] * 5 + 3) % 64
        changed = m(other, taps=False).logits
        alone = m(ids[1:2], taps=False).logits
    assert (changed[0] - out[0]).abs().max() > 1e-3  # row 0 did change
    assert (changed[1:] - out[1:]).abs().max() <= 1e-6
    torch.testing.assert_close(alone[0], out[1], rtol=1e-5, atol=1e-6)  # batch size does not matter either


def test_batch_global_queue_fails_the_causality_test() -> None:
    """Negative control: the GShard queue over the whole batch (choice-major) lets later tokens and other
    rows take an earlier token's place, which the same check detects."""
    mixer = make(capacity_factor=0.5)

    def global_queue(z: torch.Tensor) -> torch.Tensor:
        _, w, idx = route(z.float() @ mixer.router.weight.T, K)
        C = expert_capacity(z.shape[0] * z.shape[1], K, E, 0.5)
        return dispatch_capacity(z, idx, w, mixer.w_gate_up, mixer.w_down, C)[0]

    x = torch.randn(2, 24, D)
    assert max(causal_leak(global_queue, x, t) for t in (7, 13)) > 1e-3
    assert max(causal_leak(lambda z: mixer(z).y, x, t) for t in (7, 13)) <= 1e-6


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("prefill", [0, 3, 8, 11])
def test_mixer_prefill_then_steps_equals_full_forward(prefill: int) -> None:
    mixer = make(capacity_factor=0.5, capacity_block=8)
    x = torch.randn(2, 20, D)
    full = mixer(x)
    cache = mixer.init_cache(2, 20)
    assert isinstance(cache, CapacityCache)
    ys = []
    if prefill:
        out = mixer(x[:, :prefill], cache=cache)
        cache = out.cache
        ys.append(out.y)
    for t in range(prefill, 20):
        out = mixer(x[:, t:t + 1], cache=cache)
        cache = out.cache
        ys.append(out.y)
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(ys, 1), full.y, rtol=0, atol=1e-6)


def test_model_prefill_then_decoding_equals_full_forward() -> None:
    m = model(capacity_factor=0.5, capacity_block=8)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(ids, taps=False)
        assert float(full.stats["moe/drop_frac"]) > 0
        cache = m.init_cache(2, 30)
        out = m(ids[:, :13], taps=False, cache=cache)
        logits = [out.logits]
        for t in range(13, 30):
            out = m(ids[:, t:t + 1], taps=False, cache=out.cache)
            logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ roomy capacity


@pytest.mark.parametrize("k", [1, 2])
def test_large_capacity_equals_dropless(k: int) -> None:
    cap = make(dtype=torch.float64, top_k=k, capacity_factor=float(E), capacity_block=16)
    drop = make(dtype=torch.float64, top_k=k, dispatch="dropless")
    drop.load_state_dict(cap.state_dict())
    x = torch.randn(3, 37, D, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = drop(xa), cap(xb)
    torch.testing.assert_close(b.y, a.y, rtol=1e-12, atol=1e-12)
    assert float(b.stats["moe/drop_frac"]) == 0
    (a.y.square().sum() + sum(a.aux.values())).backward()
    (b.y.square().sum() + sum(b.aux.values())).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(drop.named_parameters(), cap.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("packed", [False, True])
def test_buffer_is_about_capacity_factor_times_slots(packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The static buffer the experts run on scales with the capacity factor, not with tokens times experts,
    and packing documents does not enlarge it."""
    import amer.ops.moe_capacity as cap

    shapes = []

    def record(buf, *a):
        shapes.append(tuple(buf.shape))
        return swiglu_expert(buf, *a)

    monkeypatch.setattr(cap, "swiglu_expert", record)
    B, T, block, cf = 2, 64, 32, 1.25
    mixer = make(capacity_factor=cf, capacity_block=block)
    mixer(torch.randn(B, T, D), doc_ids=DocIds(doc_ids([(0, 5, 6, 40), (0, 32)], T)) if packed else None)
    (n_experts, rows, _), = shapes
    assert n_experts == E and rows * E <= math.ceil(cf * B * T * K) + E * B


# ---------------------------------------------------------------------------------- packed documents
# Two rows of 64 tokens, capacity blocks of 8: documents start mid-block, exactly on block edges, and one
# is a single token. Each document must get exactly what it gets alone in a row of its own, drops included.

T_PACKED = 64
CUTS = ((0, 5, 16, 29, 30, 51), (0, 8, 13, 40, 56))


def spans(cuts: tuple[tuple[int, ...], ...], length: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document."""
    return [(r, s, e) for r, starts in enumerate(cuts) for s, e in zip(starts, (*starts[1:], length))]


def packed_vs_alone(mixer: MoEMixer, documents: bool) -> tuple[float, float, float]:
    """(largest output or input-gradient gap of a document vs itself alone over the documents after the
    first of each row, the same over the first documents, the packed drop fraction)."""
    x = torch.randn(2, T_PACKED, D, generator=torch.Generator().manual_seed(7)).requires_grad_()
    probe = torch.randn(2, T_PACKED, D, generator=torch.Generator().manual_seed(8))
    out = mixer(x, doc_ids=DocIds(doc_ids(CUTS, T_PACKED)) if documents else None)
    (g,) = torch.autograd.grad((out.y * probe).sum(), [x])
    y = out.y.detach()
    gaps = {True: 0.0, False: 0.0}
    n_dropped = 0.0
    for r, s, e in spans(CUTS, T_PACKED):
        xd = x.detach()[r:r + 1, s:e].clone().requires_grad_()
        alone = mixer(xd)
        (gd,) = torch.autograd.grad((alone.y * probe[r:r + 1, s:e]).sum(), [xd])
        gap = max(float((y[r:r + 1, s:e] - alone.y.detach()).abs().max()), float((g[r:r + 1, s:e] - gd).abs().max()))
        gaps[s == 0] = max(gaps[s == 0], gap)
        n_dropped += float(alone.stats["moe/drop_frac"]) * (e - s) * K
    drop = float(out.stats["moe/drop_frac"])
    if documents:  # moe/drop_frac keeps its meaning: dropped slots over all slots, the documents' drops summed
        assert abs(drop * 2 * T_PACKED * K - n_dropped) < 1e-3, (drop * 2 * T_PACKED * K, n_dropped)
    return gaps[False], gaps[True], drop


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_packed_document_equals_alone_with_drops(factor: float) -> None:
    mixer = make(capacity_factor=factor, capacity_block=8)
    later, first, drop = packed_vs_alone(mixer, documents=True)
    assert drop >= 0.10, drop  # a planted overflow: the budget binds
    assert later <= 1e-7 and first <= 1e-7, (later, first)  # outputs are ~5e-4: one slot kept or not is ~1e-3


def test_shared_budget_fails_packed_equals_alone() -> None:
    """Negative control: the same packed rows without their documents share one budget per row, and the
    documents after the first drop differently from themselves alone (the first one is unaffected)."""
    mixer = make(capacity_factor=1.0, capacity_block=8)
    later, first, drop = packed_vs_alone(mixer, documents=False)
    assert drop > 0.05 and first <= 1e-7 and later > 1e-3, (later, first, drop)


def packed_model(pattern: str, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern=pattern, d_model=D, vocab_size=64, max_seq_len=T_PACKED, init_std=0.1,
                      moe=MoEConfig(n_experts=E, top_k=K, dispatch="capacity", capacity_factor=1.0, capacity_block=8))
    m = HybridLM(cfg).eval()
    with torch.no_grad():  # a peaked router: an overflow in every block
        for mod in m.modules():
            if isinstance(mod, MoEMixer):
                mod.router.weight.normal_(0.0, 1.0)
                mod.router.weight[0] += 0.5
    return m


@pytest.mark.parametrize("pattern", ["E", "AEMR"])
def test_model_packed_documents_equal_alone_and_decoding(pattern: str) -> None:
    """Every tap and the logits of each packed document equal the document alone; decoding it from a fresh
    cache (a prefill of 5 tokens, then one token at a time across capacity-block edges) reproduces them."""
    m = packed_model(pattern)
    ids = torch.randint(0, 64, (2, T_PACKED), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        packed = m(ids, doc_ids=doc_ids(CUTS, T_PACKED))
        assert float(packed.stats["moe/drop_frac"]) >= 0.10
        for r, s, e in spans(CUTS, T_PACKED):
            doc = ids[r:r + 1, s:e]
            alone = m(doc)
            for tap_p, tap_a in zip(packed.taps, alone.taps):
                where = f"{pattern}: {tap_a.label} of [{s}, {e}) in row {r}"
                torch.testing.assert_close(tap_p.hidden[r:r + 1, s:e], tap_a.hidden, rtol=0, atol=1e-5,
                                           msg=lambda msg, w=where: f"{w}: {msg}")
            pre = min(5, e - s)
            out = m(doc[:, :pre], taps=False, cache=m.init_cache(1, e - s))
            logits = [out.logits]
            for t in range(pre, e - s):
                out = m(doc[:, t:t + 1], taps=False, cache=out.cache)
                logits.append(out.logits)
            torch.testing.assert_close(torch.cat(logits, 1), packed.logits[r:r + 1, s:e], rtol=1e-5, atol=1e-5,
                                       msg=lambda msg, w=f"{pattern}: decoding [{s}, {e}) of row {r}": f"{w}: {msg}")
