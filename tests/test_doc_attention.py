"""Causal attention within packed documents, one kernel call per document (amer.ops.doc_attention): equal to one
call with the block-diagonal causal mask in outputs and gradients, as an eager node and as the compiled op, and
chosen by the A family for long rows on CPU."""

from __future__ import annotations

import pytest
import torch
from test_documents import check_documents_compile, check_documents_independent, check_documents_packed_equals_alone

import amer.blocks.attention as attention_module
import amer.blocks.zamba as zamba_module
import amer.ops.doc_attention as doc_attention
from amer.blocks.doc_ids import DocIds
from amer.ops.doc_attention import document_attention

T = 40
# row 0: two documents of 20 tokens (one call each); row 1: one document; row 2: eight documents of 5 tokens on
# average, under SPLIT_MIN_MEAN: one masked call for the row
STARTS = ((0, 20), (0,), (0, 3, 5, 9, 14, 15, 22, 30))


def _index(starts=STARTS, length: int = T) -> torch.Tensor:
    ids = torch.zeros(len(starts), length, dtype=torch.long)
    for r, row in enumerate(starts):
        for s in row[1:]:
            ids[r, s:] += 1
    return DocIds(ids).index


def _qkv(dtype=torch.float64, hd: int = 8):
    g = torch.Generator().manual_seed(0)
    B = len(STARTS)
    q = torch.randn(B, T, 6, hd, generator=g, dtype=dtype).transpose(1, 2)  # strided, as the A family's views
    k = torch.randn(B, 2, T, hd, generator=g, dtype=dtype)
    v = torch.randn(B, 2, T, hd, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _reference(q, k, v, index, scale=None):
    """Scores, mask and softmax written out (no fused kernel), key/value heads repeated for their query heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    pos = torch.arange(index.shape[1])
    allowed = (index[:, :, None] == index[:, None, :]) & (pos[None, :] <= pos[:, None])
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v


def _with_grads(fn, q, k, v, probe):
    y = fn(q, k, v)
    return [y.detach(), *torch.autograd.grad(y, (q, k, v), probe)]


@pytest.mark.parametrize("scale", [None, 0.3])
def test_equals_the_block_diagonal_mask(scale: float | None) -> None:
    """fp64: outputs and q/k/v gradients equal one masked call, for split rows and a masked row (short
    documents) and grouped heads. Negative control: one document start moved by one
    token changes the output."""
    index = _index()
    lengths = [len(r) for r in STARTS]
    assert [T >= n * doc_attention.SPLIT_MIN_MEAN for n in lengths] == [True, True, False]  # both paths run
    q, k, v = _qkv()
    probe = torch.randn(len(STARTS), 6, T, 8, dtype=torch.float64)
    want = _with_grads(lambda *a: _reference(*a, index, scale), q, k, v, probe)
    got = _with_grads(lambda *a: document_attention(*a, index, scale), q, k, v, probe)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    empty = document_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], index[:, :0], scale)
    assert empty.shape == (len(STARTS), 6, 0, 8)
    moved = _index(((0, 21), (0,), STARTS[2]))
    assert not torch.allclose(document_attention(q, k, v, moved, scale), want[0], atol=1e-6)


def test_bf16_keeps_an_fp32_logsumexp() -> None:
    """bf16 queries, keys and values: a bf16 output and an fp32 log-sum-exp; fp32 keys and values beside bf16
    queries are taken to bf16 (the same output as casting them first)."""
    q, k, v = (t.detach().to(torch.bfloat16) for t in _qkv(torch.float32))
    out, lse = doc_attention._attention_op(q, k, v, _index(), None)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), _reference(q, k, v, _index()).float(), rtol=2e-2, atol=2e-2)
    mixed = document_attention(q, k.float(), v.float(), _index())
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed, out)


def test_compiled_runs_the_opaque_op_with_eager_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under compilation the document attention is one opaque op per direction (opcheck passes for both); its
    outputs and gradients equal the eager node's. Negative control: eager calls never reach the op, the compiled
    graph holds it."""
    index = _index()
    q, k, v = _qkv()
    torch.library.opcheck(doc_attention._attention_op, (q, k, v, index, None))
    out, lse = doc_attention._attention_op(q.detach(), k.detach(), v.detach(), index, None)
    probe = torch.randn_like(out)
    torch.library.opcheck(doc_attention._attention_op_backward,
                          (probe, q.detach(), k.detach(), v.detach(), out, lse, index, 0.5))
    targets: list[object] = []

    def backend(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    calls = []
    monkeypatch.setattr(doc_attention, "_attention_op",
                        lambda *a, _op=doc_attention._attention_op: (calls.append(1), _op(*a))[1])
    eager = _with_grads(lambda *a: document_attention(*a, index), q, k, v, probe)
    assert calls == []
    torch._dynamo.reset()
    compiled = _with_grads(torch.compile(lambda *a: document_attention(*a, index), backend=backend, fullgraph=True),
                           q, k, v, probe)
    torch._dynamo.reset()
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.ops.amer.document_attention.default in targets and calls


@pytest.mark.parametrize("letter, module", [("A", attention_module), ("H", zamba_module)])
def test_long_rows_on_cpu_attend_per_document(letter: str, module, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the row-length and mean-length thresholds at 1, every packed forward of the family's attention calls
    the kernel once per document, and the document contract holds (packed == alone, independence, compiled
    fullgraph). At the real thresholds the contract's short rows do not call it."""
    calls, split = [], []
    real, real_split = module.document_attention, doc_attention._split
    monkeypatch.setattr(module, "document_attention", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(doc_attention, "_split", lambda *a: (split.append(real_split(*a)), split[-1])[1])
    check_documents_packed_equals_alone(letter)
    assert calls == []  # the contract's rows are shorter than MIN_LEN
    monkeypatch.setattr(doc_attention, "MIN_LEN", 1)
    monkeypatch.setattr(doc_attention, "SPLIT_MIN_MEAN", 1)
    check_documents_packed_equals_alone(letter)
    assert calls and split and all(split)
    check_documents_independent(letter)
    check_documents_compile(letter)
    assert all(split)


def test_compiled_blocks_build_the_shared_mask_only_for_the_masked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ahead of a compiled attention block the block-diagonal mask is built only when the block will read it: not
    for rows that attend per document; for shorter rows it is (the control)."""
    from amer import HybridLM, ModelConfig
    from amer.training.compile import compile_blocks

    built = []
    monkeypatch.setattr(DocIds, "prepare", lambda self, dtype: built.append(dtype))
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(pattern="AA", d_model=32, vocab_size=64, max_seq_len=64,
                                 attention={"n_heads": 4, "n_kv_heads": 2}))
    compile_blocks(model, backend="aot_eager")
    x = torch.randint(0, 64, (2, 48))
    ids = torch.zeros(2, 48, dtype=torch.long)
    ids[:, 20:] = 1
    try:
        model(x, doc_ids=ids)
        assert len(built) == 2  # one per block: the shared mask is cached on the forward's DocIds
        built.clear()
        monkeypatch.setattr(doc_attention, "MIN_LEN", 1)
        model(x, doc_ids=ids)
        assert built == []
    finally:
        torch._dynamo.reset()
