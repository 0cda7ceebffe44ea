"""The R family: the linear-recurrence scan and Griffin's recurrent block with the RG-LRU.

test_mixer_contract.py checks every family at T = 24 (one scan chunk boundary); the causality and
prefill tests here run over three or more chunks of the scan (T > 2 * CHUNK), where the chunk carry
and the cached state meet mid-chunk."""

from __future__ import annotations

import pytest
import torch

from amer import ModelConfig, RecurrentConfig
from amer.blocks.recurrent import RecurrentCache, RecurrentMixer, _RGLRUScan, rglru_coeffs
from amer.families import Family
from amer.ops.scan import CHUNK, linear_scan, linear_scan_sequential

D = 32


def make(seed: int = 0, **kw) -> RecurrentMixer:
    # The mixer initialises its projections with init_std; the training default (0.02) leaves a lone
    # block's output near 1e-5, where the probes below could not tell a real effect from rounding.
    # 0.1 gives outputs of the scale these tests were written for (nn.Linear's default init).
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern="R", d_model=D, init_std=0.1,
                      recurrent=RecurrentConfig(**{"n_heads": 4, "d_conv": 4, **kw}))
    return RecurrentMixer(cfg.recurrent, cfg.dims, cfg.parsed.layers[0])


def rand_scan(B: int, T: int, C: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # decays spread over (0, 1) with some close to 1, as the RG-LRU produces
    a = torch.rand(B, T, C, generator=g, dtype=dtype) ** 0.1
    b = torch.randn(B, T, C, generator=g, dtype=dtype)
    h0 = torch.randn(B, C, generator=g, dtype=dtype)
    return a, b, h0


# ---------------------------------------------------------------------------------------- scan

# T covers: a single step, one partial chunk, exact chunks, a ragged tail (padding), and more
# chunks than CHUNK (the carry scan recurses)
SCAN_LENGTHS = [1, 5, CHUNK, 3 * CHUNK, 2 * CHUNK + 5, CHUNK * CHUNK + 2 * CHUNK + 3]


@pytest.mark.parametrize("T", SCAN_LENGTHS)
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_matches_sequential_fp64(T: int, with_h0: bool) -> None:
    a, b, h0 = rand_scan(2, T, 3)
    h0 = h0 if with_h0 else None
    torch.testing.assert_close(linear_scan(a, b, h0), linear_scan_sequential(a, b, h0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", SCAN_LENGTHS)
def test_scan_gradients_match_sequential_fp64(T: int) -> None:
    a, b, h0 = rand_scan(2, T, 3, seed=1)
    w = torch.randn(2, T, 3, dtype=torch.float64)
    grads = []
    for fn in (linear_scan, linear_scan_sequential):
        leaves = [t.clone().requires_grad_() for t in (a, b, h0)]
        (fn(*leaves) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [1, 7, CHUNK + 5, 2 * CHUNK])
def test_scan_gradcheck(T: int) -> None:
    a, b, h0 = (t.requires_grad_() for t in rand_scan(2, T, 2, seed=2))
    assert torch.autograd.gradcheck(linear_scan, (a, b, h0))
    assert torch.autograd.gradcheck(lambda a, b: linear_scan(a, b), (a, b))


def test_scan_zero_decay_and_unit_decay() -> None:
    b = torch.randn(2, 40, 3, dtype=torch.float64)
    torch.testing.assert_close(linear_scan(torch.zeros_like(b), b), b)  # a = 0: no memory
    torch.testing.assert_close(linear_scan(torch.ones_like(b), b), b.cumsum(1))  # a = 1: a running sum


def test_scan_low_precision_accumulates_in_fp32() -> None:
    a, b, h0 = rand_scan(2, 100, 8, dtype=torch.float32)
    a16, b16 = a.bfloat16(), b.bfloat16()
    ref = linear_scan_sequential(a16.double(), b16.double(), h0.double())  # exact on the rounded inputs
    # an fp32 initial state promotes the output to fp32: only fp32 accumulation error remains
    h32 = linear_scan(a16, b16, h0)
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h32.double(), ref, rtol=1e-5, atol=1e-5)
    h = linear_scan(a16, b16)
    assert h.dtype == torch.bfloat16
    ref0 = linear_scan_sequential(a16.double(), b16.double())
    torch.testing.assert_close(h.double(), ref0, rtol=1e-2, atol=1e-2)  # one final bf16 rounding
    a16.requires_grad_(), b16.requires_grad_()
    linear_scan(a16, b16).float().sum().backward()
    assert a16.grad.dtype == torch.bfloat16 and torch.isfinite(a16.grad.float()).all()


def test_scan_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="must both be"):
        linear_scan(torch.rand(2, 3, 4), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="h0"):
        linear_scan(torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.rand(2, 3))


# --------------------------------------------------------------------------------------- mixer


def rglru_inputs(B: int, T: int, H: int, bw: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = H * bw
    gates = torch.randn(B, T, H, 2 * bw, generator=g, dtype=torch.float64)
    u = torch.randn(B, T, W, generator=g, dtype=torch.float64)
    Lambda = torch.randn(W, generator=g, dtype=torch.float64) + 2.0
    h0 = torch.randn(B, W, generator=g, dtype=torch.float64)
    return gates, u, Lambda, h0


@pytest.mark.parametrize("T", [3, CHUNK + 5])
def test_fused_rglru_gradcheck(T: int) -> None:
    gates, u, Lambda, h0 = (t.requires_grad_() for t in rglru_inputs(2, T, 2, 2))
    assert torch.autograd.gradcheck(lambda *xs: _RGLRUScan.apply(*xs, 8.0, None), (gates, u, Lambda, h0))
    assert torch.autograd.gradcheck(lambda g, u, lam: _RGLRUScan.apply(g, u, lam, None, 8.0, None), (gates, u, Lambda))
    starts = torch.zeros(gates.shape[:2], dtype=torch.bool)
    starts[:, 0] = True
    starts[:, gates.shape[1] // 2] = True  # a packed document starts mid-row: its state resets
    assert torch.autograd.gradcheck(lambda g, u, lam: _RGLRUScan.apply(g, u, lam, None, 8.0, starts), (gates, u,
                                                                                                       Lambda))
    # recurrentgemma's variant: the inputs at the starts enter without the sqrt(1 - a^2) normaliser
    assert torch.autograd.gradcheck(lambda g, u, lam: _RGLRUScan.apply(g, u, lam, None, 8.0, starts, True),
                                    (gates, u, Lambda))


def test_unnormalised_starts_match_the_reference() -> None:
    """``plain_starts``: the fused node equals the coefficients (with the start inputs unscaled) + the sequential
    scan, values and gradients; and it differs from the normalised default (negative control)."""
    inputs = rglru_inputs(2, CHUNK + 3, 2, 3, seed=5)
    starts = torch.zeros(2, CHUNK + 3, dtype=torch.bool)
    starts[:, 0] = True
    starts[1, 7] = True
    results = []
    for fused in (True, False):
        gates, u, Lambda, _ = (t.clone().requires_grad_() for t in inputs)
        if fused:
            h = _RGLRUScan.apply(gates, u, Lambda, None, 8.0, starts, True)
        else:
            a, b, _ = rglru_coeffs(gates, u, Lambda, 8.0, starts)
            h = linear_scan_sequential(a.masked_fill(starts.unsqueeze(-1), 0.0), b, None)
        h.square().sum().backward()
        results.append([h] + [t.grad for t in (gates, u, Lambda)])
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    normalised = _RGLRUScan.apply(*inputs[:3], None, 8.0, starts)
    assert (normalised - results[0][0]).abs().max() > 1e-3


@pytest.mark.parametrize("with_h0", [False, True])
def test_fused_rglru_matches_autograd_reference(with_h0: bool) -> None:
    """The hand-written backward equals autograd through the coefficients + the sequential loop."""
    inputs = rglru_inputs(2, 3 * CHUNK + 1, 4, 3, seed=4)
    w = torch.randn(2, 3 * CHUNK + 1, 12, dtype=torch.float64)
    results = []
    for fused in (True, False):
        gates, u, Lambda, h0 = (t.clone().requires_grad_() for t in inputs)
        h0 = h0 if with_h0 else None
        if fused:
            h = _RGLRUScan.apply(gates, u, Lambda, h0, 8.0, None)
        else:
            a, b, _ = rglru_coeffs(gates, u, Lambda, 8.0)
            h = linear_scan_sequential(a, b, h0)
        (h * w).sum().backward()
        results.append([h] + [t.grad for t in (gates, u, Lambda)] + ([h0.grad] if with_h0 else []))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_the_normaliser_is_exact_and_its_gradient_bounded() -> None:
    """sqrt(1 - a^2) keeps its value however close a is to 1 (recurrentgemma's forward; a floor on 1 - a^2 computed
    another function for slow channels with a closed recurrence gate), and its derivative is bounded at 1000 as
    recurrentgemma bounds it; the fused node agrees with the reference there, values and gradients."""
    from amer.blocks.recurrent import _BoundedSqrt

    z = torch.tensor([0.0, 1e-12, 1e-8, 0.25], dtype=torch.float64, requires_grad=True)
    root = _BoundedSqrt.apply(z)
    torch.testing.assert_close(root, z.detach().sqrt(), rtol=0, atol=0)
    root.sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([1000.0, 1000.0, 1000.0, 1.0], dtype=torch.float64))
    # slow channels (sigmoid(Lambda)^8 close to 1) and recurrence gates near 0: 1 - a^2 far below 1e-6
    gates, u, Lambda, h0 = rglru_inputs(2, CHUNK + 3, 2, 3, seed=6)
    gates[..., :3] -= 14.0
    Lambda = Lambda + 8.0
    results = []
    for fused in (True, False):
        g, uu, lam = (t.clone().requires_grad_() for t in (gates, u, Lambda))
        if fused:
            h = _RGLRUScan.apply(g, uu, lam, None, 8.0, None)
        else:
            a, b, _ = rglru_coeffs(g, uu, lam, 8.0)
            h = linear_scan_sequential(a, b, None)
            assert (1 - a.detach() ** 2).min() < 1e-9  # the region a floor changed
        h.square().sum().backward()
        results.append([h, g.grad, uu.grad, lam.grad])
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_registered_and_output_shape() -> None:
    assert Family("R").spec.mixer is RecurrentMixer and Family("R").spec.config is RecurrentConfig
    m = make(lru_width=48)
    x = torch.randn(3, 11, D)
    out = m(x)
    assert out.y.shape == (3, 11, D)
    assert out.cache is None and out.aux == {}
    assert isinstance(m.out_proj, torch.nn.Linear) and m.out_proj.bias is None


def test_lambda_init_matches_paper() -> None:
    m = make(seed=3)
    a_c = torch.sigmoid(m.Lambda) ** m.c  # decay at r = 1
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6
    assert a_c.max() - a_c.min() > 0.05  # spread over the range, not collapsed


def test_causal() -> None:
    m = make()
    x = torch.randn(2, 40, D)
    y = m(x).y
    for t in (0, 17, 39):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, D)
        y2 = m(x2).y
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=0)
        assert (y2[:, t] - y[:, t]).abs().max() > 1e-4


