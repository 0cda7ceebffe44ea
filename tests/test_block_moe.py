"""E family: routing, dispatch parity against the dense oracle, capacity drops, aux losses, compile."""

from __future__ import annotations

import math

import pytest
import torch

from amer import ModelConfig, MoEConfig
from amer.blocks.moe import MoEMixer, route
from amer.families import Family
from amer.ops.moe import (
    dense_reference,
    dispatch_capacity,
    dispatch_dropless,
    expert_capacity,
    grouped_swiglu,
    swiglu_expert,
)


def make(d_model: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0, pattern: str = "E",
         **moe) -> MoEMixer:
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern=pattern, d_model=d_model, moe=MoEConfig(**moe))
    mixer = MoEMixer(cfg.moe, cfg.dims, cfg.parsed.layers[0]).to(dtype)
    # larger router weights than init_std so routing is far from uniform and ties never happen
    with torch.no_grad():
        mixer.router.weight.normal_(0.0, 1.0)
    return mixer


def dense_weights(idx: torch.Tensor, w: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(N, k) indices and weights -> (N, E) with zeros off the top-k."""
    return torch.zeros(*idx.shape[:-1], n_experts, dtype=w.dtype).scatter(-1, idx, w)


def random_routing(N: int, E: int, k: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(N, E, generator=g).argsort(-1)[:, :k]  # distinct per token
    w = torch.rand(N, k, generator=g, dtype=dtype)
    return idx, w


def expert_weights(E: int, D: int, Fh: int, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, D, 2 * Fh, generator=g, dtype=dtype) / math.sqrt(D),
            torch.randn(E, Fh, D, generator=g, dtype=dtype) / math.sqrt(Fh))


def assert_same_outputs_and_grads(fn, ref_fn, inputs, tol: float = 1e-12) -> list[torch.Tensor]:
    """fn and ref_fn agree on the output and on the gradient of every input (fp64); returns fn's inputs."""
    ins = [t.clone().requires_grad_() for t in inputs]
    ref = [t.clone().requires_grad_() for t in inputs]
    y, y_ref = fn(*ins), ref_fn(*ref)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(ins, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)
    return ins


# ---------------------------------------------------------------------------------------- shapes


def test_registered() -> None:
    assert Family("E").spec.mixer is MoEMixer and Family("E").spec.config is MoEConfig


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("shared", [False, True])
def test_output_shape_aux_and_stats(dispatch: str, shared: bool) -> None:
    mixer = make(n_experts=4, top_k=2, dispatch=dispatch, shared_expert=shared, d_ff_shared=24)
    assert mixer.w_gate_up.shape == (4, 32, 128) and mixer.w_down.shape == (4, 64, 32)  # d_ff = 2*D
    if shared:
        assert mixer.shared.gate_up.weight.shape == (48, 32)
    x = torch.randn(3, 7, 32)
    out = mixer(x)
    assert out.y.shape == (3, 7, 32) and out.y.dtype == x.dtype
    assert out.cache is None
    assert set(out.aux) == {"moe_lb", "moe_z"}
    for v in out.aux.values():
        assert v.dim() == 0 and torch.isfinite(v) and v.requires_grad and v.dtype == torch.float32
    assert set(out.stats) == {"moe/load_max", "moe/drop_frac", "moe/router_entropy"}
    for v in out.stats.values():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v)
    assert out.stats["moe/load_max"] >= 1.0
    assert 0.0 < out.stats["moe/router_entropy"] <= math.log(4) + 1e-6


