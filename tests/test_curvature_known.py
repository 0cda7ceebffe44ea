"""Known answers for every curvature figure (amer/analysis/decomposition.py, trajectory.py, anisotropy.py,
baselines.py, entropy.py): synthetic trajectories whose bends are known in closed form, each figure checked
within a stated tolerance.

Tolerances: exact constructions (lines, circles, helices, the identity) are checked to fp32 rounding
(1e-5 in ``1 - cos`` and the ratios, 1e-3 degrees); random constructions (walks, noise) to a few standard
errors of their sample size, stated beside each check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amer.analysis.anisotropy import Moments, pairwise_cosine_sums, whitening
from amer.analysis.baselines import gaussian_noise, gaussian_walk, shuffle_within_documents
from amer.analysis.decomposition import angle_deg, bend_parts, stp_from_normal
from amer.analysis.entropy import contextual_curvature, correlation_moments, next_token_entropy, pearson
from amer.analysis.trajectory import token_chords
from amer.stp.geometry import one_minus_cos

EXACT = 1e-5  # fp32 rounding on O(1) quantities
DEG = 1e-3  # degrees


def embed(points: torch.Tensor, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """(T, d) points -> (1, T, dim) under a random rotation into ``dim`` dimensions plus an offset (no angle
    may depend on where or how the trajectory sits)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    offset = 5.0 * torch.randn(dim, generator=g, dtype=torch.float64)
    x = torch.zeros(points.shape[0], dim, dtype=torch.float64)
    x[:, : points.shape[1]] = points.double()
    return (x @ q.T + offset).float().unsqueeze(0)


def parts_of(h: torch.Tensor, stride: int) -> dict[str, torch.Tensor]:
    d1, d2, w = token_chords(h, stride=stride)
    assert bool((w == 1).all())
    return bend_parts(d1, d2)._asdict()


# ------------------------------------------------------------------------------------------------
# exact constructions


@pytest.mark.parametrize("stride", [1, 3])
def test_straight_line_at_constant_speed_has_no_bend_and_no_acceleration(stride: int) -> None:
    t = torch.arange(40, dtype=torch.float64)
    h = embed(torch.stack([2.5 * t, torch.zeros_like(t)], 1))
    p = parts_of(h, stride)
    for name in ("one_minus_cos", "normal", "tangential", "slowing"):
        assert float(p[name].abs().max()) <= EXACT, name
    assert float(p["angle"].max()) <= DEG


@pytest.mark.parametrize("speed, slowing", [("up", 0.0), ("down", 1.0)])
def test_pure_tangential_acceleration_is_invisible_to_the_bend(speed: str, slowing: float) -> None:
    """Along a straight line with changing speed the acceleration is all tangential: no bend, normal part 0,
    tangential part | |d2| - |d1| | / |d2| exactly, and every triple speeds up (or slows down)."""
    t = torch.arange(1, 31, dtype=torch.float64)
    s = t**2 if speed == "up" else torch.sqrt(t)
    h = embed(torch.stack([s, torch.zeros_like(s)], 1))
    p = parts_of(h, 1)
    steps = s[1:] - s[:-1]
    want_tan = (steps[1:] - steps[:-1]).abs() / steps[1:]
    assert float(p["one_minus_cos"].abs().max()) <= EXACT and float(p["angle"].max()) <= 0.05
    assert float(p["normal"].max()) <= 1e-3  # sin of a rounding-sized angle
    torch.testing.assert_close(p["tangential"][0].double(), want_tan, rtol=1e-4, atol=1e-4)
    assert float(p["slowing"].mean()) == slowing


