"""The span form of STP (patch vs complement): reference values, the released code's patch distribution,
parity with a plain per-example loop, documents / content / padding, degenerate rows, gradients, and the
policy and flag that select it."""

from __future__ import annotations

import math

import pytest
import torch

from amer import AttentionConfig, MambaConfig, ModelConfig
from amer.config import STPConfig, TrainConfig, options
from amer.model import HybridLM
from amer.objective import total_loss
from amer.stp import STPPolicy, compute_stp_loss
from amer.stp.span import patch_losses, sample_patches, span_stp_per_layer
from amer.training import evaluate
from amer.training.optim import lr_at


def tiny_config() -> ModelConfig:
    return ModelConfig(pattern="AM", d_model=32, max_seq_len=64, attention=AttentionConfig(n_heads=2, n_kv_heads=1),
                       mamba=MambaConfig(d_state=8, head_dim=16, expand=2, chunk_size=8))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _line(B: int, T: int, D: int = 8, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(B, 1, D, generator=g) + torch.arange(T).view(1, T, 1) * torch.randn(B, 1, D, generator=g)


def test_straight_line_is_zero() -> None:
    h = _line(4, 40)
    assert float(span_stp_per_layer([h], 8, generator=_gen())[0]) < 1e-5
    ids = torch.tensor([[0] * 15 + [1] * 20 + [-1] * 5] * 4)
    content = torch.rand(4, 40, generator=_gen(1)) > 0.3
    # a line stays a line when jumps are cut out: every step points the same way
    assert float(span_stp_per_layer([h], 8, mask=ids, content=content, generator=_gen())[0]) < 1e-5


def test_hand_computed_patches() -> None:
    h = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [2.0, 1.0]]])
    step = torch.tensor([[False, True, True, True]])
    # P_0 = h0, P_a = h1, P_b = h2, P_N = h3: patch (0, 1) against (1, 0) + (1, 0): a right angle
    # P_a = h0, P_b = h2: patch (1, 1) against (1, 0): 1 - 1/sqrt(2)
    idx = torch.tensor([[[0, 1, 2, 3], [0, 0, 2, 3]]])
    got = patch_losses(h, idx, step)
    assert torch.allclose(got, torch.tensor([[1.0, 1 - 1 / math.sqrt(2)]]), atol=1e-6)


def test_cut_jump_is_left_out() -> None:
    """Allowed [T, T, F, T, T]: two steps h1-h0 and h4-h3, so every patch gives 1 - cos(h1-h0, h4-h3),
    whatever h2 is; allowing h2 (negative control) changes the value."""
    h = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [100.0, -50.0], [3.0, 3.0], [4.0, 4.0]]])
    content = torch.tensor([[True, True, False, True, True]])
    got = span_stp_per_layer([h], 16, content=content, generator=_gen())
    assert float(got[0]) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    whole = span_stp_per_layer([h], 16, content=torch.ones_like(content), generator=_gen())
    assert abs(float(whole[0]) - (1 - 1 / math.sqrt(2))) > 0.05


def test_random_walk_and_noise_reference_values() -> None:
    g = _gen(3)
    walk = torch.randn(64, 200, 256, generator=g).cumsum(1)
    noise = torch.randn(64, 200, 256, generator=g)
    assert float(span_stp_per_layer([walk], 8, generator=_gen())[0]) == pytest.approx(1.0, abs=0.05)
    # i.i.d. states: cos(y - x, x - s + e - y) ~ -2 / (sqrt(2) * 2) = -0.707
    assert float(span_stp_per_layer([noise], 8, generator=_gen())[0]) == pytest.approx(1 + 1 / math.sqrt(2), abs=0.03)


