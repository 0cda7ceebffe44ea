"""The fused, chunked LM head + cross-entropy equals the plain path: loss and gradients (hidden states,
head weight, tied embedding), with the logit scale, the soft cap and ignored targets; and the training
step gets the same loss and gradients with it as without."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amer.config import ModelConfig, STPConfig
from amer.model import HybridLM, final_logits
from amer.objective import cross_entropy
from amer.ops.linear_ce import CHUNK_ELEMENTS, MIN_CHUNK_ROWS, chunk_rows, linear_cross_entropy
from amer.stp import STPPolicy
from amer.training.step import TrainStep


def _reference(h, w, t, scale, cap):
    z = (h @ w.t()) * scale
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    return F.cross_entropy(z.flatten(0, 1), t.flatten(), ignore_index=-100)


@pytest.mark.parametrize("scale,cap", [(1.0, None), (0.5, None), (1.0, 2.0), (3.0, 1.5)])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_matches_plain_cross_entropy_fp64(scale, cap, chunk):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(3, 11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 37, (3, 11), generator=g)
    t[0, :4] = -100  # a prompt: ignored
    t[2, -1] = -100
    ref = _reference(h, w, t, scale, cap)
    gh, gw = torch.autograd.grad(ref * 1.7, (h, w))
    out = linear_cross_entropy(h, w, t, logit_scale=scale, logit_softcap=cap, chunk=chunk)
    fh, fw = torch.autograd.grad(out * 1.7, (h, w))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fh, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fw, gw, rtol=1e-10, atol=1e-12)


def test_negative_control_softcap_matters():
    """The comparison above can fail: leaving out the soft cap changes the loss and the gradients."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(21, 8, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 21, (2, 9), generator=g)
    ref = _reference(h, w, t, 1.0, 1.0)
    out = linear_cross_entropy(h, w, t, logit_softcap=None, chunk=4)
    assert not torch.allclose(out, ref, rtol=1e-3)


def test_all_ignored_is_nan_like_cross_entropy():
    h, w = torch.randn(1, 4, 8, requires_grad=True), torch.randn(10, 8)
    t = torch.full((1, 4), -100)
    assert torch.isnan(F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten()))
    assert torch.isnan(linear_cross_entropy(h, w, t))


def test_chunk_rows_bounds_the_logits():
    assert chunk_rows(16384, 8192) * 8192 <= CHUNK_ELEMENTS  # 512 rows: 16 MiB of logits
    assert chunk_rows(16384, 32768) == MIN_CHUNK_ROWS  # never fewer rows than the weight-gradient floor
    assert chunk_rows(100, 260) == 100  # a byte vocabulary fits in one chunk
    assert chunk_rows(10, 10**9) == 10  # never more rows than tokens
    assert chunk_rows(0, 8192) == 1


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.randn(2, 3, 8), torch.randn(5, 8), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(torch.randn(2, 3, 8), torch.randn(5, 7), torch.zeros(2, 3, dtype=torch.long))


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(pattern="AM", d_model=32, vocab_size=97, max_seq_len=64, **kw)
    return HybridLM(cfg).double()


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True, "logit_scale": 0.5, "logit_softcap": 4.0}])
def test_model_head_false_gives_the_same_loss_and_gradients(kw):
    """The model's ``head=False`` output through the fused loss equals its logits through the plain loss,
    gradients on every parameter included (tied embeddings: embedding + head gradient)."""
    model = _model(**kw)
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(tokens, -1, 1)
    targets[:, :5] = -100
    out = model(tokens, taps=False)
    ref = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    fused_out = model(tokens, taps=False, head=False)
    assert fused_out.logits is None and fused_out.head.hidden.shape == (2, 24, 32)
    fused = cross_entropy(fused_out, targets)
    grads = torch.autograd.grad(fused, list(model.parameters()))
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the transform in the head input is the model's own
    hd = fused_out.head
    torch.testing.assert_close(final_logits(model.cfg, hd.hidden @ hd.weight.t()), out.logits)


def test_train_step_fused_equals_plain():
    """One full training step (STP on, documents packed) lands on the same weights with and without the
    fused loss (fp32 tolerance)."""
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = HybridLM(ModelConfig(pattern="AEMR", d_model=32, vocab_size=300, max_seq_len=64,
                                     logit_softcap=8.0))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        policy = STPPolicy(STPConfig(enabled=True, weight=0.1, layers="A-1,M-1"), model.pattern)
        step = TrainStep(model, opt, policy, stp_generator=torch.Generator().manual_seed(3), fused_ce=fused)
        g = torch.Generator().manual_seed(2)
        seq = torch.randint(0, 300, (2, 33), generator=g)
        batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "doc_ids": (torch.arange(32) // 10).expand(2, 32)}
        res = step([batch], 10)
        results.append((float(res.loss.ce.detach()), [p.detach().clone() for p in model.parameters()]))
    (ce_a, pa), (ce_b, pb) = results
    assert ce_a == pytest.approx(ce_b, rel=1e-6)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bench_suite_lmhead_reports_the_saving() -> None:
    from amer.bench import BenchOptions, run_suite

    res = run_suite("lmhead", BenchOptions(repeats=1, warmup=0, quick=True))
    plain, fused = res.rows
    assert (plain["name"], fused["name"]) == ("plain", "fused")
    assert fused["peak_MB"] < plain["peak_MB"] and fused["saved_in_logits"] > 0.5


def test_bfloat16_autocast_step_matches_the_plain_head() -> None:
    """Under bf16 autocast the head matmul runs in bf16 on both paths (the head input carries the autocast
    dtype); loss and gradient norm agree to bf16 tolerance."""
    figures = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = HybridLM(ModelConfig(pattern="AM", d_model=32, vocab_size=500, max_seq_len=64, logit_softcap=10.0))
        step = TrainStep(model, None, STPPolicy(STPConfig(enabled=False), model.pattern), dtype="bfloat16",
                         fused_ce=fused, grad_clip=0)
        seq = torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(1))
        out = step([{"tokens": seq[:, :-1], "targets": seq[:, 1:]}], 0)
        figures.append((float(out.loss.ce.detach()), float(out.grad_norm)))
    (ce_a, gn_a), (ce_b, gn_b) = figures
    assert ce_a == pytest.approx(ce_b, rel=1e-3) and gn_a == pytest.approx(gn_b, rel=1e-2)