@pytest.mark.parametrize("step_deg", [5.0, 30.0, 72.0, 135.0])
@pytest.mark.parametrize("stride", [1, 2])
def test_circle_turns_by_its_step_angle(step_deg: float, stride: int) -> None:
    """A regular polygon on a circle (any radius): consecutive stride-k chords turn by k * step, so
    1 - cos = 1 - cos(k step), angle = k step (mod 360, folded into [0, 180]), normal = sin, tangential
    = 1 - cos (constant speed: in the frame of d1 the acceleration's tangential part is -|d|(1 - cos)),
    and every triple decelerates along its direction of travel."""
    for radius in (0.3, 40.0):
        phi = torch.arange(50, dtype=torch.float64) * math.radians(step_deg)
        h = embed(radius * torch.stack([phi.cos(), phi.sin()], 1), seed=int(radius))
        p = parts_of(h, stride)
        turn = math.radians(step_deg * stride) % (2 * math.pi)
        turn = min(turn, 2 * math.pi - turn)
        assert p["one_minus_cos"].mean().item() == pytest.approx(1 - math.cos(turn), abs=EXACT)
        assert p["angle"].mean().item() == pytest.approx(math.degrees(turn), abs=DEG * 10)
        assert p["normal"].mean().item() == pytest.approx(math.sin(turn), abs=1e-4)
        assert p["tangential"].mean().item() == pytest.approx(1 - math.cos(turn), abs=1e-4)
        assert p["slowing"].mean().item() == 1.0
        assert float(p["one_minus_cos"].std()) < 1e-4  # the same bend at every triple


@pytest.mark.parametrize("omega, pitch", [(0.3, 0.5), (1.0, 2.0), (2.0, 0.1)])
def test_helix_bend_has_its_closed_form(omega: float, pitch: float) -> None:
    """Helix (R cos wt, R sin wt, c t): every chord has length^2 = 4R^2 sin^2(w/2) + c^2 and consecutive chords
    have dot 4R^2 sin^2(w/2) cos w + c^2, so cos(theta) is the ratio of the two."""
    R = 1.7
    t = torch.arange(60, dtype=torch.float64)
    h = embed(torch.stack([R * (omega * t).cos(), R * (omega * t).sin(), pitch * t], 1), dim=24)
    for stride in (1, 2):
        w, c = omega * stride, pitch * stride
        s2 = 4 * R * R * math.sin(w / 2) ** 2
        cos_theta = (s2 * math.cos(w) + c * c) / (s2 + c * c)
        p = parts_of(h, stride)
        assert p["one_minus_cos"].mean().item() == pytest.approx(1 - cos_theta, abs=EXACT)
        assert p["angle"].mean().item() == pytest.approx(math.degrees(math.acos(cos_theta)), abs=0.01)
        assert p["normal"].mean().item() == pytest.approx(math.sqrt(1 - cos_theta**2), abs=1e-4)