def test_no_cache_and_decode_step() -> None:
    mixer = make(n_experts=4, top_k=2)
    assert mixer.init_cache(2, 16) is None
    x = torch.randn(2, 5, 32)
    full = mixer(x).y
    with_cache = mixer(x, cache=mixer.init_cache(2, 16))
    assert with_cache.cache is None
    torch.testing.assert_close(with_cache.y, full, rtol=0, atol=0)
    # one token at a time gives the same outputs: the layer is per-token
    steps = torch.cat([mixer(x[:, t:t + 1], cache=None).y for t in range(5)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-6, atol=1e-6)


def test_meta_device_construction() -> None:
    cfg = ModelConfig(pattern="EE", d_model=64, moe=MoEConfig(n_experts=8, top_k=2, shared_expert=True))
    with torch.device("meta"):
        mixer = MoEMixer(cfg.moe, cfg.dims, cfg.parsed.layers[1])
    params = dict(mixer.named_parameters())
    assert {"router.weight", "w_gate_up", "w_down", "shared.gate_up.weight", "shared.down.weight"} <= set(params)
    assert all(p.is_meta for p in params.values())


def test_init_scales_w_down() -> None:
    cfg = ModelConfig(pattern="E" * 8, d_model=64, init_std=0.02, moe=MoEConfig(n_experts=8, d_ff=256))
    torch.manual_seed(0)
    mixer = MoEMixer(cfg.moe, cfg.dims, cfg.parsed.layers[0])
    assert abs(mixer.w_gate_up.std().item() - 0.02) < 0.001
    assert abs(mixer.w_down.std().item() - 0.02 / math.sqrt(16)) < 0.0003


# -------------------------------------------------------------------------------------- routing


def test_route_renormalises_topk() -> None:
    logits = torch.randn(10, 6, dtype=torch.float64)
    probs, w, idx = route(logits, 3)
    torch.testing.assert_close(probs, logits.softmax(-1))
    torch.testing.assert_close(w.sum(-1), torch.ones(10, dtype=torch.float64))
    top = probs.gather(-1, idx)
    torch.testing.assert_close(w, top / top.sum(-1, keepdim=True))
    assert (top[:, :1] >= probs.max(-1, keepdim=True).values).all()
    # k = 1 keeps the raw probability (Switch), so the router still gets a task gradient
    _, w1, idx1 = route(logits, 1)
    torch.testing.assert_close(w1, probs.gather(-1, idx1))


def test_router_is_fp32_under_bf16() -> None:
    mixer = make(n_experts=4, top_k=2, dtype=torch.bfloat16)
    x = torch.randn(2, 6, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(x)
    assert out.y.dtype == torch.bfloat16
    assert out.aux["moe_lb"].dtype == torch.float32 and out.aux["moe_z"].dtype == torch.float32


# ------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_reach_every_parameter(dispatch: str) -> None:
    mixer = make(n_experts=4, top_k=2, dispatch=dispatch, capacity_factor=4.0, shared_expert=True,
                 aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(2, 16, 32, requires_grad=True)
    out = mixer(x)
    (out.y.square().sum() + sum(out.aux.values())).backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        for e in range(4) if p.dim() == 3 else ():
            assert p.grad[e].abs().sum() > 0, f"{name}[{e}]"  # every expert was used and trained
    assert x.grad.abs().sum() > 0


def test_router_gradient_paths() -> None:
    """The router learns from the task (through the combine weights) and from each aux loss alone."""
    x = torch.randn(2, 16, 32)
    task = make(n_experts=4, top_k=2, aux_loss_coef=0.0, z_loss_coef=0.0)
    task(x).y.square().sum().backward()
    assert task.router.weight.grad.abs().sum() > 0
    for key in ("moe_lb", "moe_z"):
        m = make(n_experts=4, top_k=2, aux_loss_coef=1.0, z_loss_coef=1.0)
        m(x).aux[key].backward()
        assert m.router.weight.grad.abs().sum() > 0, key
        assert m.w_gate_up.grad is None and m.w_down.grad is None  # aux losses touch only the router


def test_gradcheck_dispatch() -> None:
    N, E, k, D, Fh = 5, 3, 2, 4, 3
    idx, w = random_routing(N, E, k)
    x = torch.randn(N, D, dtype=torch.float64)
    wgu, wd = expert_weights(E, D, Fh)
    args = [t.clone().requires_grad_() for t in (x, w, wgu, wd)]
    assert torch.autograd.gradcheck(lambda x, w, a, b: dispatch_dropless(x, idx, w, a, b), args)
    assert torch.autograd.gradcheck(lambda x, w, a, b: dispatch_capacity(x, idx, w, a, b, 2)[0], args)


# ------------------------------------------------------------------------------- dispatch parity


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dropless_equals_dense_reference_fp64(k: int) -> None:
    N, E, D, Fh = 37, 4, 8, 12
    idx, w = random_routing(N, E, k)
    idx[:5] = torch.arange(k)  # make expert 0..k-1 crowded, and expert E-1 possibly empty
    x = torch.randn(N, D, dtype=torch.float64)
    wgu, wd = expert_weights(E, D, Fh)
    assert_same_outputs_and_grads(lambda x, w, a, b: dispatch_dropless(x, idx, w, a, b),
                                  lambda x, w, a, b: dense_reference(x, dense_weights(idx, w, E), a, b),
                                  (x, w, wgu, wd))


def test_grouped_swiglu_equals_per_expert_swiglu_with_an_empty_expert() -> None:
    """The one-node grouped kernel against the plain per-expert composite: outputs and every gradient,
    an expert with no rows included (its weight gradients are exactly zero)."""
    E, D, Fh = 4, 6, 5
    counts = [3, 0, 5, 2]
    xs = torch.randn(sum(counts), D, dtype=torch.float64)
    wgu, wd = expert_weights(E, D, Fh)
    ins = assert_same_outputs_and_grads(
        lambda x, a, b: grouped_swiglu(x, a, b, counts),
        lambda x, a, b: torch.cat([swiglu_expert(xe, a[e], b[e]) for e, xe in enumerate(x.split(counts)) if counts[e]]),
        (xs, wgu, wd))
    assert ins[1].grad[1].abs().sum() == 0 and ins[2].grad[1].abs().sum() == 0
    args = [t.clone().requires_grad_() for t in (xs, wgu, wd)]
    assert torch.autograd.gradcheck(lambda x, a, b: grouped_swiglu(x, a, b, counts), args)


def test_dropless_under_bf16_autocast_matches_fp32() -> None:
    N, E, k, D, Fh = 24, 4, 2, 16, 12
    idx, w = random_routing(N, E, k, dtype=torch.float32)
    x = torch.randn(N, D)
    wgu, wd = (t.float().requires_grad_() for t in expert_weights(E, D, Fh))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dispatch_dropless(x, idx, w, wgu, wd)
    y.float().sum().backward()
    assert wgu.grad is not None and wgu.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), dispatch_dropless(x, idx, w, wgu.detach(), wd.detach()), rtol=0.05, atol=0.05)


def test_dropless_with_an_unused_expert_and_leading_dims() -> None:
    E, D, Fh = 5, 6, 7
    x = torch.randn(2, 3, D, dtype=torch.float64)
    idx = torch.tensor([0, 2]).expand(2, 3, 2).contiguous()  # experts 1, 3, 4 unused
    w = torch.rand(2, 3, 2, dtype=torch.float64)
    wgu, wd = expert_weights(E, D, Fh)
    y = dispatch_dropless(x, idx, w, wgu, wd)
    assert y.shape == x.shape
    torch.testing.assert_close(y, dense_reference(x, dense_weights(idx, w, E), wgu, wd), rtol=1e-12, atol=1e-12)


def test_mixer_dropless_equals_dense_fp64() -> None:
    mixer = make(n_experts=6, top_k=2, dtype=torch.float64, shared_expert=True)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y = mixer(x).y
    probs, w, idx = route(x @ mixer.router.weight.T, 2)
    ref = dense_reference(x, dense_weights(idx, w, 6), mixer.w_gate_up, mixer.w_down) + mixer.shared(x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_top_k_equals_n_experts() -> None:
    mixer = make(n_experts=4, top_k=4, dtype=torch.float64)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    out = mixer(x)
    probs = (x @ mixer.router.weight.T).softmax(-1)
    ref = dense_reference(x, probs, mixer.w_gate_up, mixer.w_down)  # every expert, full softmax weights
    torch.testing.assert_close(out.y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.stats["moe/load_max"], torch.tensor(1.0))  # every token uses every expert
    cap = make(n_experts=4, top_k=4, dtype=torch.float64, dispatch="capacity", capacity_factor=1.0)
    cap.load_state_dict(mixer.state_dict())
    out_c = cap(x)
    torch.testing.assert_close(out_c.y, ref, rtol=1e-12, atol=1e-12)
    assert out_c.stats["moe/drop_frac"] == 0


# ------------------------------------------------------------------------------------- capacity


def test_capacity_formula() -> None:
    assert expert_capacity(64, 2, 8, 1.25) == 20
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 2, 4, 4.0) == 10  # clamped to n_tokens
    assert expert_capacity(1, 1, 64, 0.01) == 1


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_equals_dropless_when_large(k: int) -> None:
    E = 4
    mixer = make(n_experts=E, top_k=k, dtype=torch.float64)
    cap = make(n_experts=E, top_k=k, dtype=torch.float64, dispatch="capacity", capacity_factor=float(E))
    cap.load_state_dict(mixer.state_dict())
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = mixer(xa), cap(xb)
    torch.testing.assert_close(b.y, a.y, rtol=1e-12, atol=1e-12)
    assert b.stats["moe/drop_frac"] == 0
    (a.y.sum() + sum(a.aux.values())).backward()
    (b.y.sum() + sum(b.aux.values())).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(mixer.named_parameters(), cap.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_capacity_drops_hand_computed() -> None:
    """3 tokens, 3 experts, k = 2, capacity 2; slots queue choice-major (all first choices first).

    first choices: t0->e1 (pos 0), t1->e0 (pos 0), t2->e0 (pos 1)
    second choices: t0->e0 (pos 2: DROPPED), t1->e1 (pos 1), t2->e1 (pos 2: DROPPED)
    """
    E, D, Fh = 3, 4, 5
    idx = torch.tensor([[1, 0], [0, 1], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]], dtype=torch.float64)
    x = torch.randn(3, D, dtype=torch.float64)
    wgu, wd = expert_weights(E, D, Fh)
    y, n_dropped = dispatch_capacity(x, idx, w, wgu, wd, capacity=2)
    assert n_dropped.dim() == 0 and n_dropped.item() == 2
    kept = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    ref = dense_reference(x, dense_weights(idx, w * kept, E), wgu, wd)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # a token whose every slot is dropped contributes exactly zero (it keeps only its residual)
    y1, d1 = dispatch_capacity(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.float64),
                               wgu, wd, capacity=1)
    assert d1.item() == 2 and (y1[1:] == 0).all() and (y1[0] != 0).all()


