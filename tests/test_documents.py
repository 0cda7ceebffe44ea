"""Packed documents: no block sees across a document boundary (the packed-row clauses of the mixer contract).

A document inside a packed row must get exactly the outputs, taps and gradients it gets alone in a row
of its own, whatever precedes it, and decoding it from a fresh cache must reproduce them. Each
``check_documents_*`` takes a family letter, like the clauses of ``test_mixer_contract.py``, and runs
for every registered family (the toy family of ``test_families.py`` runs them too). The negative
control is the contract's broken family with the ``ignore_documents`` fault: a mixer that runs straight
through the boundaries fails every clause here.

Boundaries sit mid-chunk, exactly on a Mamba chunk boundary (8, 16), on the RG-LRU scan's chunk
boundary (16), after a one-token document, and past both chunk sizes.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_mixer_contract as contract
import torch
from test_mixer_contract import LETTERS, MODEL_T, VOCAB, B, D, T, build_model, faulty_family, inputs  # noqa: F401
from torch import Tensor

from amer import HybridLM, ModelConfig
from amer.blocks import DocIds
from amer.blocks import attention as attention_module
from amer.ops import conv as conv_mod
from amer.ops.conv import causal_conv1d
from amer.ops.scan import linear_scan_sequential
from amer.ops.ssd import ssd_scan_torch, ssd_sequential

ATOL = 1e-5  # fp32: the same maths over a different summation order (a fresh row, other chunk offsets)
CUTS = ((0, 5, 8, 17), (0, 1, 16))  # document starts of the two mixer-level rows (T = 24)


def doc_ids(cuts: tuple[tuple[int, ...], ...], length: int) -> Tensor:
    ids = torch.zeros(len(cuts), length, dtype=torch.long)
    for r, starts in enumerate(cuts):
        for s in starts[1:]:
            ids[r, s:] += 1
    return ids


def spans(cuts: tuple[tuple[int, ...], ...], length: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document."""
    return [(r, s, e) for r, starts in enumerate(cuts) for s, e in zip(starts, (*starts[1:], length))]


def check_model_packed_equals_alone(model: HybridLM, x: Tensor, cuts: tuple[tuple[int, ...], ...]) -> None:
    """Every tap and the logits of each document of ``x`` packed as ``cuts`` are those it gets alone in a row."""
    with torch.no_grad():
        out = model(x, doc_ids=doc_ids(cuts, x.shape[1]))
        for r, s, e in spans(cuts, x.shape[1]):
            alone = model(x[r:r + 1, s:e])
            for tap_p, tap_a in zip(out.taps, alone.taps, strict=True):
                torch.testing.assert_close(tap_p.hidden[r:r + 1, s:e], tap_a.hidden, rtol=0, atol=ATOL,
                                           msg=lambda msg, name=tap_a.name: f"{name} of [{s}, {e}) in row {r}: {msg}")
            torch.testing.assert_close(out.logits[r:r + 1, s:e], alone.logits, rtol=0, atol=ATOL,
                                       msg=lambda msg: f"logits of [{s}, {e}) in row {r}: {msg}")


# ------------------------------------------------------------------------------------------------
# the clauses


def check_documents_packed_equals_alone(letter: str, **family_cfg: Any) -> None:
    """Every document's outputs, input gradients and (summed) parameter gradients equal those of the
    documents run one by one in rows of their own; no gradient reaches another document's inputs."""
    mixer = contract.make_mixer(letter, **family_cfg)
    x = inputs().requires_grad_()
    probe = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    params = list(mixer.parameters())
    packed = mixer(x, doc_ids=DocIds(doc_ids(CUTS, T))).y
    g_packed = torch.autograd.grad((packed * probe).sum(), [x, *params], allow_unused=True)
    g_alone = [torch.zeros_like(p) for p in params]
    for r, s, e in spans(CUTS, T):
        xd = x.detach()[r:r + 1, s:e].clone().requires_grad_()
        alone = mixer(xd).y
        torch.testing.assert_close(packed[r:r + 1, s:e], alone, rtol=0, atol=ATOL,
                                   msg=lambda m: f"{letter}: document [{s}, {e}) of row {r}: {m}")
        gx, *gp = torch.autograd.grad((alone * probe[r:r + 1, s:e]).sum(), [xd, *params], allow_unused=True)
        torch.testing.assert_close(g_packed[0][r:r + 1, s:e], gx, rtol=0, atol=ATOL,
                                   msg=lambda m: f"{letter}: input gradient of [{s}, {e}) in row {r}: {m}")
        g_alone = [a + (0 if b is None else b) for a, b in zip(g_alone, gp)]
    for (name, _), got, want in zip(mixer.named_parameters(), g_packed[1:], g_alone):
        torch.testing.assert_close(torch.zeros_like(want) if got is None else got, want, rtol=1e-4, atol=ATOL,
                                   msg=lambda m: f"{letter}: gradient of {name}: {m}")


