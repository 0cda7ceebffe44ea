"""Causal, row-local capacity MoE: no future token and no other row changes a token's routing or output,
decoding equals the full forward, a roomy capacity equals dropless; the old batch-wide queue fails."""

from __future__ import annotations

import math

import pytest
import torch

from amer import HybridLM, ModelConfig, MoEConfig
from amer.blocks.moe import MoEMixer, route
from amer.ops.moe import dense_reference, dispatch_capacity, expert_capacity
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


def reference_keep(idx: torch.Tensor, capacity: int, block: int) -> torch.Tensor:
    """The drop policy written as a loop: per row, per block of ``block`` positions, token-major queue."""
    B, T, k = idx.shape
    keep = torch.zeros(B, T, k, dtype=torch.bool)
    for b in range(B):
        seen = [0] * E
        for t in range(T):
            if t % block == 0:
                seen = [0] * E
            for j in range(k):
                e = int(idx[b, t, j])
                keep[b, t, j] = seen[e] < capacity
                seen[e] += 1
    return keep


def causal_leak(fn, x: torch.Tensor, t: int) -> float:
    """Largest change of outputs before position ``t`` when token ``t`` (and every later one) changes."""
    x2 = x.clone()
    x2[:, t:] = torch.randn_like(x2[:, t:]) * 3
    with torch.no_grad():
        return float((fn(x2)[:, :t] - fn(x)[:, :t]).abs().max())


# ------------------------------------------------------------------------------------------------ policy


def test_capacity_formula_and_drop_policy_match_the_loop() -> None:
    assert block_capacity(128, 2, 8, 1.25) == 40 and block_capacity(16, 2, 4, 100.0) == 16
    assert block_capacity(4, 1, 64, 0.01) == 1
    mixer = make(capacity_factor=0.5, capacity_block=8)
    x = torch.randn(3, 21, D)
    out = mixer(x)
    _, _, idx = route(x.float() @ mixer.router.weight.T, K)
    C = block_capacity(8, K, E, 0.5)
    keep = reference_keep(idx, C, 8)
    assert C == 2 and (~keep).any()
    torch.testing.assert_close(out.stats["moe/drop_frac"], (~keep).float().mean())
    # the output is the dense oracle with the dropped slots' weights zeroed
    probs = (x.float() @ mixer.router.weight.T).softmax(-1)
    top = probs.gather(-1, idx)
    w = top / top.sum(-1, keepdim=True) * keep
    dense = torch.zeros(3, 21, E).scatter(-1, idx, w)
    torch.testing.assert_close(out.y, dense_reference(x, dense, mixer.w_gate_up, mixer.w_down), rtol=1e-5, atol=1e-5)


def test_hand_computed_block_queue() -> None:
    """One row, block 2, capacity 1, k 1: t0->e0 kept, t1->e0 dropped, t2->e0 kept (new block), t3->e1 kept."""
    Fh = 5
    g = torch.Generator().manual_seed(0)
    wgu = torch.randn(2, 3, 2 * Fh, generator=g, dtype=torch.float64)
    wd = torch.randn(2, Fh, 3, generator=g, dtype=torch.float64)
    x = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    idx = torch.tensor([[[0], [0], [0], [1]]])
    w = torch.ones(1, 4, 1, dtype=torch.float64)
    y, dropped, counts = dispatch_causal_capacity(x, idx, w, wgu, wd, capacity=1, block=2)
    assert int(dropped) == 1 and (y[0, 1] == 0).all() and (y[0, [0, 2, 3]] != 0).all()
    assert counts.tolist() == [[1, 1]]  # the last block: e0 once (t2), e1 once (t3)


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


def test_buffer_is_about_capacity_factor_times_slots() -> None:
    """The static buffer scales with the block capacity, not with the number of tokens times experts."""
    B, T, block, cf = 2, 64, 32, 1.25
    C = block_capacity(block, K, E, cf)
    rows = E * B * math.ceil(T / block) * min(C, block, T)
    assert rows <= math.ceil(cf * B * T * K) + E * B * 2