def test_mixer_reports_drops_when_capacity_small() -> None:
    mixer = make(n_experts=4, top_k=2, dispatch="capacity", capacity_factor=0.5, capacity_block=16)
    x = torch.randn(2, 16, 32)
    out = mixer(x)
    # recompute the expected drop count independently: per row, token-major, expert e keeps at most
    # floor(n * C / block) slots of the first n tokens, C from the formula
    _, _, idx = route(x.float() @ mixer.router.weight.T, 2)
    C = expert_capacity(16, 2, 4, 0.5)
    assert C == 4
    dropped = 0
    for row in idx.tolist():
        kept = [0] * 4
        for n, choices in enumerate(row, start=1):
            for e in choices:
                ok = kept[e] < n * C // 16
                kept[e] += ok
                dropped += not ok
    assert dropped > 0
    torch.testing.assert_close(out.stats["moe/drop_frac"], torch.tensor(dropped / 64))


# ----------------------------------------------------------------------------------- aux losses


def test_lb_loss_is_one_for_uniform_router() -> None:
    for k in (1, 2):
        mixer = make(n_experts=8, top_k=k, aux_loss_coef=1.0, z_loss_coef=1.0)
        with torch.no_grad():
            mixer.router.weight.zero_()
        out = mixer(torch.randn(2, 10, 32))
        torch.testing.assert_close(out.aux["moe_lb"], torch.tensor(1.0))
        torch.testing.assert_close(out.aux["moe_z"], torch.tensor(math.log(8) ** 2))
        torch.testing.assert_close(out.stats["moe/router_entropy"], torch.tensor(math.log(8)))