def check_documents_independent(letter: str, **family_cfg: Any) -> None:
    """Replacing the documents before a boundary leaves everything from the boundary on unchanged
    (bit for bit: a cut contributes exact zeros), and does change the replaced part."""
    mixer = contract.make_mixer(letter, **family_cfg)
    ids = DocIds(doc_ids(CUTS, T))
    x = inputs()
    other = x.clone()
    other[0, :8] = torch.randn(8, D, generator=torch.Generator().manual_seed(9))
    other[1, :16] = torch.randn(16, D, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ref, got = mixer(x, doc_ids=ids).y, mixer(other, doc_ids=ids).y
    for row, cut in ((0, 8), (1, 16)):
        assert torch.equal(got[row, cut:], ref[row, cut:]), f"{letter}: the document before {cut} changed later outputs"
        assert (got[row, :cut] - ref[row, :cut]).abs().max() > 1e-4, f"{letter}: the replaced part did not change"


def check_documents_decoding(letter: str, **family_cfg: Any) -> None:
    """Model level: a document in the middle of a packed row equals a prefill of its first tokens from a
    fresh cache followed by token-by-token decoding (logits), and the same document alone (every tap)."""
    model = build_model(letter, **family_cfg)
    x = contract.tokens()
    starts = ((0, 7, 15), (0, 3, 16))
    ids = doc_ids(starts, MODEL_T)
    with torch.no_grad():
        packed = model(x, doc_ids=ids)
        for r, s, e in spans(starts, MODEL_T):
            doc = x[r:r + 1, s:e]
            alone = model(doc)
            for tap_p, tap_a in zip(packed.taps, alone.taps):
                torch.testing.assert_close(tap_p.hidden[r:r + 1, s:e], tap_a.hidden, rtol=0, atol=ATOL,
                                           msg=lambda m: f"{letter}: tap {tap_a.label} of [{s}, {e}): {m}")
            n = e - s
            pre = min(3, n)
            cache = model.init_cache(1, n)
            out = model(doc[:, :pre], taps=False, cache=cache)
            logits, cache = [out.logits], out.cache
            for t in range(pre, n):
                out = model(doc[:, t:t + 1], taps=False, cache=cache)
                logits.append(out.logits)
                cache = out.cache
            torch.testing.assert_close(torch.cat(logits, 1), packed.logits[r:r + 1, s:e], rtol=ATOL, atol=ATOL,
                                       msg=lambda m: f"{letter}: decoding [{s}, {e}) of row {r}: {m}")


def check_documents_compile(letter: str, **family_cfg: Any) -> None:
    """The packed forward and backward of the model trace into one graph (static shapes: the document
    layout is computed from the ids inside the graph) and equal eager."""
    model = build_model(letter, **family_cfg).train()
    x, ids = contract.tokens(), doc_ids(((0, 7, 15), (0, 3, 16)), MODEL_T)
    params = list(model.parameters())

    def run(fn: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        out = fn(x, doc_ids=ids, taps=False)
        return out.logits, torch.autograd.grad(out.logits.square().mean() + sum(out.aux_losses.values()), params)

    ref, g_ref = run(model)
    torch._dynamo.reset()
    try:
        got, g_got = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


DOCUMENT_CONTRACT = (check_documents_packed_equals_alone, check_documents_independent, check_documents_decoding,
                     check_documents_compile)


# ------------------------------------------------------------------------------------------------
# every registered family


@pytest.mark.parametrize("letter", LETTERS)
def test_packed_document_equals_alone(letter: str) -> None:
    check_documents_packed_equals_alone(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_document_independent_of_its_predecessor(letter: str) -> None:
    check_documents_independent(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_packed_document_equals_decoding(letter: str) -> None:
    check_documents_decoding(letter)


@pytest.mark.parametrize("letter", LETTERS)
def test_packed_model_compiles_fullgraph(letter: str) -> None:
    check_documents_compile(letter)


def test_packed_capacity_moe_compiles_fullgraph() -> None:
    check_documents_compile("E", dispatch="capacity", capacity_factor=4.0)


def test_attention_query_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long rows attend in query blocks; blocks smaller than a document and than the row give the same
    documents as one block."""
    monkeypatch.setattr(attention_module, "DOC_QUERY_BLOCK", 5)
    check_documents_packed_equals_alone("A")
    check_documents_independent("A")


@pytest.mark.parametrize("pattern", ["AEMR", "MRAE", "AEMEAEMR"])
def test_mixed_patterns_packed_equals_alone(pattern: str) -> None:
    cfg = ModelConfig(pattern=pattern, d_model=D, vocab_size=VOCAB, max_seq_len=64, init_std=0.1,
                      **{"attention": contract.SMALL["A"], "mamba": contract.SMALL["M"], "moe": contract.SMALL["E"]})
    # a seed without a near-tie in top-k routing: a tie (seed 0 has one, 2e-8 apart) flips a token's expert
    # between two computations of the same token, which is rounding, not a leak between documents
    torch.manual_seed(1)
    model = HybridLM(cfg)
    starts = ((0, 5, 8, 17, 30), (0, 1, 16, 33))
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(4))
    out = model(x, doc_ids=doc_ids(starts, 40))
    probe = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(5))
    g_packed = torch.autograd.grad((out.logits * probe).sum(), list(model.parameters()))
    g_alone = [torch.zeros_like(p) for p in model.parameters()]
    for r, s, e in spans(starts, 40):
        alone = model(x[r:r + 1, s:e])
        for tap_p, tap_a in zip(out.taps, alone.taps):
            torch.testing.assert_close(tap_p.hidden[r:r + 1, s:e], tap_a.hidden, rtol=0, atol=ATOL,
                                       msg=lambda m: f"{pattern}: {tap_a.label} of [{s}, {e}) in row {r}: {m}")
        torch.testing.assert_close(out.logits[r:r + 1, s:e], alone.logits, rtol=0, atol=ATOL)
        grads = torch.autograd.grad((alone.logits * probe[r:r + 1, s:e]).sum(), list(model.parameters()))
        g_alone = [a + b for a, b in zip(g_alone, grads)]
    for (name, _), a, b in zip(model.named_parameters(), g_packed, g_alone):
        # a sum over 9 documents of gradients up to ~10 in fp32: the tolerance scales with the gradient
        torch.testing.assert_close(a, b, rtol=1e-4, atol=ATOL * max(1.0, float(b.abs().max())),
                                   msg=lambda m: f"{pattern}: gradient of {name}: {m}")


# ------------------------------------------------------------------------------------------------
# the layout and the kernels, in float64 against per-document references


def test_layout_from_ids() -> None:
    ids = torch.tensor([[3, 3, 4, 4, 4, 3, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    docs = DocIds(ids)
    assert docs.starts.tolist() == [[1, 0, 1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert docs.index.tolist() == [[1, 1, 2, 2, 2, 3, 4, 4], [1] * 8]  # a repeated id after another is new
    assert docs.position.tolist() == [[0, 1, 0, 1, 2, 0, 0, 1], list(range(8))]
    assert docs.valid.tolist()[0] == [True] * 6 + [False] * 2
    mask = docs.attention_mask(0, 8, torch.float32)[0, 0]
    assert mask.shape == (8, 8) and mask[4, 2] == 0 and mask[4, 1] == float("-inf") and mask[2, 3] == float("-inf")
    # built once: every query range is a view of the one mask
    assert docs.attention_mask(0, 8, torch.float32).data_ptr() == docs.attention_mask(0, 4, torch.float32).data_ptr()
    assert torch.equal(docs.attention_mask(4, 8, torch.float32)[0, 0], mask[4:])
    assert docs.attention_mask(0, 8, torch.float64).data_ptr() != mask.data_ptr()  # per dtype
    with pytest.raises(ValueError, match="integer"):
        DocIds(ids.float())


def test_ssd_cut_at_documents_matches_sequential_per_document() -> None:
    g = torch.Generator().manual_seed(0)
    b, L, H, P, G, N = 2, 37, 4, 8, 2, 6
    x = torch.randn(b, L, H, P, dtype=torch.float64, generator=g, requires_grad=True)
    dt = (torch.rand(b, L, H, dtype=torch.float64, generator=g) * 0.5).requires_grad_()
    A = -torch.rand(H, dtype=torch.float64, generator=g) * 2
    Bm = torch.randn(b, L, G, N, dtype=torch.float64, generator=g, requires_grad=True)
    C = torch.randn(b, L, G, N, dtype=torch.float64, generator=g)
    cuts = ((0, 8, 19, 30), (0, 1, 16, 17))
    y, _ = ssd_scan_torch(x, dt, A, Bm, C, 8, seq_idx=doc_ids(cuts, L))
    probe = torch.randn(y.shape, dtype=torch.float64, generator=g)
    gx, gdt, gB = torch.autograd.grad((y * probe).sum(), [x, dt, Bm])
    for r, s, e in spans(cuts, L):
        sl = (slice(r, r + 1), slice(s, e))
        ref, _ = ssd_sequential(x[sl], dt[sl], A, Bm[sl], C[sl])
        torch.testing.assert_close(y[sl], ref, rtol=0, atol=1e-12)
        rx, rdt, rB = torch.autograd.grad((ref * probe[sl]).sum(), [x, dt, Bm])
        for got, want in ((gx, rx), (gdt, rdt), (gB, rB)):
            torch.testing.assert_close(got[sl], want[sl], rtol=0, atol=1e-12)


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("masks", [False, True], ids=["taken-back", "masked"])
def test_conv_stops_at_document_start(K: int, masks: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of stopping the window, each against the documents run alone (outputs, input and weight
    gradients): on CPU the taps that crossed a start are taken back afterwards, elsewhere each tap is masked
    (forced here); documents of 1, 2, 3 and 6 tokens, shorter and longer than the window."""
    monkeypatch.setattr(conv_mod, "_corrects", lambda x: not masks)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, K, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=g)
    cuts = ((0, 2, 3, 9), (0, 6))
    y, _ = causal_conv1d(x, w, bias, position=DocIds(doc_ids(cuts, 12)).position)
    probe = torch.randn(y.shape, dtype=torch.float64, generator=g)
    gx, gw = torch.autograd.grad((y * probe).sum(), [x, w])
    gw_ref = torch.zeros_like(w)
    for r, s, e in spans(cuts, 12):
        xd = x.detach()[r:r + 1, s:e].clone().requires_grad_()
        ref, _ = causal_conv1d(xd, w, bias)
        torch.testing.assert_close(y[r:r + 1, s:e], ref, rtol=0, atol=1e-12)
        rx, rw = torch.autograd.grad((ref * probe[r:r + 1, s:e]).sum(), [xd, w])
        torch.testing.assert_close(gx[r:r + 1, s:e], rx, rtol=0, atol=1e-12)
        gw_ref += rw
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("masks", [False, True], ids=["taken-back", "masked"])
def test_conv_documents_equal_alone_bit_for_bit(K: int, masks: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """In float32 the packed conv's outputs and input gradient equal each document run alone exactly, not just
    within rounding: the rewritten outputs add their taps in the whole-row order. (The weight gradient sums
    over all documents at once, so only its rounding may differ.) 37 channels: vector lanes and a tail."""
    monkeypatch.setattr(conv_mod, "_corrects", lambda x: not masks)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 40, 37, generator=g, requires_grad=True)
    w = torch.randn(37, K, generator=g)
    bias = torch.randn(37, generator=g)
    cuts = ((0, 1, 3, 4, 17, 30), (0, 2, 21))
    y, _ = causal_conv1d(x, w, bias, position=DocIds(doc_ids(cuts, 40)).position)
    probe = torch.randn(y.shape, generator=g)
    (gx,) = torch.autograd.grad((y * probe).sum(), [x])
    for r, s, e in spans(cuts, 40):
        xd = x.detach()[r:r + 1, s:e].clone().requires_grad_()
        ref, _ = causal_conv1d(xd, w, bias)
        (rx,) = torch.autograd.grad((ref * probe[r:r + 1, s:e]).sum(), [xd])
        assert torch.equal(y[r:r + 1, s:e], ref), (r, s, e)
        assert torch.equal(gx[r:r + 1, s:e], rx), (r, s, e)


def test_rglru_state_resets_at_document_start() -> None:
    """The recurrent mixer in float64 against the plain recurrence restarted per document."""
    mixer = contract.make_mixer("R").double()
    x = inputs().double()
    docs = DocIds(doc_ids(CUTS, T))
    with torch.no_grad():
        packed = mixer(x, doc_ids=docs).y
        for r, s, e in spans(CUTS, T):
            torch.testing.assert_close(packed[r:r + 1, s:e], mixer(x[r:r + 1, s:e]).y, rtol=0, atol=1e-12)
    a = torch.rand(1, 6, 3, dtype=torch.float64)
    b = torch.randn(1, 6, 3, dtype=torch.float64)
    ref = torch.cat([linear_scan_sequential(a[:, :4], b[:, :4]), linear_scan_sequential(a[:, 4:], b[:, 4:])], 1)
    cut = a.clone()
    cut[:, 4] = 0  # what a document start does to the scan coefficient
    torch.testing.assert_close(linear_scan_sequential(cut, b), ref, rtol=0, atol=1e-12)


def test_moe_statistics_count_real_tokens_only() -> None:
    """Padding (negative ids) is routed but left out of the load-balancing and z losses and the stats:
    changing the padded tokens changes none of them."""
    mixer = contract.make_mixer("E")
    ids = doc_ids(((0, 10),), T).repeat(B, 1)
    ids[:, 18:] = -1
    x = inputs()
    other = x.clone()
    other[:, 18:] = 5 * torch.randn(B, T - 18, D, generator=torch.Generator().manual_seed(3))
    a, b = mixer(x, doc_ids=DocIds(ids)), mixer(other, doc_ids=DocIds(ids))
    for k in a.aux:
        torch.testing.assert_close(a.aux[k], b.aux[k], msg=lambda m: f"{k}: {m}")
    for k in ("moe/load_max", "moe/router_entropy"):
        torch.testing.assert_close(a.stats[k], b.stats[k], msg=lambda m: f"{k}: {m}")
    real = mixer(x[:, :18])  # the same real tokens with no padding at all
    for k in a.aux:
        torch.testing.assert_close(a.aux[k], real.aux[k], msg=lambda m: f"{k} vs unpadded: {m}")
    unmasked = mixer(other)  # the control: without the layout, padding does count
    assert not torch.allclose(unmasked.aux["moe_lb"], b.aux["moe_lb"])


def test_decoding_refuses_document_ids() -> None:
    model = build_model("A")
    with pytest.raises(ValueError, match="one document"):
        model(contract.tokens(), doc_ids=doc_ids(((0, 3), (0, 4)), MODEL_T), cache=model.init_cache(B, MODEL_T))
    with pytest.raises(ValueError, match="must match"):
        model(contract.tokens(), doc_ids=torch.zeros(B, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# negative control: a mixer that runs straight through the boundaries fails every clause


def test_sound_control_honours_documents(faulty_family: Any) -> None:  # noqa: F811
    for clause in DOCUMENT_CONTRACT:
        clause("Z")


@pytest.mark.parametrize("clause,message", [
    (check_documents_packed_equals_alone, "not close"),
    (check_documents_independent, "changed later outputs"),
    (check_documents_decoding, "not close"),
])
def test_each_document_check_rejects_a_leak(faulty_family: Any, clause: Any, message: str) -> None:  # noqa: F811
    with pytest.raises(AssertionError, match=message):
        clause("Z", fault="ignore_documents")


# ------------------------------------------------------------------------------------------------
# curvature: each document's trajectory starts at its own first token


def test_curvature_of_a_document_ignores_what_precedes_it_in_the_row() -> None:
    """A document behind 16 tokens of padding in its row gets the token and depth curvature it gets alone
    (padding is out of every statistic, and with documents kept apart it reaches no block either);
    the control, blocks run across the boundary, differs."""
    from amer.analysis.curvature import evaluate

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_preset("tiny"))
    doc = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    junk = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    alone = [{"tokens": doc, "doc_ids": torch.zeros_like(doc)}]
    packed = [{"tokens": torch.cat([junk, doc], 1),
               "doc_ids": torch.cat([torch.full_like(junk, -1), torch.zeros_like(doc)], 1)}]

    def stats(batches: list[dict[str, Tensor]], documents: bool) -> list[float]:
        res = evaluate(model, batches, strides=(1, 2), n_bootstrap=10, progress=False, documents=documents)
        return ([s["mean"] for layer in res["layers"] for s in layer["token"].values()]
                + [b["depth"]["mean"] for b in res["boundaries"]])

    want = stats(alone, True)
    torch.testing.assert_close(stats(packed, True), want, rtol=1e-5, atol=1e-6)
    assert max(abs(a - b) for a, b in zip(stats(packed, False), want)) > 1e-4


@pytest.mark.parametrize("variant", contract.OPTION_VARIANTS, ids=contract._variant_id)
@pytest.mark.parametrize("check", DOCUMENT_CONTRACT, ids=lambda f: f.__name__)
def test_option_variants_keep_documents_apart(check: Any, variant: Any) -> None:
    letter, options = variant
    check(letter, **options)