def test_the_bend_is_exactly_its_normal_part() -> None:
    """1 - cos = 1 - sgn(d1.d2) sqrt(1 - |a_perp|^2 / |d2|^2) on random chords of every angle (fp64 rebuild,
    tolerance 1e-9: near 90 degrees sqrt(1 - normal^2) amplifies the rounding of normal, so the check runs in
    fp64); without the sign the identity fails on the obtuse bends (negative control). The fp32 figures the
    report uses agree with the fp64 ones to 1e-5."""
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    d1 = torch.randn(20000, 6, generator=g, dtype=f64)
    d2 = torch.randn(20000, 6, generator=g, dtype=f64) * torch.rand(20000, 1, generator=g, dtype=f64) * 3
    p = bend_parts(d1, d2)
    p32 = bend_parts(d1.float(), d2.float())
    for name in ("one_minus_cos", "normal", "tangential"):
        torch.testing.assert_close(getattr(p32, name).double(), getattr(p, name), rtol=1e-4, atol=1e-5)
    sign = torch.sign((d1 * d2).sum(-1)).double()
    rebuilt = stp_from_normal(p.normal, sign)
    assert float((rebuilt - p.one_minus_cos).abs().max()) < 1e-9
    # a_perp by its definition, independently of bend_parts: a = d2 - d1, u = d1/|d1|, a_perp = a - (a.u)u
    u = d1 / d1.norm(dim=-1, keepdim=True)
    a = d2 - d1
    a_perp = a - (a * u).sum(-1, keepdim=True) * u
    a_par = (a * u).sum(-1)
    torch.testing.assert_close(p.normal, a_perp.norm(dim=-1) / d2.norm(dim=-1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p.tangential, a_par.abs() / d2.norm(dim=-1), rtol=1e-9, atol=1e-9)
    assert torch.equal(p.slowing.bool(), a_par < -1e-5 * torch.maximum(d1.norm(dim=-1), d2.norm(dim=-1)))
    obtuse = sign < 0
    assert 0.3 < float(obtuse.double().mean()) < 0.7
    unsigned = stp_from_normal(p.normal, torch.ones_like(sign))
    assert float((unsigned - p.one_minus_cos)[obtuse].abs().min()) > 0  # wrong on every obtuse bend
    assert float((unsigned - p.one_minus_cos)[obtuse].abs().mean()) > 0.3


def test_angle_is_accurate_near_0_and_180_degrees() -> None:
    """Kahan's formula keeps tiny and near-reversal angles where acos of a rounded cosine does not (negative
    control: acos(1 - (1 - cos)) in fp32 misses a 0.01 degree bend by far more than the tolerance)."""
    for deg in (1e-2, 0.5, 90.0, 179.5, 179.99):
        th = math.radians(deg)
        u = torch.tensor([[1.0, 0.0, 0.0]])
        v = torch.tensor([[math.cos(th), math.sin(th), 0.0]])
        assert angle_deg(u, v).item() == pytest.approx(deg, rel=1e-4, abs=1e-5)
    v = torch.tensor([[math.cos(math.radians(1e-2)), math.sin(math.radians(1e-2)), 0.0]])
    naive = math.degrees(math.acos(1 - one_minus_cos(torch.tensor([[1.0, 0.0, 0.0]]), v).item()))
    assert abs(naive - 1e-2) > 1e-3


# ------------------------------------------------------------------------------------------------
# random constructions (tolerances: several standard errors of the sample)


def test_random_walk_and_iid_noise_levels() -> None:
    """Isotropic Gaussian in D=256 over 4 x 256 steps (about 1000 triples; the per-triple spread of cos is
    1/sqrt(D) for the walk, so its mean is within 1e-3 of 0): a walk bends by 90 degrees (1 - cos = 1,
    normal ~ 1, tangential ~ |d1|/|d2| ~ 1, nearly every triple decelerates along its direction), i.i.d.
    noise by 120 degrees (1 - cos = 1.5, normal = sin 120, tangential ~ |cos - 1| = 1.5)."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 256, 256, generator=g)
    walk = noise.cumsum(1)
    d1, d2, _ = token_chords(walk)
    p = bend_parts(d1, d2)
    assert p.one_minus_cos.mean().item() == pytest.approx(1.0, abs=0.01)
    assert p.angle.mean().item() == pytest.approx(90.0, abs=0.5)
    assert p.normal.mean().item() == pytest.approx(1.0, abs=0.01)
    assert p.tangential.mean().item() == pytest.approx(1.0, abs=0.03)
    assert p.slowing.mean().item() > 0.99
    d1, d2, _ = token_chords(noise)
    p = bend_parts(d1, d2)
    assert p.one_minus_cos.mean().item() == pytest.approx(1.5, abs=0.01)
    assert p.angle.mean().item() == pytest.approx(120.0, abs=0.7)
    assert p.normal.mean().item() == pytest.approx(math.sin(math.radians(120)), abs=0.01)
    assert p.tangential.mean().item() == pytest.approx(1.5, abs=0.03)
    assert p.slowing.mean().item() == 1.0


def test_one_dimensional_iid_noise_is_four_thirds() -> None:
    """Points i.i.d. on a line: a triple is monotone with probability 1/3 (cos = +1) and turns back otherwise
    (cos = -1): 1 - cos = 4/3 and the mean angle 120 degrees (about 4000 triples: SE 0.015 and 1.3 degrees;
    tolerances 0.05 and 4 degrees)."""
    g = torch.Generator().manual_seed(2)
    h = embed(torch.randn(4000, 1, generator=g, dtype=torch.float64), dim=8)
    p = parts_of(h, 1)
    assert p["one_minus_cos"].mean().item() == pytest.approx(4 / 3, abs=0.05)
    assert p["angle"].mean().item() == pytest.approx(120.0, abs=4.0)


def test_gaussian_baselines_have_the_covariance_and_their_levels() -> None:
    g = torch.Generator().manual_seed(3)
    scales = torch.tensor([10.0, 1.0, 0.1] + [0.01] * 13)
    sqrt_cov = torch.diag(scales)
    mean = torch.full((16,), 7.0)
    noise = gaussian_noise((8, 512, 16), mean, sqrt_cov, g)
    m = Moments()
    m.add(noise, torch.ones(8, 512))
    torch.testing.assert_close(m.mean().float(), mean, atol=0.6, rtol=0)  # SE 10/sqrt(4096) ~ 0.16 on dim 0
    torch.testing.assert_close(m.cov().diagonal().sqrt().float(), scales, rtol=0.05, atol=1e-3)
    walk = gaussian_walk((8, 512, 16), sqrt_cov, g)
    steps = walk[:, 1:] - walk[:, :-1]
    assert steps.std(dim=(0, 1))[0].item() == pytest.approx(10.0, rel=0.05)
    d1, d2, _ = token_chords(walk)
    assert bend_parts(d1, d2).one_minus_cos.mean().item() == pytest.approx(1.0, abs=0.03)  # any covariance
    d1, d2, _ = token_chords(noise)
    # dominated by one direction: close to the one-dimensional level 4/3, well below 1.5
    assert bend_parts(d1, d2).one_minus_cos.mean().item() == pytest.approx(4 / 3, abs=0.04)


def test_shuffle_keeps_documents_and_padding_in_place() -> None:
    g = torch.Generator().manual_seed(4)
    tokens = torch.arange(2 * 20).reshape(2, 20)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [-1] * 4, [-1] * 3 + [5] * 17])
    out = shuffle_within_documents(tokens, doc_ids, g)
    for b in range(2):
        for d in doc_ids[b].unique().tolist():
            sel = doc_ids[b] == d
            if d < 0:
                assert torch.equal(out[b][sel], tokens[b][sel])  # padding never moves
            else:
                assert sorted(out[b][sel].tolist()) == sorted(tokens[b][sel].tolist())
    assert not torch.equal(out, tokens)  # something moved (negative control of the check above)


# ------------------------------------------------------------------------------------------------
# anisotropy helpers


def test_pairwise_cosine_sums_match_brute_force() -> None:
    g = torch.Generator().manual_seed(5)
    for n, d in ((12, 5), (6, 20)):  # both Gram sides
        x = torch.randn(3, n, d, generator=g) + 0.5
        w = (torch.rand(3, n, generator=g) > 0.3).float()
        total, squares, pairs = pairwise_cosine_sums(x, w)
        for b in range(3):
            v = torch.nn.functional.normalize(x[b][w[b] > 0].double(), dim=-1)
            c = v @ v.T
            off = c[~torch.eye(len(v), dtype=torch.bool)]
            assert total[b].item() == pytest.approx(off.sum().item(), abs=1e-4)
            assert squares[b].item() == pytest.approx((off**2).sum().item(), abs=1e-4)
            assert pairs[b].item() == len(v) * (len(v) - 1)


def test_common_offset_gives_its_known_pairwise_cosine() -> None:
    """States m + g with g ~ N(0, s^2 I_D): cos ~ |m|^2 / (|m|^2 + D s^2) (D = 64, |m| = 8, s = 1: 0.5)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 128, 64, generator=g)
    x[..., 0] += 8.0
    total, _, pairs = pairwise_cosine_sums(x, torch.ones(4, 128))
    assert (total.sum() / pairs.sum()).item() == pytest.approx(0.5, abs=0.03)


