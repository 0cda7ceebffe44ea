"""Statistics the reports rest on, in one place and without scipy: the vectorised bootstrap and its
percentile intervals (curvature report), the paired t-test through the regularized incomplete beta,
Spearman's rank correlation, and the effective rank of a set of hidden states (experiments)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CI_LEVEL", "resample_weights", "ratio", "percentile_ci", "betainc", "t_two_sided_p", "paired_ttest",
           "spearman", "mean_std", "effective_rank"]

CI_LEVEL = 0.95


# ----------------------------------------------------------------------------------------------
# bootstrap


def resample_weights(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n) multiplicities of n sequences drawn with replacement, seeded: one matrix
    product then gives every column's replicate (the vectorised bootstrap)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_bootstrap, n))
    flat = (np.arange(n_bootstrap)[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=n_bootstrap * n).reshape(n_bootstrap, n).astype(np.float64)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0 (a statistic with no observations)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def percentile_ci(boot: np.ndarray, level: float = CI_LEVEL) -> np.ndarray:
    """(2, K) lower/upper percentile bounds over replicates; NaN where no replicate is defined."""
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = np.full((2, boot.shape[1]), np.nan)
    ok = ~np.isnan(boot).all(axis=0)
    if ok.any():
        out[:, ok] = np.nanpercentile(boot[:, ok], [lo, hi], axis=0)
    return out


# ----------------------------------------------------------------------------------------------
# statistics (no scipy: the regularized incomplete beta by Lentz's continued fraction)


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` (Numerical Recipes 6.4), accurate to ~1e-13."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry otherwise
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t: ``P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2)``."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return min(1.0, betainc(df / 2.0, 0.5, df / (df + t * t)))


def paired_ttest(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """``(t, two-sided p)`` of the paired t-test of ``x - y``; ``(None, None)`` with fewer than 2 pairs.

    Identical pairs give ``(0, 1)``; a constant non-zero difference gives ``(+-inf, 0)``.
    """
    if len(x) != len(y):
        raise ValueError(f"paired samples must have equal length, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return None, None
    d = [a - b for a, b in zip(x, y)]
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    if sd <= 1e-15 * max(1.0, abs(mean)):
        return (0.0, 1.0) if abs(mean) <= 1e-15 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return t, t_two_sided_p(t, n - 1)


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties averaged); None when either side is constant or n < 2."""
    if len(x) != len(y) or len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def mean_std(v: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def effective_rank(h: Tensor) -> float:
    """``exp(entropy(s / sum(s)))`` of the singular values of ``h`` (N, D) (Roy & Vetterli 2007; RankMe).

    1 for a rank-one (collapsed) set of states, D for singular values all equal. Uncentred, as in RankMe.
    """
    s = torch.linalg.svdvals(h.double())
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