def test_prefill_equals_decode_steps() -> None:
    m = make(d_conv=4)
    B, T = 2, 2 * CHUNK + 3
    x = torch.randn(B, T, D)
    with torch.no_grad():
        full = m(x)
        pre = m(x, cache=m.init_cache(B, T))
        cache = m.init_cache(B, T)
        steps = []
        for t in range(T):
            out = m(x[:, t:t + 1], cache=cache)
            cache = out.cache
            steps.append(out.y)
    torch.testing.assert_close(pre.y, full.y, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full.y, rtol=0, atol=1e-5)
    assert isinstance(cache, RecurrentCache) and cache.h.dtype == torch.float32
    torch.testing.assert_close(cache.h, pre.cache.h, rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.conv_state, pre.cache.conv_state, rtol=0, atol=1e-6)  # one GEMM shape vs another


@pytest.mark.parametrize("split", [1, 3, CHUNK + 1])
def test_prefill_in_two_parts_equals_full_prefill(split: int) -> None:
    m = make(d_conv=3)
    B, T = 2, 2 * CHUNK + 7
    x = torch.randn(B, T, D)
    with torch.no_grad():
        full = m(x, cache=m.init_cache(B, T))
        first = m(x[:, :split], cache=m.init_cache(B, T))
        second = m(x[:, split:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.y, second.y], 1), full.y, rtol=0, atol=1e-5)
    torch.testing.assert_close(second.cache.h, full.cache.h, rtol=0, atol=1e-5)


