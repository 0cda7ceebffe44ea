"""Baselines measured in the same report, so every curvature figure has its own floor and ceiling.

- **shuffled**: the model run on the same text with the tokens of each document shuffled (the control of
  Hosseini & Fedorenko, NeurIPS 2023): curvature a model reaches without word order;
- **noise**: i.i.d. Gaussian points with the tap's own mean and covariance (estimated on the evaluation
  data), in the shape of the batch: the curvature of a trajectory with no memory at all. Isotropic noise in
  high dimension gives ``1 - cos = 1.5`` (120 degrees); anisotropic noise less (down to 4/3 in one
  dimension), which is why the level is measured per tap rather than assumed;
- **walk**: a Gaussian random walk whose increments have the tap's covariance: independent steps, so
  ``E[cos] = 0`` (``1 - cos = 1``, 90 degrees on average) whatever the covariance.

Both synthetic baselines go through the same estimator, masks and bootstrap as the model's taps. Pure
tensor math: the draws come from a caller's generator, so a seed fixes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from amer.stp.geometry import valid_and_runs

__all__ = ["shuffle_within_documents", "gaussian_noise", "gaussian_walk"]


def shuffle_within_documents(tokens: Tensor, doc_ids: Tensor | None, generator: torch.Generator) -> Tensor:
    """``tokens`` ``(B, T)`` with each document's tokens permuted at random inside the document's own
    positions (documents as in :mod:`amer.stp.geometry`: runs of equal ids; padding, negative ids, stays).

    One sort of ``run * (T + 1) + uniform`` keys: static shapes, no loop over documents.
    """
    batch, length = tokens.shape
    if doc_ids is None:
        doc_ids = torch.zeros_like(tokens)
    valid, runs = valid_and_runs(doc_ids.long())
    noise = torch.rand(batch, length, generator=generator).to(tokens.device)
    # padding keeps its position: its key is its own index, so it never trades places with a token
    pos = torch.arange(length, device=tokens.device).expand(batch, length).float()
    key = runs.double() * (length + 1) + torch.where(valid, noise.double(), pos.double() / length)
    # runs are contiguous and ordered, so sorting by key permutes only inside each run
    order = key.argsort(dim=1, stable=True)
    return torch.gather(tokens, 1, order)


def gaussian_noise(shape: tuple[int, int, int], mean: Tensor, sqrt_cov: Tensor, generator: torch.Generator) -> Tensor:
    """``(B, T, D)`` i.i.d. draws of ``N(mean, sqrt_cov @ sqrt_cov^T)``."""
    z = torch.randn(*shape, generator=generator).to(sqrt_cov.device)
    return z @ sqrt_cov.T + mean.float()


def gaussian_walk(shape: tuple[int, int, int], sqrt_cov: Tensor, generator: torch.Generator) -> Tensor:
    """``(B, T, D)`` random walks along ``T`` with i.i.d. ``N(0, sqrt_cov @ sqrt_cov^T)`` increments."""
    z = torch.randn(*shape, generator=generator).to(sqrt_cov.device)
    return (z @ sqrt_cov.T).cumsum(dim=1)