def test_aux_losses_hand_made_case() -> None:
    """E = 2, k = 1, router = identity; logits [ln 3, 0] for 3 tokens and [0, ln 3] for one.

    probs (3/4, 1/4) x3 and (1/4, 3/4): f = (3/4, 1/4), P = (5/8, 3/8),
    lb = 2 * (3/4 * 5/8 + 1/4 * 3/8) = 9/8; every token has logsumexp = ln 4.
    """
    mixer = make(d_model=2, n_experts=2, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.25, dtype=torch.float64)
    with torch.no_grad():
        mixer.router.weight.copy_(torch.eye(2))
    l3 = math.log(3)
    x = torch.tensor([[[l3, 0.0], [0.0, l3], [l3, 0.0], [l3, 0.0]]], dtype=torch.float64)
    out = mixer(x)
    torch.testing.assert_close(out.aux["moe_lb"], torch.tensor(0.5 * 9 / 8, dtype=torch.float64))
    torch.testing.assert_close(out.aux["moe_z"], torch.tensor(0.25 * math.log(4) ** 2, dtype=torch.float64))
    torch.testing.assert_close(out.stats["moe/load_max"], torch.tensor(1.5))  # 3 slots vs mean 2
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(out.stats["moe/router_entropy"], torch.tensor(h, dtype=torch.float64))