def test_patch_distribution_matches_released_draw() -> None:
    """No mask, T = 6: N = 5 steps and P_k sits at position k, so idx reads (0, a, b, N) directly. The released
    draw: a uniform in [0, N); b uniform in [a+1, N], except (0, N), redrawn: b uniform in [1, N-1] when a = 0."""
    N = 5
    idx, w = sample_patches(4000, N + 1, 8, generator=_gen())
    assert bool((w == 1).all()) and bool((idx[..., 0] == 0).all()) and bool((idx[..., 3] == N).all())
    a, b = idx[..., 1].flatten(), idx[..., 2].flatten()
    assert bool((a < b).all()) and bool((b - a < N).all())
    n = a.numel()
    for av in range(N):
        p_a = float((a == av).sum()) / n
        assert p_a == pytest.approx(1 / N, abs=0.01)
        bs = b[a == av]
        lo, hi = av + 1, (N - 1 if av == 0 else N)
        for bv in range(lo, hi + 1):
            assert float((bs == bv).float().mean()) == pytest.approx(1 / (hi - lo + 1), abs=0.03)


def _reference(h: torch.Tensor, ids: torch.Tensor, content: torch.Tensor, n_spans: int, seed: int) -> torch.Tensor:
    """The span loss with plain Python loops over rows, spans and positions, reading the same uniforms."""
    B, T, _ = h.shape
    u = torch.rand(B, n_spans, 3, generator=_gen(seed))
    total, count = 0.0, 0
    for i in range(B):
        steps = [t for t in range(1, T) if ids[i, t] >= 0 and ids[i, t] == ids[i, t - 1] and content[i, t]
                 and content[i, t - 1]]
        # documents are runs of equal ids; a step joins t-1 and t of one run
        docs: dict[int, list[int]] = {}
        for t in steps:
            start = t
            while start > 0 and ids[i, start - 1] == ids[i, t]:
                start -= 1
            docs.setdefault(start, []).append(t)
        anchors = [t for t in steps if len(docs[_doc_start(ids[i], t)]) >= 2]
        for s in range(n_spans):
            if not anchors:
                continue
            k = min(int(float(u[i, s, 0]) * len(anchors)), len(anchors) - 1)
            doc = docs[_doc_start(ids[i], anchors[k])]
            n = len(doc)
            a = min(int(float(u[i, s, 1]) * n), n - 1)
            width = n - 1 if a == 0 else n - a
            b = a + 1 + min(int(float(u[i, s, 2]) * width), width - 1)
            pts = [torch.zeros(h.shape[-1])]
            for t in doc:
                pts.append(pts[-1] + (h[i, t] - h[i, t - 1]))
            patch = pts[b] - pts[a]
            rest = (pts[a] - pts[0]) + (pts[n] - pts[b])
            total += 1.0 - float(torch.nn.functional.cosine_similarity(patch, rest, dim=0, eps=1e-8))
            count += 1
    return torch.tensor(total / max(count, 1))


def _doc_start(row: torch.Tensor, t: int) -> int:
    while t > 0 and row[t - 1] == row[t]:
        t -= 1
    return t


def test_parity_with_per_example_loop() -> None:
    g = _gen(7)
    B, T = 6, 30
    h = torch.randn(B, T, 5, generator=g)
    ids = torch.tensor([[0] * 12 + [1] * 14 + [-1] * 4, [2] * 30, [3] * 2 + [4] * 28, [5] * 3 + [-1] * 27,
                        [6] * 10 + [7] * 10 + [8] * 10, [-1] * 30])
    content = torch.rand(B, T, generator=g) > 0.25
    content[4, 12:18] = False  # a document cut in two segments
    got = span_stp_per_layer([h], 5, mask=ids, content=content, generator=_gen(11))
    want = _reference(h, ids, content, 5, 11)
    assert float(got[0]) == pytest.approx(float(want), abs=1e-5)


