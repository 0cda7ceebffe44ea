"""STP wired into a real HybridLM: the collector is live, the policy gates correctly, metrics have stable
names, and the loss and estimators compile to one static graph.

The danger is that STP dies silently in the wiring (a collector under the wrong branch,
detached states, policy leaking into the kernel, shapes that recompile), so these tests go through
the model and :class:`~amer.objective.STPPolicy` rather than calling the kernel directly.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from amer import (
    AttentionConfig,
    ConfigError,
    HybridLM,
    MambaConfig,
    ModelConfig,
    MoEConfig,
    RecurrentConfig,
    STPConfig,
    Tap,
    TapSet,
    parse_pattern,
)
from amer.analysis.metrics import depth_states, training_metrics
from amer.analysis.trajectory import depth_curvature_per_token, token_curvature
from amer.objective import total_loss
from amer.stp import STPPolicy

VOCAB = 64
B, T = 2, 32


def build(pattern: str, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        pattern=pattern,
        d_model=32,
        vocab_size=VOCAB,
        max_seq_len=64,
        init_std=0.1,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2),
        mamba=MambaConfig(d_state=8, head_dim=16, expand=2, chunk_size=8),
        moe=MoEConfig(n_experts=4, top_k=2, d_ff=48),
        recurrent=RecurrentConfig(n_heads=2),
    )
    return HybridLM(cfg).train()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def has_grad(p: torch.nn.Parameter) -> bool:
    return p.grad is not None and bool(p.grad.any())


# ------------------------------------------------------------------------------------------------
# the collector cannot be dead


@pytest.mark.parametrize(
    "pattern, layers, deepest",
    [
        ("AEMEAR", "A0,M-1", 2),  # A0 = L0, M0 = L2; blocks 3..5 lie after the deepest tap
        ("AEMEAR", "E-1", 3),
        ("AEMEAR", "R-1,A0", 5),  # the last block: everything but the final norm
        ("(AEME)*2R", "A-1,M-1,E-1,R-1", 8),
    ],
)
def test_stp_term_alone_reaches_selected_and_earlier_blocks_only(pattern: str, layers: str, deepest: int) -> None:
    model = build(pattern)
    x, _ = batch()
    policy = STPPolicy(STPConfig(enabled=True, weight=0.5, layers=layers, n_spans=8), model.pattern)
    out = model(x)
    stp, _ = policy.stp_loss(out.taps, generator=gen())
    assert stp.requires_grad and 0.0 < float(stp.detach()) < 2.0
    stp.backward()

    assert has_grad(model.embed.weight)
    for i, blk in enumerate(model.blocks):
        for name, p in blk.named_parameters():
            if i <= deepest:
                assert has_grad(p), f"{layers}: block L{i} ({blk.layer.name}) param {name} got no STP gradient"
            else:
                assert not has_grad(p), f"{layers}: block L{i} ({blk.layer.name}) param {name} got an STP gradient"
    assert not has_grad(model.norm.weight), "the final norm lies after every selected tap"


def test_stp_on_final_reaches_the_final_norm() -> None:
    model = build("AEMR")
    x, _ = batch()
    policy = STPPolicy(STPConfig(enabled=True, layers="final"), model.pattern)
    policy.stp_loss(model(x).taps, generator=gen())[0].backward()
    assert has_grad(model.norm.weight)
    assert all(has_grad(p) for p in model.blocks.parameters())


def test_selection_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"stp\.layers: selector 'M-1' selects nothing: .*no mamba \(M\) blocks"):
        STPPolicy(STPConfig(enabled=True, layers="M-1"), parse_pattern("AEAR"))
    with pytest.raises(ConfigError, match=r"stp\.layers: .*the pattern has attention blocks A0\.\.A1"):
        STPPolicy(STPConfig(enabled=True, layers="A-1,A2"), parse_pattern("AEAR"))
    with pytest.raises(ConfigError, match=r"stp\.layers: .*selects tap A1 twice"):
        STPPolicy(STPConfig(enabled=True, layers="A-1,L2"), parse_pattern("AEAR"))


@pytest.mark.parametrize("layers", [None, "", "   "])
def test_enabling_stp_without_a_selection_is_an_error(layers: str | None) -> None:
    with pytest.raises(ConfigError, match=r"stp\.enabled is true but stp\.layers is empty"):
        STPConfig(enabled=True, layers=layers)
    assert STPConfig(enabled=False, layers=layers).layers == layers  # off needs no selection


def test_family_weights() -> None:
    model = build("AEMEAR")  # A0 E0 M0 E1 A1 R0
    x, _ = batch()
    out = model(x)
    plain = STPPolicy(STPConfig(enabled=True, layers="A,M"), model.pattern)
    loss, per_tap = plain.stp_loss(out.taps, generator=gen())
    assert list(per_tap) == ["A0", "M0", "A1"]
    vals = torch.stack(list(per_tap.values()))
    assert len(set(vals.tolist())) == 3  # distinct taps, so the weighting below can be told apart
    torch.testing.assert_close(loss, vals.mean())

    only_a = STPPolicy(STPConfig(enabled=True, layers="A,M", family_weights={"A": 1.0, "M": 0.0}), model.pattern)
    loss_a, per_tap_a = only_a.stp_loss(out.taps, generator=gen())
    torch.testing.assert_close(torch.stack(list(per_tap_a.values())), vals)  # same spans for the same seed
    torch.testing.assert_close(loss_a, (per_tap["A0"] + per_tap["A1"]) / 2)

    half_m = STPPolicy(STPConfig(enabled=True, layers="A,M", family_weights={"M": 0.5}), model.pattern)
    loss_h, _ = half_m.stp_loss(out.taps, generator=gen())
    torch.testing.assert_close(loss_h, (per_tap["A0"] + per_tap["A1"] + 0.5 * per_tap["M0"]) / 2.5)

    with pytest.raises(ConfigError, match=r"weight 0"):
        STPPolicy(STPConfig(enabled=True, layers="M", family_weights={"M": 0.0}), model.pattern)
    from amer.families import letters

    accepted = re.escape(str(sorted({*letters(), "embed", "final"})))  # every registered family's letter
    with pytest.raises(ConfigError, match=rf"stp\.family_weights key 'a' is not one of {accepted}"):
        STPConfig(enabled=True, layers="A", family_weights={"a": 1.0})


# ------------------------------------------------------------------------------------------------
# the gate


def test_coefficient_schedule() -> None:
    policy = STPPolicy(STPConfig(enabled=True, weight=0.1, start_step=10, ramp_steps=4, layers="final"),
                       parse_pattern("AEMR"))
    assert [policy.coefficient(s) for s in (0, 5, 9)] == [0.0, 0.0, 0.0]
    ramp = [policy.coefficient(s) for s in range(10, 14)]
    assert ramp == pytest.approx([0.025, 0.05, 0.075, 0.1])  # linear, reaching the weight at the end
    assert [policy.coefficient(s) for s in (14, 100, 10**6)] == [0.1, 0.1, 0.1]

    no_ramp = STPPolicy(STPConfig(enabled=True, weight=0.3, start_step=5, layers="final"), parse_pattern("A"))
    assert [no_ramp.coefficient(s) for s in (4, 5, 6)] == [0.0, 0.3, 0.3]
    off = STPPolicy(STPConfig(enabled=False, weight=0.3, start_step=0, layers="final"), parse_pattern("A"))
    assert off.coefficient(1000) == 0.0


def _grads(loss: torch.Tensor, model: HybridLM) -> list[torch.Tensor]:
    params = list(model.parameters())
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=False))


def test_gated_off_total_equals_ce_plus_aux_exactly_and_on_adds_the_stp_term() -> None:
    model = build("AEMEAR")
    x, y = batch()
    policy = STPPolicy(STPConfig(enabled=True, weight=0.2, start_step=10, ramp_steps=4, layers="A0,M-1,final"),
                       model.pattern)
    out = model(x)
    ref = F.cross_entropy(out.logits.flatten(0, 1), y.flatten()) + sum(out.aux_losses.values())

    before = total_loss(policy, out, y, step=9, generator=gen())
    assert before.coeff == 0.0
    assert torch.equal(before.total, ref)
    for g_total, g_ref in zip(_grads(before.total, model), _grads(ref, model)):
        assert torch.equal(g_total, g_ref)
    assert float(before.stp.detach()) > 0 and set(before.per_tap) == {"A0", "M0", "final"}  # still measured for logging
    assert policy.live_grad_norm(before.coeff, before.stp, out.taps) == 0.0

    after = total_loss(policy, out, y, step=11, generator=gen())
    assert after.coeff == pytest.approx(0.1)
    assert torch.equal(after.ce, before.ce) and torch.equal(after.aux, before.aux)
    assert torch.equal(after.total, after.ce + after.aux + after.coeff * after.stp)
    assert float((after.total - ref).detach()) > 1e-3
    stp_alone, _ = policy.stp_loss(out.taps, generator=gen())
    assert torch.equal(after.stp, stp_alone)  # the total carries the same term the policy reports

    live = policy.live_grad_norm(after.coeff, after.stp, out.taps)
    hiddens = [t.hidden for t in out.taps.select("A0,M-1,final")]
    manual = torch.autograd.grad(after.coeff * after.stp, hiddens, retain_graph=True)
    expected = math.sqrt(sum(float(g.square().sum()) for g in manual))
    assert live > 0.0
    assert live == pytest.approx(expected, rel=1e-5)
    # the STP gradient is really part of the total's gradient after the gate
    assert any(not torch.equal(a, b) for a, b in zip(_grads(after.total, model), _grads(ref, model)))


def test_disabled_policy_is_plain_objective() -> None:
    model = build("AEMR")
    x, y = batch()
    policy = STPPolicy(STPConfig(enabled=False), model.pattern)
    out = model(x)
    bd = total_loss(policy, out, y, step=10**6)
    assert bd.coeff == 0.0 and bd.per_tap == {} and float(bd.stp) == 0.0
    assert torch.equal(bd.total, bd.ce + bd.aux)
    assert policy.live_grad_norm(bd.coeff, bd.stp, out.taps) == 0.0


# ------------------------------------------------------------------------------------------------
# training metrics


def test_training_metrics_names_and_values() -> None:
    model = build("AEMR")
    x, y = batch()
    policy = STPPolicy(STPConfig(enabled=True, layers="A-1,M-1,E-1,R-1,final"), model.pattern)
    out = model(x)
    bd = total_loss(policy, out, y, step=0, generator=gen())
    m = training_metrics(out.taps, bd.per_tap)
    expected = {f"stp/{n}" for n in ("A0", "E0", "M0", "R0", "final", "A", "E", "M", "R")}
    expected |= {f"curv/tok/{f}" for f in ("embed", "A", "E", "M", "R", "final")}
    expected |= {f"curv/depth/{b}" for b in ("embed->A", "A->E", "E->M", "M->R", "R->final")}
    assert set(m) == expected
    assert all(type(v) is float and math.isfinite(v) for v in m.values())
    assert all(0.0 <= v <= 2.0 for v in m.values())
    assert m["stp/A0"] == pytest.approx(float(bd.per_tap["A0"].detach()))
    assert m["curv/tok/M"] == pytest.approx(float(token_curvature(out.taps[3].hidden.detach())), rel=1e-6)

    # A->E: per token, the bend between the update written by A0 and the one written by E0
    emb, a0, e0 = (t.hidden.detach() for t in out.taps[:3])
    manual = 1 - F.cosine_similarity(a0 - emb, e0 - a0, dim=-1)
    assert m["curv/depth/A->E"] == pytest.approx(float(manual.mean()), rel=1e-5, abs=1e-6)


def test_training_metrics_average_per_family_and_boundary_type() -> None:
    model = build("(AEME)*2R")  # A0 E0 M0 E1 A1 E2 M1 E3 R0
    x, y = batch()
    policy = STPPolicy(STPConfig(enabled=True, layers="A,E-1"), model.pattern)
    out = model(x)
    bd = total_loss(policy, out, y, step=0, generator=gen())
    m = training_metrics(out.taps, bd.per_tap)
    assert m["stp/A"] == pytest.approx((m["stp/A0"] + m["stp/A1"]) / 2)
    assert m["stp/E"] == m["stp/E3"]
    depth = {k.removeprefix("curv/depth/") for k in m if k.startswith("curv/depth/")}
    assert depth == {"embed->A", "A->E", "E->M", "M->E", "E->A", "E->R", "R->final"}
    tok_a = [float(token_curvature(t.hidden.detach())) for t in out.taps.select("A")]
    assert m["curv/tok/A"] == pytest.approx(sum(tok_a) / 2, rel=1e-6)
    # document ids (with padding) are accepted and keep every figure finite
    docs = torch.tensor([[0] * 10 + [1] * 20 + [-1] * 2, [3] * 32])
    masked = training_metrics(out.taps, bd.per_tap, doc_ids=docs)
    assert set(masked) == set(m) and all(math.isfinite(v) for v in masked.values())


def _straight_taps(pattern: str, b: int = 2, t: int = 12, d: int = 16, seed: int = 0) -> TapSet:
    """Taps with h[k, b, t] = (k + 1) * (w_b + t * v_b): straight along tokens and along depth from 0."""
    pat = parse_pattern(pattern)
    g = torch.Generator().manual_seed(seed)
    w, v = torch.randn(b, 1, d, generator=g), torch.randn(b, 1, d, generator=g)
    line = w + torch.arange(t, dtype=torch.float32)[None, :, None] * v  # (b, t, d)
    L = len(pat.layers)
    taps = [Tap(-1, None, 0, line, "embed")]
    taps += [Tap(s.index, s.family, s.family_index, (k + 2) * line) for k, s in enumerate(pat.layers)]
    taps.append(Tap(L, None, 0, (L + 2) * line, "final"))
    return TapSet(taps, pat)


def test_training_metrics_on_straight_trajectories_are_zero() -> None:
    taps = _straight_taps("AEMR")
    m = training_metrics(taps)
    families = ("embed", "A", "E", "M", "R", "final")
    assert {k for k in m if k.startswith("curv/tok/")} == {f"curv/tok/{f}" for f in families}
    for k, v in m.items():
        assert v == pytest.approx(0.0, abs=1e-5), k
    # and a bent one is not: reverse the direction of travel halfway along the sequence in M0
    bent = list(taps)
    h = bent[3].hidden.clone()
    h[:, 6:] = 2 * h[:, 5:6] - h[:, 6:]
    bent[3] = bent[3]._replace(hidden=h)
    m2 = training_metrics(TapSet(bent, taps.pattern))
    assert m2["curv/tok/M"] > 0.1 and m2["curv/tok/A"] == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# static shapes under torch.compile


PAT = parse_pattern("AEMR")


def _tapset(hs: tuple[torch.Tensor, ...]) -> TapSet:
    """A full TapSet for PAT from 6 tensors (embed, 4 blocks, final), built inside the traced function."""
    taps = [Tap(-1, None, 0, hs[0], "embed")]
    taps += [Tap(s.index, s.family, s.family_index, h) for s, h in zip(PAT.layers, hs[1:-1])]
    taps.append(Tap(len(PAT.layers), None, 0, hs[-1], "final"))
    return TapSet(taps, PAT)


def _hiddens(seed: int, t: int = 24, d: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, t, d, generator=g).requires_grad_() for _ in range(6))


def _static_graph_problems(gm: torch.fx.GraphModule) -> list[str]:
    """Nodes that sync with the host or have data-dependent shapes.

    torch 2.13 traces ``float(t)`` / ``.item()`` and boolean indexing under ``fullgraph=True`` as
    unbacked symbols instead of breaking the graph, so "no graph break" alone would not catch a host
    sync; a symbolic scalar or a symbolic dimension anywhere in the graph does.
    """
    bad = []
    for node in gm.graph.nodes:
        ev = node.meta.get("example_value")
        for v in ev if isinstance(ev, (tuple, list)) else [ev]:
            if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                bad.append(f"{node.op} {node.target}: host scalar")
            elif isinstance(v, torch.Tensor) and not all(isinstance(s, int) for s in v.shape):
                bad.append(f"{node.op} {node.target}: data-dependent shape {tuple(v.shape)}")
    return bad


def _compiled_stp(n_spans: int):
    torch._dynamo.reset()
    policy = STPPolicy(STPConfig(enabled=True, layers="A-1,M-1,E-1,R-1,final", n_spans=n_spans), PAT)
    counter = CompileCounterWithBackend("aot_eager")

    def loss_fn(hs: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
        # generator=None: dynamo cannot trace a torch.Generator; the spans are drawn inside the graph
        return policy.stp_loss(_tapset(hs), doc_ids=mask)[0]

    return torch.compile(loss_fn, fullgraph=True, dynamic=False, backend=counter), counter


@pytest.mark.parametrize("with_mask", [False, True], ids=["plain", "doc_ids"])
def test_stp_policy_loss_compiles_once_without_graph_breaks(with_mask: bool) -> None:
    fn, counter = _compiled_stp(4)
    docs = torch.tensor([[0] * 8 + [1] * 14 + [-1] * 2, [5] * 24]) if with_mask else None
    hs = _hiddens(0)
    first = fn(hs, docs)
    again = fn(hs, docs)  # same inputs, fresh spans drawn inside the graph
    other = fn(_hiddens(1), None if docs is None else docs.roll(3, 1))  # new values, same shapes
    assert counter.frame_count == 1, "recompiled for new spans/values at the same shapes"
    assert _static_graph_problems(counter.graphs[0]) == []
    assert not torch.equal(first, again), "spans were baked into the graph as constants"
    assert all(0.0 <= float(v.detach()) <= 2.0 for v in (first, again, other))
    first.backward()
    assert all(h.grad is not None and bool(h.grad.any()) for h in (hs[1], hs[2], hs[3], hs[4], hs[5]))
    assert hs[0].grad is None  # the embedding tap is not selected


def test_stp_graph_size_does_not_depend_on_n_spans() -> None:
    sizes = {}
    for n in (1, 16):
        fn, counter = _compiled_stp(n)
        fn(_hiddens(0), None)
        assert counter.frame_count == 1
        sizes[n] = (len(counter.graphs[0].graph.nodes), counter.op_count)
    assert sizes[1] == sizes[16], f"graph grows with n_spans (unrolled span loop?): {sizes}"


def test_metric_estimators_compile_once_without_graph_breaks() -> None:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def estimators(hs: tuple[torch.Tensor, ...], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # exactly the tensor work training_metrics does (it then converts to floats, outside any graph)
        taps = list(_tapset(hs))
        tok = torch.stack([token_curvature(t.hidden, mask=mask) for t in taps])
        states, _ = depth_states(taps)
        depth = depth_curvature_per_token(states)  # (n_boundaries, B, T)
        valid = (mask >= 0).float()
        return tok, (depth * valid).sum(dim=(1, 2)) / valid.sum().clamp_min(1.0)

    compiled = torch.compile(estimators, fullgraph=True, dynamic=False, backend=counter)
    docs = torch.tensor([[0] * 8 + [1] * 14 + [-1] * 2, [5] * 24])
    for seed in (0, 1):
        hs = tuple(h.detach() for h in _hiddens(seed))
        tok, depth = compiled(hs, docs.roll(seed, 1))
        tok_ref, depth_ref = estimators(hs, docs.roll(seed, 1))
        torch.testing.assert_close(tok, tok_ref)
        torch.testing.assert_close(depth, depth_ref)
        assert tok.shape == (6,) and depth.shape == (5,)
    assert counter.frame_count == 1
    assert _static_graph_problems(counter.graphs[0]) == []

    # the compiled estimators agree with the figures training_metrics logs
    hs = tuple(h.detach() for h in _hiddens(0))
    m = training_metrics(_tapset(hs), doc_ids=docs)
    tok, depth = compiled(hs, docs)
    assert m["curv/tok/M"] == pytest.approx(float(tok[3]), rel=1e-5)
    assert m["curv/depth/E->M"] == pytest.approx(float(depth[2]), rel=1e-5)
    assert counter.frame_count == 1