def test_moments_and_whitening_survive_a_large_offset() -> None:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    cov = a @ a.T / 16 + 0.05 * torch.eye(16, dtype=torch.float64)
    x = (torch.randn(20000, 16, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T + 1e4).float()
    m = Moments()
    for chunk in x.split(5000):
        m.add(chunk.view(1, -1, 16), torch.ones(1, chunk.shape[0]))
    ref = torch.cov(x.double().T, correction=0)
    torch.testing.assert_close(m.cov(), ref, rtol=1e-3, atol=1e-3)
    sqrt_cov, inv_sqrt, rank = whitening(m.cov())
    assert rank == 16
    torch.testing.assert_close((sqrt_cov @ sqrt_cov).double(), m.cov(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((inv_sqrt.double() @ m.cov() @ inv_sqrt.double()), torch.eye(16, dtype=torch.float64),
                               rtol=0, atol=1e-4)
    low = torch.zeros(16, 16, dtype=torch.float64)
    low[:3, :3] = torch.eye(3, dtype=torch.float64)
    assert whitening(low)[2] == 3  # rank-deficient: only the kept directions


# ------------------------------------------------------------------------------------------------
# entropy helpers


def test_next_token_entropy_known_values() -> None:
    logits = torch.zeros(1, 3, 8)
    logits[0, 1, 0] = 1e4  # one certain token
    logits[0, 2, :2] = 50.0  # two equally likely tokens
    h = next_token_entropy(logits)
    torch.testing.assert_close(h, torch.tensor([[math.log(8), 0.0, math.log(2)]]), atol=1e-5, rtol=0)


def test_contextual_curvature_is_the_trailing_window_mean() -> None:
    """Stride 2, window 3, T = 12: position p averages the bends of the triples starting at p-4-2..p-4
    (ending at p-2..p); positions whose window holds an invalid bend are not counted."""
    T, k, W = 12, 2, 3
    values = torch.arange(1, T - 2 * k + 1, dtype=torch.float32).view(1, -1)  # triple t has value t + 1
    weights = torch.ones_like(values)
    weights[0, 5] = 0.0
    cc, ok = contextual_curvature(values, weights, stride=k, window=W, length=T)
    for p in range(T):
        starts = [p - 2 * k - j for j in range(W)]
        full = all(0 <= s < values.shape[1] and weights[0, s] > 0 for s in starts)
        assert bool(ok[0, p]) == full, p
        if full:
            assert cc[0, p].item() == pytest.approx(float(np.mean([values[0, s].item() for s in starts])))


def test_pearson_from_moments_equals_numpy() -> None:
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(2, 300))
    y = 0.4 * x + y
    w = (rng.random(300) > 0.2).astype(float)
    mom = correlation_moments(torch.tensor(x).view(1, -1), torch.tensor(y).view(1, -1), torch.tensor(w).view(1, -1))
    assert pearson(mom.numpy()[0]) == pytest.approx(np.corrcoef(x[w > 0], y[w > 0])[0, 1], abs=1e-10)
    assert np.isnan(pearson(np.array([5.0, 5.0, 1.0, 5.0, 1.0, 1.0])))  # constant sides: undefined, not 0


def test_a_zero_length_chord_has_no_direction_of_travel() -> None:
    """A state that does not move (a repeated token at the embedding): the bend keeps the STP convention (a zero
    chord counts as 1 - cos = 1, 90 degrees), the decomposition leaves the triple out (``defined`` 0) instead of
    dividing by |d2| = 0."""
    h = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])
    d1, d2, _ = token_chords(h)
    p = bend_parts(d1, d2)
    assert p.defined.tolist() == [[0.0, 0.0]]
    assert p.one_minus_cos.tolist() == [[1.0, 1.0]] and p.angle[0].tolist() == pytest.approx([90.0, 90.0])
    assert float(bend_parts(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.1]])).defined) == 1.0


def test_the_report_bend_is_the_stp_bend() -> None:
    """The report's 1 - cos (from half-angle lengths) and STP's one_minus_cos are one quantity: equal to 1e-6 on
    random chords, zero chords included (both a right angle)."""
    from amer.analysis.decomposition import bend_units

    g = torch.Generator().manual_seed(9)
    d1 = torch.randn(5000, 12, generator=g)
    d2 = torch.randn(5000, 12, generator=g)
    d2[:10] = 0.0
    d2[10:20] = 3.0 * d1[10:20]  # straight
    d2[20:30] = -0.5 * d1[20:30]  # reversal
    omc, angle = bend_units(d1, d2)
    torch.testing.assert_close(omc, one_minus_cos(d1, d2), rtol=0, atol=1e-6)
    assert angle[:10].tolist() == [90.0] * 10 and float(angle[10:20].max()) < 0.05 and float(angle[20:30].min()) > 179.9
