"""A family: causal GQA attention with RoPE and a KV cache.

What every family must do (causality, gradients, cached decoding, meta build, compile) is checked in
test_mixer_contract.py with n_kv_heads = 2 and no q/k norm; here: the other head layouts, GQA and RoPE
against references, q/k norm in the cache, and the KV-cache limit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from amer import AttentionConfig, ModelConfig
from amer.blocks.attention import AttentionMixer
from amer.families import Family


def make(n_heads: int = 4, n_kv_heads: int = 2, **kw) -> AttentionMixer:
    cfg = ModelConfig(pattern="A", d_model=32, attention=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, **kw))
    torch.manual_seed(0)
    m = AttentionMixer(cfg.attention, cfg.dims, cfg.parsed.layers[0])
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    return m


def test_registered() -> None:
    assert Family("A").spec.mixer is AttentionMixer and Family("A").spec.config is AttentionConfig


@pytest.mark.parametrize("kv", [1, 4])  # multi-query and plain multi-head (no GQA); the contract runs 2
def test_causal(kv: int) -> None:
    m = make(n_kv_heads=kv)
    x = torch.randn(1, 12, 32)
    y = m(x).y
    x2 = x.clone()
    x2[:, 7] += 1.0
    y2 = m(x2).y
    torch.testing.assert_close(y[:, :7], y2[:, :7], rtol=0, atol=1e-6)
    assert (y[:, 7:] - y2[:, 7:]).abs().max() > 1e-4


def repeated_heads_reference(m: Any, x: torch.Tensor, norm: Any = None) -> torch.Tensor:
    """Full multi-head attention by hand for a 4-head, 2-kv-head mixer of head width 8: k/v heads repeated, RoPE,
    causal softmax; ``norm(t, weight)``, where given, applied to the whole q and k projections first."""
    from amer.blocks.attention import apply_rope

    B, T, H, hd = *x.shape[:2], 4, 8
    q, k, v = m.qkv(x).split([H * hd, 2 * hd, 2 * hd], dim=-1)
    if norm is not None:
        q, k = norm(q, m.q_norm.weight), norm(k, m.k_norm.weight)
    q = q.view(B, T, H, hd).transpose(1, 2)
    k = k.view(B, T, 2, hd).transpose(1, 2).repeat_interleave(2, dim=1)
    v = v.view(B, T, 2, hd).transpose(1, 2).repeat_interleave(2, dim=1)
    cos, sin = m._rope(0, T, x.device)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    att = (q @ k.transpose(-1, -2)) / hd**0.5
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    return m.out_proj((att @ v).transpose(1, 2).reshape(B, T, H * hd))


def test_gqa_matches_repeated_heads() -> None:
    """GQA with kv heads shared equals full multi-head attention whose k/v heads are repeated."""
    m = make(n_heads=4, n_kv_heads=2)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(m(x).y, repeated_heads_reference(m, x), rtol=1e-5, atol=1e-5)


def test_rope_relative() -> None:
    """RoPE scores depend only on relative offsets: shifting every position leaves q.k unchanged."""
    m = make()
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 5, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 5, 8)
    from amer.blocks.attention import apply_rope

    c0, s0 = m._rope(0, 5, torch.device("cpu"))
    c1, s1 = m._rope(100, 5, torch.device("cpu"))
    d0 = apply_rope(q, c0, s0)[..., 3, :] @ apply_rope(k, c0, s0)[..., 1, :].transpose(-1, -2)
    d1 = apply_rope(q, c1, s1)[..., 3, :] @ apply_rope(k, c1, s1)[..., 1, :].transpose(-1, -2)
    torch.testing.assert_close(d0, d1, rtol=1e-4, atol=1e-4)


def test_prefill_equals_token_by_token_with_qk_norm() -> None:
    """The normalised keys are what the cache stores (the contract runs without q/k norm)."""
    m = make(qk_norm=True)
    x = torch.randn(2, 11, 32)
    full = m(x).y
    cache = m.init_cache(2, 16)
    steps = []
    for t in range(11):
        out = m(x[:, t:t + 1], cache=cache)
        cache = out.cache
        steps.append(out.y)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    # chunked prefill: 4 tokens, then 7
    cache = m.init_cache(2, 16)
    a = m(x[:, :4], cache=cache)
    b = m(x[:, 4:], cache=a.cache)
    torch.testing.assert_close(torch.cat([a.y, b.y], 1), full, rtol=1e-5, atol=1e-5)
    assert b.cache.pos == 11


def test_too_long_is_clear_error() -> None:
    m = make()
    cache = m.init_cache(1, 4)
    with pytest.raises(ValueError, match="exceeds"):
        m(torch.randn(1, 5, 32), cache=cache)


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention warns when it runs uncompiled
@pytest.mark.parametrize("window", [None, 5])
def test_flex_document_attention_equals_the_dense_mask_path(window, monkeypatch) -> None:
    """The CUDA path for packed documents (flex_attention with a document block mask) equals the CPU path (dense
    block-diagonal mask) where flex runs on CPU: the forward, uncompiled (its CPU backward does not exist)."""
    from amer.blocks.doc_ids import DocIds
    from amer.ops import flex, kernels

    mixer = make(window=window)
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(0))
    docs = DocIds(torch.tensor([[1] * 9 + [2] * 22 + [3] * 9, [5] * 40]))
    with torch.no_grad():
        dense = mixer(x, doc_ids=docs).y  # CPU: the reference path
        assert kernels.choices()["attention_documents"].startswith("reference")
        uncompiled = flex.flex_attend
        monkeypatch.setattr(kernels, "attention_backend", lambda device, documents: "flex")
        monkeypatch.setattr(flex, "flex_attend", lambda *a: uncompiled(*a, compiled=False))
        got = mixer(x, doc_ids=DocIds(docs.ids)).y
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
        # negative control: a block mask that ignores the documents lets tokens see the previous document
        monkeypatch.setattr(flex, "document_block_mask", lambda index, T, w, device: (
            flex.create_block_mask(lambda b, h, q, kv: (kv <= q) & ((q - kv < w) if w else True), None, None, T, T,
                                   device=device)))
        leaky = mixer(x, doc_ids=DocIds(docs.ids)).y
    with pytest.raises(AssertionError):
        torch.testing.assert_close(leaky, dense, rtol=1e-5, atol=1e-5)


def test_qk_norm_over_the_whole_projection() -> None:
    """``qk_norm_scope="projection"`` normalises all heads of q (and of k) together, with one gain per channel, as
    OLMo 2 does: equal to a reference written here, unequal to the per-head norm on the same weights (negative
    control), and the cache stores the normalised keys (decoding equals the full forward)."""
    m = make(qk_norm=True, qk_norm_scope="projection")
    assert m.q_norm.weight.shape == (32,) and m.k_norm.weight.shape == (16,)
    x = torch.randn(2, 9, 32)
    B, T = x.shape[:2]

    def norm(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-5) * w

    ref = repeated_heads_reference(m, x, norm)
    full = m(x).y
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    per_head = make(qk_norm=True)
    state = {n: t for n, t in m.state_dict().items() if "norm" not in n}
    per_head.load_state_dict(state, strict=False)
    assert (per_head(x).y - full).abs().max() > 1e-3
    cache, steps = m.init_cache(B, T), []
    for t in range(T):
        out = m(x[:, t:t + 1], cache=cache)
        cache = out.cache
        steps.append(out.y)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="qk_norm_scope must be 'head' or 'projection'"):
        AttentionConfig(qk_norm_scope="all")