def test_aux_losses_finite_for_extreme_logits() -> None:
    mixer = make(n_experts=4, top_k=2, aux_loss_coef=1.0, z_loss_coef=1.0)
    out = mixer(1e3 * torch.randn(2, 8, 32))
    for v in list(out.aux.values()) + list(out.stats.values()):
        assert torch.isfinite(v)
    assert torch.isfinite(out.y).all()


# ------------------------------------------------------------------------------------ causality


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_tokens_are_independent(dispatch: str) -> None:
    """Changing token t changes output t only (capacity: with room for every slot; when slots are
    dropped, tokens compete for buffer rows, exactly as in GShard/Switch)."""
    mixer = make(n_experts=4, top_k=2, dispatch=dispatch, capacity_factor=4.0)
    x = torch.randn(2, 12, 32)
    y = mixer(x).y
    for t in (0, 5, 11):
        x2 = x.clone()
        x2[:, t] = torch.randn(2, 32)
        y2 = mixer(x2).y
        changed = (y2 - y).abs().amax(dim=(0, 2)) > 0
        assert changed[t] and changed.sum() == 1, t


# ------------------------------------------------------------------------------------- compile


def test_capacity_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    N, E, k, D, Fh = 24, 4, 2, 8, 16
    idx, w = random_routing(N, E, k, dtype=torch.float32)
    x = torch.randn(N, D)
    wgu, wd = expert_weights(E, D, Fh, dtype=torch.float32)
    compiled = torch.compile(dispatch_capacity, fullgraph=True, backend="aot_eager")
    y, d = compiled(x, idx, w, wgu, wd, 10)
    y_ref, d_ref = dispatch_capacity(x, idx, w, wgu, wd, 10)
    torch.testing.assert_close(y, y_ref)
    assert d.item() == d_ref.item()


def test_capacity_mixer_compiles_fullgraph() -> None:
    """The whole capacity-mode layer (router, dispatch, aux, stats) in one graph, forward and backward.

    aot_eager traces exactly what inductor would (dynamo + AOT autograd) without the 50 s CPU codegen.
    """
    torch._dynamo.reset()
    mixer = make(n_experts=4, top_k=2, dispatch="capacity", capacity_factor=1.0, shared_expert=True)
    x = torch.randn(2, 16, 32)
    explain = torch._dynamo.explain(mixer)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(mixer, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), mixer(x)
    torch.testing.assert_close(out.y, ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.stats["moe/drop_frac"], ref.stats["moe/drop_frac"])
    (out.y.sum() + sum(out.aux.values())).backward()
    assert mixer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shared", [False, True])
