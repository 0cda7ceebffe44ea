"""Tests for amer/stp.py: the STP loss, its sampler and the deterministic curvature estimators."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amer.analysis.trajectory import depth_curvature, depth_curvature_per_token, token_curvature
from amer.stp import compute_stp_loss, sample_spans


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _line(batch: int, length: int, dim: int, times: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    a = torch.randn(batch, 1, dim, generator=g)
    v = torch.randn(batch, 1, dim, generator=g)
    t = torch.arange(length, dtype=torch.float32) if times is None else times
    return a + t.view(1, -1, 1) * v  # (B, T, D)


def _packed_doc_ids(lengths: list[int], total: int) -> torch.Tensor:
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return torch.cat([ids, torch.full((total - ids.numel(),), -1)])  # negative = padding


# ---------------------------------------------------------------------------------------------
# values of the loss on trajectories with known curvature
# ---------------------------------------------------------------------------------------------


def test_straight_line_is_zero() -> None:
    h = _line(4, 64, 32)
    assert compute_stp_loss(h, n_spans=64, generator=_gen()).item() < 1e-5


def test_straight_line_nonuniform_spacing_is_zero() -> None:
    times = torch.rand(64, generator=_gen(1)).add(0.05).cumsum(0) ** 1.5  # strictly increasing, uneven
    h = _line(4, 64, 32, times=times)
    assert compute_stp_loss(h, n_spans=64, generator=_gen()).item() < 1e-5


def test_iid_gaussian_is_one_and_a_half() -> None:
    # consecutive chords share the middle point: cos -> -1/2 in high dimension
    h = torch.randn(8, 128, 512, generator=_gen(2))
    loss = compute_stp_loss(h, n_spans=64, generator=_gen())
    assert abs(loss.item() - 1.5) < 0.05


def test_random_walk_is_one() -> None:
    # independent increments: the chords are orthogonal in expectation
    h = torch.randn(8, 128, 512, generator=_gen(3)).cumsum(1)
    loss = compute_stp_loss(h, n_spans=64, generator=_gen())
    assert abs(loss.item() - 1.0) < 0.05


def test_reversal_is_two() -> None:
    t = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0])
    h = t.view(1, 5, 1) * torch.ones(1, 1, 3)
    vals, _ = token_curvature(h, reduce=False)
    assert torch.allclose(vals[0], torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(0, 24),
    dim=st.integers(1, 6),
    n_spans=st.integers(1, 6),
    log_scale=st.sampled_from([-6, 0, 4]),
    mask_kind=st.sampled_from(["none", "bool", "doc"]),
    duplicate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_output_always_in_range(
    batch: int, length: int, dim: int, n_spans: int, log_scale: int, mask_kind: str, duplicate: bool, seed: int
) -> None:
    g = _gen(seed)
    h = torch.randn(batch, length, dim, generator=g) * 10.0**log_scale
    if duplicate and length > 1:  # repeated states make zero-length chords
        h[:, 1::2] = h[:, :-1:2][:, : h[:, 1::2].shape[1]]
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, length, generator=g) > 0.3
    elif mask_kind == "doc":
        mask = torch.randint(-1, 3, (batch, length), generator=g).sort(1).values
    loss = compute_stp_loss(h, n_spans=n_spans, mask=mask, generator=g)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.isfinite(loss) and 0.0 <= loss.item() <= 2.0
    vals, w = token_curvature(h, mask=mask, reduce=False)
    assert torch.isfinite(vals).all() and (vals >= 0).all() and (vals <= 2).all()
    assert vals.shape == w.shape == (batch, max(length - 2, 0))


@pytest.mark.parametrize("length", [0, 1, 2])
def test_short_sequences_give_attached_zero(length: int) -> None:
    h = torch.randn(2, length, 8, requires_grad=True)
    loss = compute_stp_loss(h, n_spans=4)
    assert loss.item() == 0.0 and loss.requires_grad and loss.dtype == torch.float32
    loss.backward()
    assert h.grad is not None and (h.grad == 0).all()
    layers = [torch.randn(2, length, 8, requires_grad=True) for _ in range(3)]
    compute_stp_loss(layers, n_spans=2, mask=torch.ones(2, length, dtype=torch.bool)).backward()
    assert all(x.grad is not None for x in layers)


# ---------------------------------------------------------------------------------------------
# gradients, variance, multi-layer
# ---------------------------------------------------------------------------------------------


def test_gradients_flow_and_are_nonzero() -> None:
    h = torch.randn(4, 32, 16, requires_grad=True)
    compute_stp_loss(h, n_spans=4, generator=_gen()).backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_more_spans_lower_variance() -> None:
    h = torch.randn(4, 64, 4, generator=_gen(5))  # low D: per-triple values vary a lot
    g = _gen(6)

    def spread(n_spans: int) -> float:
        vals = torch.stack([compute_stp_loss(h, n_spans=n_spans, generator=g) for _ in range(200)])
        return vals.std().item()

    s1, s16 = spread(1), spread(16)
    assert s16 < s1
    assert s1 / s16 > 2.5  # ~sqrt(16) = 4 for independent spans


def test_list_of_layers_sends_gradient_to_every_layer() -> None:
    layers = [torch.randn(2, 32, 64, requires_grad=True) for _ in range(4)]
    loss = compute_stp_loss(layers, n_spans=4, generator=_gen())
    loss.backward()
    for x in layers:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_list_averages_layers_at_shared_positions() -> None:
    a, b = torch.randn(3, 40, 16), torch.randn(3, 40, 24).cumsum(1)  # D may differ
    both = compute_stp_loss([a, b], n_spans=5, generator=_gen(9))
    la = compute_stp_loss(a, n_spans=5, generator=_gen(9))
    lb = compute_stp_loss(b, n_spans=5, generator=_gen(9))
    assert torch.allclose(both, (la + lb) / 2, atol=1e-6)
    line = _line(3, 40, 16)
    assert compute_stp_loss([line, line.clone()], n_spans=8).item() < 1e-5
    with pytest.raises(ValueError):
        compute_stp_loss([a, torch.randn(3, 41, 16)])


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_finite_and_close(dtype: torch.dtype) -> None:
    h32 = torch.randn(4, 64, 128, generator=_gen(7)).cumsum(1)
    h = h32.to(dtype).requires_grad_()
    loss = compute_stp_loss(h, n_spans=8, generator=_gen(8))
    ref = compute_stp_loss(h32, n_spans=8, generator=_gen(8))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) < 0.02
    loss.backward()
    assert h.grad.dtype == dtype and torch.isfinite(h.grad.float()).all()
    assert torch.isfinite(token_curvature(h.detach()))
    assert torch.isfinite(depth_curvature([h.detach()] * 2 + [h.detach() * 2])).all()


@pytest.mark.parametrize("kind", ["zeros", "constant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_degenerate_states_are_finite(kind: str, dtype: torch.dtype) -> None:
    h = torch.zeros(2, 16, 8, dtype=dtype) if kind == "zeros" else torch.full((2, 16, 8), 3.0, dtype=dtype)
    h.requires_grad_()
    loss = compute_stp_loss(h, n_spans=4)
    assert torch.isfinite(loss) and 0.0 <= loss.item() <= 2.0
    loss.backward()
    assert torch.isfinite(h.grad.float()).all()
    assert torch.isfinite(token_curvature(h)) and torch.isfinite(depth_curvature([h, h, h])).all()


# ---------------------------------------------------------------------------------------------
# sampler and masks
# ---------------------------------------------------------------------------------------------


def test_unmasked_sampler_is_ordered_and_in_range() -> None:
    idx, w = sample_spans(16, 7, 50, generator=_gen())
    assert idx.shape == (16, 50, 3) and idx.dtype == torch.long and w.shape == (16, 50)
    assert (idx[..., 0] < idx[..., 1]).all() and (idx[..., 1] < idx[..., 2]).all()
    assert idx.min() >= 0 and idx.max() <= 6 and (w == 1).all()
    # every position is reachable in every role it can play
    assert set(idx[..., 0].unique().tolist()) == set(range(5))
    assert set(idx[..., 2].unique().tolist()) == set(range(2, 7))


def test_doc_mask_keeps_triples_inside_one_document() -> None:
    g = _gen(11)
    batch, length = 6, 48
    rows = []
    for b in range(batch):  # random packings, including documents of length 1 and 2, and padding
        lens = torch.randint(1, 9, (12,), generator=g).tolist()
        keep, total = [], 0
        for n in lens:
            if total + n > length - b:
                break
            keep.append(n)
            total += n
        rows.append(_packed_doc_ids(keep, length))
    rows[-1] = torch.tensor([0, 0, 1, 1] * (length // 4))  # no document of length >= 3: no triple
    doc = torch.stack(rows)
    idx, w = sample_spans(batch, length, 200, mask=doc, generator=g)
    assert idx.min() >= 0 and idx.max() < length
    s, r, t = idx.unbind(-1)
    on = w > 0
    assert ((s < r) & (r < t))[on].all()
    ds, dr, dt = (doc.gather(1, i) for i in (s, r, t))
    assert ((ds == dr) & (dr == dt) & (dr >= 0))[on].all()
    for b in range(batch):  # one document = one contiguous run: no id change between s and t
        for i in on[b].nonzero().flatten().tolist():
            assert (doc[b, s[b, i] : t[b, i] + 1] == doc[b, r[b, i]]).all()
    # weight 0 exactly for rows without any document of length >= 3
    assert (w[-1] == 0).all() and (w[:-1] == 1).all()


def test_bool_mask_triples_use_only_valid_positions() -> None:
    g = _gen(12)
    valid = torch.rand(5, 30, generator=g) > 0.5
    valid[0] = False  # a row of padding
    idx, w = sample_spans(5, 30, 100, mask=valid, generator=g)
    s, r, t = idx.unbind(-1)
    on = w > 0
    assert ((s < r) & (r < t))[on].all()
    assert (valid.gather(1, s) & valid.gather(1, r) & valid.gather(1, t))[on].all()
    assert (w[0] == 0).all() and (w[1:] == 1).all()


def _expected_masked_loss(h: torch.Tensor, doc: torch.Tensor) -> float:
    """Exact expectation of the masked loss under the documented sampler (brute force)."""
    per_row = []
    for b in range(h.shape[0]):
        ids = doc[b].tolist()
        docs = {}
        for i, d in enumerate(ids):
            if d >= 0:
                docs.setdefault(d, []).append(i)  # ids are contiguous runs in this test
        terms = []
        for pos in docs.values():
            for j in range(1, len(pos) - 1):
                r = pos[j]
                vals = [
                    1 - torch.cosine_similarity(h[b, r] - h[b, s], h[b, t] - h[b, r], dim=0).item()
                    for s in pos[:j]
                    for t in pos[j + 1 :]
                ]
                terms.append(sum(vals) / len(vals))
        if terms:  # r uniform over eligible positions of the row
            per_row.append(sum(terms) / len(terms))
    return sum(per_row) / len(per_row)


def test_masked_sampler_matches_documented_distribution() -> None:
    g = _gen(13)
    h = torch.randn(2, 14, 3, generator=g).cumsum(1)  # low D: triples differ, so weighting matters
    doc = torch.stack([_packed_doc_ids([6, 2, 5], 14), _packed_doc_ids([3, 9], 14)])
    expected = _expected_masked_loss(h, doc)
    loss = compute_stp_loss(h, n_spans=40000, mask=doc, generator=g)
    assert abs(loss.item() - expected) < 0.01


def test_masked_loss_equals_document_by_document() -> None:
    g = _gen(14)
    line = _line(1, 10, 512, seed=15)[0]  # document 0: straight, loss 0 on every triple
    noise = torch.randn(12, 512, generator=g)  # document 1: i.i.d., loss ~1.5 on every triple
    pad = torch.randn(4, 512, generator=g) * 100.0
    h = torch.cat([line, noise, pad]).unsqueeze(0)  # (1, 26, 512)
    doc = _packed_doc_ids([10, 12], 26).unsqueeze(0)
    masked = compute_stp_loss(h, n_spans=4000, mask=doc, generator=g).item()
    per_doc = [
        compute_stp_loss(line.unsqueeze(0), n_spans=4000, generator=g).item(),
        compute_stp_loss(noise.unsqueeze(0), n_spans=4000, generator=g).item(),
    ]
    # r is uniform over interior positions, so documents weigh len - 2
    expected = (8 * per_doc[0] + 10 * per_doc[1]) / 18
    assert per_doc[0] < 1e-5 and abs(per_doc[1] - 1.5) < 0.05
    assert abs(masked - expected) < 0.02
    # without the mask the triples cross documents and padding: a clearly different value
    assert abs(compute_stp_loss(h, n_spans=4000, generator=g).item() - expected) > 0.1


def test_bool_mask_excludes_padding() -> None:
    g = _gen(16)
    h = torch.randn(3, 40, 256, generator=g)
    h[:, 25:] = _line(3, 15, 256)  # straight padding would pull the unmasked loss down
    valid = torch.zeros(3, 40, dtype=torch.bool)
    valid[:, :25] = True
    masked = compute_stp_loss(h, n_spans=1000, mask=valid, generator=g).item()
    assert abs(masked - 1.5) < 0.05
    assert compute_stp_loss(h, n_spans=1000, generator=g).item() < 1.4


def test_padding_rows_give_no_nan() -> None:
    h = torch.randn(3, 20, 256, requires_grad=True)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1] = False
    doc = torch.zeros(3, 20, dtype=torch.long)
    doc[1] = -1
    for mask in (valid, doc):
        h.grad = None
        loss = compute_stp_loss(h, n_spans=64, mask=mask, generator=_gen())
        assert torch.isfinite(loss)
        assert abs(loss.item() - 1.5) < 0.1  # mean over valid triples only: the padded row adds nothing
        loss.backward()
        assert torch.isfinite(h.grad).all() and (h.grad[1] == 0).all() and h.grad[0].abs().sum() > 0
    # a batch with no valid triple at all: an attached zero
    h.grad = None
    loss = compute_stp_loss(h, n_spans=8, mask=torch.zeros(3, 20, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (h.grad == 0).all()


@pytest.mark.parametrize("with_mask", [False, True])
def test_generator_reproducibility(with_mask: bool) -> None:
    h = torch.randn(4, 50, 8)
    mask = _packed_doc_ids([20, 25], 50).expand(4, 50) if with_mask else None
    a = compute_stp_loss(h, n_spans=3, mask=mask, generator=_gen(1))
    b = compute_stp_loss(h, n_spans=3, mask=mask, generator=_gen(1))
    c = compute_stp_loss(h, n_spans=3, mask=mask, generator=_gen(2))
    assert a.item() == b.item() and a.item() != c.item()


def test_bad_arguments_raise() -> None:
    h = torch.randn(2, 10, 4)
    with pytest.raises(ValueError):
        compute_stp_loss(h, n_spans=0)
    with pytest.raises(ValueError):
        compute_stp_loss(h, mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError):
        compute_stp_loss(h, mask=torch.ones(2, 10))
    with pytest.raises(ValueError):
        compute_stp_loss(torch.randn(10, 4))
    with pytest.raises(ValueError):
        depth_curvature([h, h])


# ---------------------------------------------------------------------------------------------
# deterministic estimators
# ---------------------------------------------------------------------------------------------


def test_token_curvature_straight_line_and_right_angle() -> None:
    assert token_curvature(_line(2, 30, 16)).item() < 1e-5
    # (0,0) (1,0) (2,0) (2,1) (2,2): a right angle at position 2
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 1.0], [2.0, 2.0]]).unsqueeze(0)
    vals, w = token_curvature(pts, reduce=False)
    assert vals.shape == (1, 3) and (w == 1).all()
    assert vals[0, 1].item() == 1.0  # exactly: the chords are orthogonal
    assert vals[0, 0].item() == 0.0 and vals[0, 2].item() == 0.0
    assert math.isclose(token_curvature(pts).item(), 1 / 3, rel_tol=1e-6)


def test_token_curvature_stride_and_mask() -> None:
    h = _line(1, 12, 4)
    h[:, 6:] = h[:, 6:] + torch.randn(1, 6, 4) * 10  # a jump between documents
    doc = torch.tensor([[0] * 6 + [1] * 4 + [-1] * 2])
    vals, w = token_curvature(h, mask=doc, reduce=False)
    assert vals.shape == (1, 10)
    assert w[0].tolist() == [1, 1, 1, 1, 0, 0, 1, 1, 0, 0]  # crossing / padding triples excluded
    vals2, w2 = token_curvature(h, stride=2, mask=doc, reduce=False)
    assert vals2.shape == (1, 8) and w2[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert token_curvature(h[:, :6], stride=2).item() < 1e-5
    assert token_curvature(h, stride=6, reduce=False)[0].shape == (1, 0)
    assert token_curvature(h, stride=6).item() == 0.0
    # bool mask: valid positions only
    valid = torch.tensor([[True] * 5 + [False] + [True] * 6])
    assert token_curvature(h, mask=valid, reduce=False)[1][0].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1]


def _bent_depth_states(n_states: int, turn_at: int, batch: int = 2, length: int = 5,
                       dim: int = 6) -> list[torch.Tensor]:
    """States moving along e1 up to state ``turn_at``, then along e2 (a right angle there)."""
    base = torch.randn(batch, length, dim)
    e1, e2 = torch.zeros(dim), torch.zeros(dim)
    e1[0], e2[1] = 1.0, 1.0
    states = []
    for i in range(n_states):
        step = e1 * min(i, turn_at) + e2 * max(i - turn_at, 0)
        states.append(base + step)
    return states


def test_depth_curvature_right_angle_at_chosen_depth() -> None:
    states = _bent_depth_states(7, turn_at=3)
    curv = depth_curvature(states)
    assert curv.shape == (5,)
    expected = torch.zeros(5)
    expected[2] = 1.0  # entry j is the bend at state j + 1
    assert torch.allclose(curv, expected, atol=1e-6)
    per_tok = depth_curvature_per_token(states)
    assert per_tok.shape == (5, 2, 5)
    assert torch.allclose(per_tok[2], torch.ones(2, 5), atol=1e-6)
    # padding is excluded from the mean
    states[4] = states[4].clone()
    states[4][:, -1] += torch.randn(2, 6) * 5  # garbage at the last (padded) token
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[:, -1] = False
    assert torch.allclose(depth_curvature(states, mask=valid), expected, atol=1e-6)
    assert not torch.allclose(depth_curvature(states), expected, atol=1e-3)


def test_estimators_under_no_grad_and_differentiable() -> None:
    h = torch.randn(2, 12, 8, requires_grad=True)
    states = [h, h * 2 + 1, h.cos(), h.sin()]
    with torch.no_grad():
        assert not token_curvature(h).requires_grad
        assert not depth_curvature(states).requires_grad
        assert not compute_stp_loss(h, n_spans=2).requires_grad
    loss = token_curvature(h) + depth_curvature(states).sum() + token_curvature(h, reduce=False)[0].mean()
    loss.backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# static shapes under torch.compile
# ---------------------------------------------------------------------------------------------


def _graph_nodes(n_spans: int, mask: torch.Tensor | None) -> int:
    torch._dynamo.reset()
    counts: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # noqa: ANN202
        counts.append(len(gm.graph.nodes))
        return gm.forward

    fn = torch.compile(compute_stp_loss, fullgraph=True, backend=backend)
    h = torch.randn(2, 32, 16, requires_grad=True)
    fn(h, n_spans, mask=mask).backward()
    assert len(counts) == 1  # one graph, no break
    return counts[0]


@pytest.mark.parametrize("masked", [False, True])
def test_compiles_fullgraph_without_recompiling(masked: bool) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(compute_stp_loss, fullgraph=True, backend=counter)
    mask = torch.randint(0, 4, (2, 32)).sort(1).values if masked else None
    h = torch.randn(2, 32, 16, requires_grad=True)
    values = []
    for _ in range(3):  # new random spans each call, same shapes
        loss = fn(h, 4, mask=mask)
        loss.backward()
        values.append(loss.item())
    fn(torch.randn(2, 32, 16, requires_grad=True), 4, mask=mask)
    assert counter.frame_count == 1
    assert len(set(values)) > 1  # sampling is live inside the graph, not baked in
    eager = compute_stp_loss(_line(2, 32, 16), 4, mask=mask)
    assert fn(_line(2, 32, 16), 4, mask=mask).item() == pytest.approx(eager.item(), abs=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("masked", [False, True])
def test_graph_size_independent_of_n_spans(masked: bool) -> None:
    mask = torch.randint(0, 4, (2, 32)).sort(1).values if masked else None
    n1 = _graph_nodes(1, mask)
    n16 = _graph_nodes(16, mask)
    torch._dynamo.reset()
    assert n1 == n16