def test_degenerate_rows_contribute_nothing() -> None:
    h = torch.randn(3, 2, 4, requires_grad=True)
    loss = span_stp_per_layer([h], 4)
    loss.sum().backward()
    assert float(loss.detach()[0]) == 0.0 and torch.isfinite(h.grad).all()
    # an empty-content row and a row of 2 allowed positions (one step: no proper patch) weigh 0
    h = torch.randn(3, 10, 4, requires_grad=True)
    content = torch.zeros(3, 10, dtype=torch.bool)
    content[1, 3:5] = True
    content[2, :] = True
    idx, w = sample_patches(3, 10, 4, content=content, generator=_gen())
    assert w[0].sum() == 0 and w[1].sum() == 0 and bool((w[2] == 1).all())
    loss = span_stp_per_layer([h], 4, content=content, generator=_gen())
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all()
    assert float(h.grad[:2].abs().sum()) == 0.0
    empty = span_stp_per_layer([h], 4, content=torch.zeros_like(content))
    assert float(empty.detach()[0]) == 0.0 and empty.requires_grad


def test_gradient_stays_inside_allowed_positions_and_descends() -> None:
    g = _gen(5)
    h = torch.randn(2, 24, 6, generator=g, requires_grad=True)
    ids = torch.tensor([[0] * 10 + [1] * 10 + [-1] * 4, [2] * 24])
    content = torch.ones(2, 24, dtype=torch.bool)
    content[1, 8:12] = False
    loss = span_stp_per_layer([h], 6, mask=ids, content=content, generator=_gen())[0]
    loss.backward()
    grad = h.grad.norm(dim=-1)
    assert float(grad[0, 20:].sum()) == 0.0 and float(grad[1, 8:11].sum()) == 0.0  # padding, cut positions
    assert float(grad.sum()) > 0
    # a finite-difference check of the directional derivative (fp32 math: loose tolerance)
    v = torch.randn_like(h)
    eps = 1e-3
    with torch.no_grad():
        f = lambda x: float(span_stp_per_layer([x], 6, mask=ids, content=content, generator=_gen())[0])  # noqa: E731
        fd = (f(h + eps * v) - f(h - eps * v)) / (2 * eps)
    assert fd == pytest.approx(float((h.grad * v).sum()), rel=0.05, abs=1e-3)
    # gradient descent on the span loss straightens the trajectory
    x = torch.randn(4, 20, 6, generator=g, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)
    first = None
    for _ in range(150):
        loss = span_stp_per_layer([x], 8, generator=_gen())[0]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_policy_flag_and_evaluation_use_the_span_form() -> None:
    assert any(o.key == "stp.form" for o in options(TrainConfig))
    with pytest.raises(Exception, match="stp.form"):
        STPConfig(form="bogus")  # type: ignore[arg-type]
    model = HybridLM(tiny_config())
    tokens = torch.randint(0, 256, (2, 16))
    targets = torch.randint(0, 256, (2, 16))
    with torch.no_grad():  # values only
        out = model(tokens, taps="final")
    span = STPPolicy(STPConfig(enabled=True, layers="final", form="span"), model.pattern)
    tri = STPPolicy(STPConfig(enabled=True, layers="final", form="triple"), model.pattern)
    a = total_loss(span, out, targets, 0, generator=_gen()).stp
    b = total_loss(tri, out, targets, 0, generator=_gen()).stp
    hid = out.taps.final.hidden
    assert float(a) == pytest.approx(float(span_stp_per_layer([hid], 4, generator=_gen())[0]), abs=1e-6)
    assert float(b) == pytest.approx(float(compute_stp_loss(hid, 4, generator=_gen())), abs=1e-6)
    content = torch.zeros(2, 16, dtype=torch.bool)
    content[:, 4:9] = True
    batch = {"tokens": tokens, "targets": targets, "stp_content": content}
    ev = evaluate(model, [batch], stp={"s": span})
    want = span_stp_per_layer([hid], 4, content=content, generator=torch.Generator().manual_seed(1234))
    assert ev["stp/s"] == pytest.approx(float(want[0]), abs=1e-5)


def test_linear_schedule_decays_to_zero_without_warmup() -> None:
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=0)
    assert lr_at(0, cfg, schedule="linear") == pytest.approx(1e-3)
    assert lr_at(50, cfg, schedule="linear") == pytest.approx(5e-4)
    assert lr_at(100, cfg, schedule="linear") == 0.0
    assert lr_at(50, cfg) != pytest.approx(5e-4)  # cosine by default
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, cfg, schedule="step")
