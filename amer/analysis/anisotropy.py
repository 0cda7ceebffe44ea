"""Anisotropy checks for angle-based metrics: are a few dominant directions what a curvature figure measures?

Hidden states of language models are strongly anisotropic (Ethayarajh, EMNLP 2019, "How contextual are
contextualized word representations?"; raw states of Mamba models have mean pairwise cosines near 1), and an
angle between two vectors that share a large common component is small whatever their other components do.
Three checks, each estimated on the evaluation data, per tap:

- **mean pairwise cosine** of the states and of the chords ``h[t+k] - h[t]``, over the pairs of one sequence
  (the trajectory whose angles are measured): near 1, every vector points the same way;
- **centring**: token curvature after subtracting the tap's mean chord (at that stride) from every chord,
  i.e. of the trajectory with its mean drift removed. (Centring the *states* changes no chord, so it leaves
  token curvature exactly as it is; the common component an angle can hide behind is the chords' mean.)
- **whitening**: token curvature of the centred chords mapped by ``Sigma^{-1/2}``, where ``Sigma`` is the
  covariance of the tap's states (ZCA whitening, Bell & Sejnowski 1997; the whitened trajectory is the
  state trajectory in coordinates where every direction has unit variance). Directions whose variance is
  below ``RANK_FLOOR`` (1e-10) times the largest are dropped (a pseudo-inverse), so a rank-deficient
  estimate (fewer states than dimensions) stays finite; the kept rank is reported.

A figure that keeps its value under centring and whitening is not produced by a few directions.
Pure tensor math; covariances accumulate in fp64 around a reference point (the first batch's mean) so a
large common offset does not cancel catastrophically (cost: one fp64 ``D x D`` product per tap and batch).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RANK_FLOOR", "Moments", "whitening", "pairwise_cosine_sums"]

RANK_FLOOR = 1e-10


class Moments:
    """Running mean and covariance of weighted vectors ``(..., D)`` (fp64 sums around a reference point)."""

    def __init__(self) -> None:
        self.ref: Tensor | None = None
        self.count = 0.0
        self.total: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, x: Tensor, weight: Tensor) -> None:
        """Add the rows of ``x`` ``(..., D)`` with weights ``(...)`` (0 drops a row)."""
        x = x.reshape(-1, x.shape[-1]).float()
        w = weight.reshape(-1).float()
        n = float(w.sum())
        if n == 0:
            return
        if self.ref is None:
            self.ref = ((x * w[:, None]).sum(0) / n).detach()
            d = x.shape[-1]
            self.total = torch.zeros(d, dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        y = (x - self.ref).double()
        self.count += n
        self.total += (y * w[:, None]).sum(0)
        # fp64 products: a covariance whose directions span ten orders of magnitude (a drift beside unit noise)
        # keeps its small directions above the rounding of the large ones
        self.outer += (y * w[:, None].double()).T @ y

    def mean(self) -> Tensor:
        if self.ref is None or self.count == 0:
            raise ValueError("no vectors were added")
        return self.ref.double() + self.total / self.count

    def cov(self) -> Tensor:
        """The (biased) covariance ``E[(x - mean)(x - mean)^T]``, fp64 ``(D, D)``."""
        if self.ref is None or self.count == 0:
            raise ValueError("no vectors were added")
        m = self.total / self.count
        return self.outer / self.count - torch.outer(m, m)


def whitening(cov: Tensor, floor: float = RANK_FLOOR) -> tuple[Tensor, Tensor, int]:
    """``(Sigma^{1/2}, Sigma^{-1/2}, rank)`` of a covariance, both fp32 ``(D, D)`` and symmetric (ZCA).

    Eigen-directions with variance below ``floor`` times the largest are dropped from both maps (the
    inverse is a pseudo-inverse on the kept subspace); ``rank`` counts the kept directions.
    """
    cov = 0.5 * (cov.double() + cov.double().T)
    evals, evecs = torch.linalg.eigh(cov)
    top = float(evals.max().clamp_min(0.0))
    keep = evals > floor * top if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
    root = torch.where(keep, evals.clamp_min(0.0).sqrt(), torch.zeros_like(evals))
    inv = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(evals))
    sqrt_cov = (evecs * root) @ evecs.T
    inv_sqrt = (evecs * inv) @ evecs.T
    return sqrt_cov.float(), inv_sqrt.float(), int(keep.sum())


def pairwise_cosine_sums(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``x`` ``(B, N, D)`` with 0/1 weights ``(B, N)``: the sum of ``cos(x_i, x_j)`` over ordered
    pairs ``i != j`` of kept vectors, the sum of its squares, and the number of pairs ``n (n - 1)``; three
    fp64 ``(B,)`` tensors. Zero vectors count as cosine 0 with everything.

    The sum is ``|sum_i u_i|^2 - n`` for unit vectors ``u_i``; the sum of squares is
    ``||U^T U||_F^2 - n`` (the Gram matrix of the smaller side).
    """
    x = x.float()
    w = weight.float()
    norm = x.norm(dim=-1, keepdim=True)
    u = torch.where(norm > 0, x / norm.clamp_min(1e-30), torch.zeros_like(x)) * w[..., None]
    n_unit = (u * u).sum((-1, -2)).double()  # kept non-zero vectors: their own pairs are the diagonal
    s = u.sum(1).double()
    total = (s * s).sum(-1) - n_unit
    gram = u.transpose(1, 2) @ u if x.shape[-1] <= x.shape[1] else u @ u.transpose(1, 2)
    squares = (gram.double() ** 2).sum((-1, -2)) - n_unit
    n = w.sum(-1).double()
    return total, squares, n * (n - 1)