def test_inference_paths_equal_dispatch(shared: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding-sized inference (no gradient) skips the sort-and-group dispatch and the training figures: up to
    FEW_SLOTS slots one matmul pair each, up to PADDED_SLOTS on padded batched matmuls; both equal the dispatched
    layer's output. Negative control: with both thresholds at 0 the dispatch runs, and its figures come back."""
    import amer.blocks.moe as moe_mod

    mixer = make(dtype=torch.float64, n_experts=8, top_k=2, shared_expert=shared)
    calls = {"_few_tokens": 0, "dispatch_padded": 0}
    for name in calls:
        real = getattr(moe_mod, name)
        monkeypatch.setattr(moe_mod, name, lambda *a, _real=real, _name=name, **k: (
            calls.__setitem__(_name, calls[_name] + 1), _real(*a, **k))[1])
    # slots (tokens x top-k): 2-16 take the few-token loop, 18-256 the padded batched matmuls
    cases = {"_few_tokens": [(1, 1), (2, 3), (1, 8)], "dispatch_padded": [(1, 9), (4, 16), (2, 64)]}
    for path, shapes in cases.items():
        for shape in shapes:
            x = torch.randn(*shape, 32, dtype=torch.float64)
            with torch.no_grad():
                fast = mixer(x)
            assert calls == {n: int(n == path) for n in calls} and fast.aux == {} and fast.stats == {}
            reference = mixer(x)  # with gradients enabled: the dispatched path, losses and figures
            assert set(reference.aux) == {"moe_lb", "moe_z"} and "moe/load_max" in reference.stats
            torch.testing.assert_close(fast.y, reference.y.detach(), rtol=1e-12, atol=1e-12)
            calls.update(dict.fromkeys(calls, 0))
    with torch.no_grad():  # more slots than either threshold: dispatch, and in training mode its figures
        assert mixer(torch.randn(1, 129, 32, dtype=torch.float64)).stats and sum(calls.values()) == 0
        mixer.eval()  # evaluation without gradients: the same output, no training figures
        x = torch.randn(1, 129, 32, dtype=torch.float64)
        out = mixer(x)
        assert out.stats == {} and out.aux == {} and sum(calls.values()) == 0
        mixer.train()
        torch.testing.assert_close(out.y, mixer(x).y, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(moe_mod, "FEW_SLOTS", 0)
    monkeypatch.setattr(moe_mod, "PADDED_SLOTS", 0)
    with torch.no_grad():
        assert mixer(torch.randn(1, 1, 32, dtype=torch.float64)).stats and sum(calls.values()) == 0


def test_compiled_inference_keeps_the_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled, decoding-sized inference runs the static dispatch: the few-token and padded paths read counts on the
    host, which inductor cannot lower (a compiled evaluation of one 100-token row failed with "could not guard on
    data-dependent expression"). The output equals the eager one. Control: eager, the same input takes the padded
    path."""
    import amer.blocks.moe as moe_mod

    mixer = make(n_experts=8, top_k=2).eval()  # fp32: the grouped GEMM, the dispatch that compiles
    calls = []
    for name in ("_few_tokens", "dispatch_padded"):
        real = getattr(moe_mod, name)
        monkeypatch.setattr(moe_mod, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                    _real(*a, **k))[1])
    x = torch.randn(1, 40, 32)  # 80 slots: the padded path when eager
    with torch.no_grad():
        eager = mixer(x).y
        assert calls == ["dispatch_padded"]
        calls.clear()
        torch._dynamo.reset()
        try:
            compiled = torch.compile(mixer, fullgraph=True, backend="aot_eager")(x).y
        finally:
            torch._dynamo.reset()
    assert calls == []
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
