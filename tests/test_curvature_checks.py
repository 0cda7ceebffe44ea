"""The checks around the curvature figures, end to end through :func:`amer.analysis.curvature.evaluate`:
a planted correlation with entropy recovered, the shuffled baseline recovering noise-level curvature,
the anisotropy checks seeing through a shared drift and a dominant direction, the schema, and the
comparison of every new statistic.

Fake models stand in for HybridLM: their taps are built from the tokens (so the second pass and the
shuffled baseline see what they should) and their logits are chosen to plant an entropy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from amer.analysis.compare import compare
from amer.analysis.curvature import FORMAT, Options
from amer.analysis.curvature import evaluate as _evaluate
from amer.model import ModelOutput
from amer.pattern import parse_pattern
from amer.report import write_json
from amer.tap import Tap, TapSet

PATTERN = "AM"
N_TAPS = len(PATTERN) + 2


class FnModel(nn.Module):
    """``fn(tokens) -> (hidden (B, T, D), logits (B, T, V))``; every tap is ``hidden`` (scaled per tap, which
    changes no angle)."""

    def __init__(self, fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.fn = fn
        self.pattern = parse_pattern(PATTERN)
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor, *, taps: bool | str = True, doc_ids=None) -> ModelOutput:
        hidden, logits = self.fn(tokens)
        tap_list = [Tap(-1, None, 0, hidden, "embed")]
        for spec in self.pattern.layers:
            tap_list.append(Tap(spec.index, spec.family, spec.family_index, (2.0 + spec.index) * hidden))
        tap_list.append(Tap(len(self.pattern.layers), None, 0, 3.0 * hidden, "final"))
        return ModelOutput(logits, TapSet(tap_list, self.pattern), {}, {})


def evaluate(model: nn.Module, batches: list[dict], **kw) -> dict:
    kw.setdefault("n_bootstrap", 200)
    return _evaluate(model, batches, progress=False, **kw)


def rows(n_rows: int, length: int, per_batch: int = 8) -> list[dict]:
    """Batches whose every token of row r is r: a fake model reads its row's seed from any position (so a
    shuffled row is still the same row)."""
    ids = torch.arange(n_rows).view(-1, 1).expand(n_rows, length)
    return [{"tokens": ids[i:i + per_batch].clone(), "doc_ids": torch.zeros_like(ids[i:i + per_batch])}
            for i in range(0, n_rows, per_batch)]


# ------------------------------------------------------------------------------------------------
# curvature against entropy


def binary_logits(entropy: torch.Tensor) -> torch.Tensor:
    """(…, 2) logits whose softmax has exactly the given entropy (nats, in (0, log 2)), by bisection on q."""
    lo, hi = torch.full_like(entropy, 1e-9, dtype=torch.float64), torch.full_like(entropy, 0.5, dtype=torch.float64)
    target = entropy.double()
    for _ in range(80):
        q = (lo + hi) / 2
        h = -(q * q.log() + (1 - q) * (1 - q).log())
        lo, hi = torch.where(h < target, q, lo), torch.where(h < target, hi, q)
    q = (lo + hi) / 2
    return torch.stack([torch.zeros_like(q), (q / (1 - q)).log()], -1).float()


def planted(rho: float, length: int = 64, dim: int = 8) -> tuple[Callable, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """A 2-D path (unit steps, turning by tau_t ~ U(10, 170) degrees, rotated into ``dim`` dimensions) and a
    planted entropy y_p = 0.35 + 0.07 (rho z(tau) + sqrt(1 - rho^2) eps_p), where tau is the turn of the bend
    ending at p: corr(bend angle, entropy) = rho in the population."""
    truth: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)))

    def fn(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hs, ls = [], []
        for r in tokens[:, 0].tolist():
            g = torch.Generator().manual_seed(1000 + r)
            tau = math.radians(10) + torch.rand(length, generator=g, dtype=torch.float64) * math.radians(160)
            eps = torch.randn(length, generator=g, dtype=torch.float64)
            phi = tau.cumsum(0)
            steps = torch.stack([phi.cos(), phi.sin()], 1)  # chord t (t -> t+1) has direction phi_t
            path = torch.cat([torch.zeros(1, 2, dtype=torch.float64), steps.cumsum(0)])[:length]
            x = torch.zeros(length, dim, dtype=torch.float64)
            x[:, :2] = path
            hs.append(x.float() @ rot.T)
            # the bend ending at p is between chords p-2 and p-1: the turn tau_{p-1}
            bend = torch.full((length,), float("nan"), dtype=torch.float64)
            bend[2:] = tau[1:length - 1]
            z = (bend - math.radians(90)) / (math.radians(160) / math.sqrt(12))
            y = (0.35 + 0.07 * (rho * z + math.sqrt(1 - rho * rho) * eps)).clamp(0.01, 0.68)
            y = torch.where(bend.isnan(), torch.full_like(y, 0.35), y)
            truth[r] = (np.degrees(bend.numpy()), y.numpy())
            ls.append(binary_logits(y))
        return torch.stack(hs), torch.stack(ls)

    return fn, truth


@pytest.mark.parametrize("rho", [0.3, 0.0])
def test_a_planted_correlation_with_entropy_is_recovered(rho: float) -> None:
    """Window 1: the engine's r (angle unit) equals numpy's r of the planted pairs to 1e-6, and the planted
    population value lies in its 95% CI and within 0.07 (about 4 standard errors at N ~ 3000 positions); with
    rho = 0 (the negative control) the CI covers 0."""
    fn, truth = planted(rho)
    res = evaluate(FnModel(fn), rows(48, 64), options=Options(baselines=False, anisotropy=False, entropy_window=1))
    x = np.concatenate([truth[r][0][2:] for r in sorted(truth)])
    y = np.concatenate([truth[r][1][2:] for r in sorted(truth)])
    want = np.corrcoef(x, y)[0, 1]
    for layer in res["layers"]:
        got = layer["entropy"]["1"]["angle"]
        assert got["r"] == pytest.approx(want, abs=1e-5)
        assert got["n"] == len(x)
        lo, hi = got["ci"]
        assert lo <= rho <= hi and abs(got["r"] - rho) < 0.07
        omc = layer["entropy"]["1"]["one_minus_cos"]
        assert omc["r"] == pytest.approx(np.corrcoef(1 - np.cos(np.radians(x)), y)[0, 1], abs=1e-5)
    fam = res["families"]["M"]["entropy"]["1"]["angle"]
    assert fam["r"] == pytest.approx(want, abs=1e-5)  # one member: the family pools the same pairs
    assert res["next_token_entropy"]["mean"] == pytest.approx(float(np.mean([truth[r][1] for r in truth])),
                                                              abs=1e-4)
    if rho == 0.0:
        lo, hi = res["layers"][1]["entropy"]["1"]["angle"]["ci"]
        assert lo < 0 < hi


def test_the_entropy_window_averages_the_trailing_bends() -> None:
    fn, truth = planted(0.3)
    W = 4
    res = evaluate(FnModel(fn), rows(16, 64), options=Options(baselines=False, anisotropy=False, entropy_window=W))
    xs, ys = [], []
    for r in sorted(truth):
        bend, y = truth[r]
        for p in range(2 + W - 1, 64):
            xs.append(np.mean(bend[p - W + 1:p + 1]))
            ys.append(y[p])
    got = res["layers"][0]["entropy"]["1"]["angle"]
    assert got["n"] == len(xs)
    assert got["r"] == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-5)


# ------------------------------------------------------------------------------------------------
# baselines


def line_model(dim: int = 8) -> FnModel:
    """Context-free: token i sits at i * v on a line (no memory of what came before)."""
    v = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(3)), dim=0)

    def fn(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens.float().unsqueeze(-1) * v, torch.zeros(*tokens.shape, 4)

    return FnModel(fn)


def test_shuffled_text_on_a_context_free_model_gives_the_iid_noise_level() -> None:
    """Tokens 0, 1, 2, ... read in order walk a straight line (0, 0 degrees). Shuffled, the same points come in
    random order: i.i.d. draws on a line, whose level is 4/3 (cos = +1 on the third of triples that are
    monotone, -1 otherwise; 120 degrees), and the noise baseline (Gaussian with the states' rank-1
    covariance) gives the same level; the walk baseline gives 1 (90 degrees). About 2000 triples: SE 0.02;
    tolerances 0.07 and 5 degrees."""
    T = 66
    batches = [{"tokens": torch.arange(T).repeat(8, 1) + 100 * torch.arange(8).view(-1, 1),
                "doc_ids": torch.zeros(8, T, dtype=torch.long)} for _ in range(4)]
    res = evaluate(line_model(), batches, options=Options(entropy=False, anisotropy=False))
    for layer in res["layers"]:
        assert layer["token"]["1"]["mean"] == pytest.approx(0.0, abs=1e-5)
        b = layer["baselines"]["1"]
        assert b["shuffled"]["mean"] == pytest.approx(4 / 3, abs=0.07)
        assert b["shuffled_deg"]["mean"] == pytest.approx(120.0, abs=5.0)
        assert b["noise"]["mean"] == pytest.approx(4 / 3, abs=0.07)
        assert b["noise"]["mean"] == pytest.approx(b["shuffled"]["mean"], abs=0.1)
        assert b["walk"]["mean"] == pytest.approx(1.0, abs=0.07)
        assert b["walk_deg"]["mean"] == pytest.approx(90.0, abs=5.0)


def test_isotropic_states_give_the_textbook_levels() -> None:
    """A context-free model with an isotropic Gaussian table in D = 128: shuffled and noise at 1.5 (120
    degrees), walk at 1.0 (90 degrees), within 0.03 (about 2000 triples, SE ~ 0.01)."""
    table = torch.randn(4096, 128, generator=torch.Generator().manual_seed(5))

    def fn(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return table[tokens % 4096], torch.zeros(*tokens.shape, 4)

    g = torch.Generator().manual_seed(6)
    batches = [{"tokens": torch.randint(0, 4096, (8, 66), generator=g)} for _ in range(4)]
    res = evaluate(FnModel(fn), batches, options=Options(entropy=False, anisotropy=False))
    b = res["layers"][1]["baselines"]["1"]
    for name, want, want_deg in (("shuffled", 1.5, 120.0), ("noise", 1.5, 120.0), ("walk", 1.0, 90.0)):
        assert b[name]["mean"] == pytest.approx(want, abs=0.03), name
        assert b[f"{name}_deg"]["mean"] == pytest.approx(want_deg, abs=1.5), name


# ------------------------------------------------------------------------------------------------
# anisotropy


def test_a_shared_drift_makes_a_straight_figure_that_centring_removes() -> None:
    """h_t = t m + g_t with a large drift m: every chord is m plus a little noise, so the raw trajectory looks
    straight (token curvature < 0.05, chords' pairwise cosine > 0.9); without the mean chord it is i.i.d.
    noise (1.5 within 0.04), whitened too."""
    m = torch.zeros(32)
    m[0] = 100.0

    def fn(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = tokens.shape
        g = torch.Generator().manual_seed(int(tokens[0, 0]))
        t = torch.arange(T, dtype=torch.float32).view(1, T, 1)
        return t * m + torch.randn(B, T, 32, generator=g), torch.zeros(B, T, 4)

    res = evaluate(FnModel(fn), rows(32, 64), options=Options(entropy=False, baselines=False))
    layer = res["layers"][1]
    an = layer["anisotropy"]
    assert layer["token"]["1"]["mean"] < 0.05
    assert an["cos_chords"]["1"]["mean"] > 0.9
    assert an["centred"]["1"]["mean"] == pytest.approx(1.5, abs=0.04)
    assert an["centred_deg"]["1"]["mean"] == pytest.approx(120.0, abs=2.0)
    assert an["whitened"]["1"]["mean"] == pytest.approx(1.5, abs=0.04)
    assert an["whitening_rank"] == 32
    assert an["cos_states"]["mean"] > 0.5  # states share the drift direction


def test_a_dominant_direction_shows_under_whitening() -> None:
    """i.i.d. noise whose variance sits in one direction (100 x the rest): raw curvature close to the
    one-dimensional 4/3, whitened at the isotropic 1.5 (within 0.04); centring changes nothing (no drift)."""
    scale = torch.ones(32)
    scale[0] = 100.0

    def fn(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = tokens.shape
        g = torch.Generator().manual_seed(int(tokens[0, 0]))
        return torch.randn(B, T, 32, generator=g) * scale, torch.zeros(B, T, 4)

    res = evaluate(FnModel(fn), rows(32, 64), options=Options(entropy=False, baselines=False))
    layer = res["layers"][2]
    an = layer["anisotropy"]
    assert layer["token"]["1"]["mean"] == pytest.approx(4 / 3, abs=0.06)
    assert an["whitened"]["1"]["mean"] == pytest.approx(1.5, abs=0.04)
    assert an["centred"]["1"]["mean"] == pytest.approx(layer["token"]["1"]["mean"], abs=0.02)


# ------------------------------------------------------------------------------------------------
# schema and comparison


def small_result(seed: int, **kw) -> dict:
    fn, _ = planted(0.3 if seed == 0 else 0.0, length=40)
    return evaluate(FnModel(fn), rows(16, 40), strides=(1, 2), seed=0, **kw)


def test_schema_is_json_and_carries_every_section(tmp_path) -> None:
    res = small_result(0)
    assert res["format"] == FORMAT == "amer-curvature/2"
    write_json(tmp_path / "r.json", res)  # refuses NaN: every undefined figure is null
    back = json.loads((tmp_path / "r.json").read_text())
    layer = back["layers"][1]
    assert set(layer) >= {"token", "token_deg", "stp", "decomposition", "baselines", "anisotropy", "entropy"}
    assert set(layer["decomposition"]["2"]) == {"normal", "tangential", "slowing"}
    assert set(layer["baselines"]["1"]) == {"shuffled", "shuffled_deg", "noise", "noise_deg", "walk", "walk_deg"}
    assert set(layer["entropy"]["2"]) == {"one_minus_cos", "angle"}
    assert set(back["boundaries"][0]) >= {"depth", "depth_deg"}
    fam = back["families"]["A"]
    assert set(fam) >= {"token_deg", "depth_in_deg", "depth_out_deg", "decomposition", "baselines", "anisotropy",
                        "entropy"}
    assert back["options"] == {"baselines": True, "anisotropy": True, "entropy": True, "entropy_window": 8}
    lean = small_result(0, options=Options(baselines=False, anisotropy=False, entropy=False))
    assert not {"baselines", "anisotropy", "entropy"} & set(lean["layers"][1])
    assert lean["next_token_entropy"] is None and "moments" not in lean["per_sequence"]


def test_compare_covers_every_new_statistic() -> None:
    a, b = small_result(0), small_result(1)
    same = compare(a, a)
    diffs = [same["layers"][1]["entropy"]["1"]["angle"], same["layers"][1]["baselines"]["2"]["shuffled_deg"],
             same["layers"][1]["anisotropy"]["whitened"]["1"], same["families"]["M"]["decomposition"]["1"]["normal"]]
    for d in diffs:
        assert d["diff"] == 0.0 and d["ci"] == [0.0, 0.0] and not d["excludes_zero"]
    comp = compare(a, b)
    assert comp["paired"]  # one data set (the tokens name the rows; the fake models differ in what they plant)
    d = comp["layers"][1]["entropy"]["1"]["angle"]
    assert d["diff"] == pytest.approx(d["a"] - d["b"], abs=1e-9) and d["excludes_zero"]
    assert comp["layers"][1]["anisotropy"]["whitening_rank"] == a["layers"][1]["anisotropy"]["whitening_rank"]
    lean = small_result(0, options=Options(baselines=False))
    with pytest.raises(Exception, match="different statistics"):
        compare(a, lean)
    old = {**a, "format": "amer-curvature/1"}
    with pytest.raises(Exception, match="measure it again"):
        compare(old, a)