def test_conv_width_one() -> None:
    m = make(d_conv=1)
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        full = m(x).y
        first = m(x[:, :4], cache=m.init_cache(2, 9))
        rest = m(x[:, 4:], cache=first.cache)
    assert first.cache.conv_state.shape == (2, 0, D)
    torch.testing.assert_close(torch.cat([first.y, rest.y], 1), full, rtol=0, atol=1e-5)


def test_cache_shapes() -> None:
    m = make(lru_width=48, d_conv=4)
    cache = m.init_cache(5, 100)
    assert cache.conv_state.shape == (5, 3, 48)
    assert cache.h.shape == (5, 48) and cache.h.dtype == torch.float32
    assert m.init_cache(1, 1, dtype=torch.bfloat16).h.dtype == torch.float32  # state stays fp32


def test_meta_device_construction() -> None:
    cfg = ModelConfig(pattern="R", d_model=4096, recurrent=RecurrentConfig(n_heads=16))
    with torch.device("meta"):
        m = RecurrentMixer(cfg.recurrent, cfg.dims, cfg.parsed.layers[0])
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m.Lambda.shape == (4096,) and m.gate_weight.shape == (16, 256, 512)


def test_bf16_smoke() -> None:
    m = make().to(torch.bfloat16)
    x = torch.randn(2, 3 * CHUNK, D, dtype=torch.bfloat16, requires_grad=True)
    y = m(x).y
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().pow(2).sum().backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in m.parameters())
    ref = make()(x.detach().float()).y  # same seed, fp32 weights
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    # autocast on fp32 weights: matmuls in bf16, the recurrence still in fp32
    m32 = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2 = m32(x.detach().float()).y
    assert torch.isfinite(y2.float()).all()
    with torch.no_grad():
        cache = m.init_cache(2, 4)
        step = m(x[:, :1].detach(), cache=cache)
    assert step.cache.h.dtype == torch.float32


def test_float64_path_matches_float32() -> None:
    m = make()
    x = torch.randn(2, 30, D)
    y32 = m(x).y
    y64 = m.double()(x.double()).y
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-4, atol=1e-5)
