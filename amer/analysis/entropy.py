"""Curvature against next-token entropy: per-position *contextual curvature* beside the model's uncertainty.

King, Fedorenko & Hosseini (ICML 2026, arXiv 2604.23985, "Representational curvature modulates behavioral
uncertainty in large language models") relate contextual curvature, how sharply a layer's trajectory bends
over the recent context, to the entropy of the next-token distribution (r about 0.15 in the middle layers of
GPT-2 XL and Pythia-2.8B). amer's version, stated exactly:

- the bend of the triple ``(p - 2k, p - k, p)`` *ends* at position ``p``: it uses states up to ``p``, the
  same prefix the prediction at ``p`` sees;
- the contextual curvature at ``p`` over a window of ``W`` bends is the mean of the bends ending at
  ``p - W + 1 .. p`` (one stride, one unit); a position counts only when all ``W`` bends are valid (inside
  one document), so every value averages the same number of bends;
- the entropy at ``p`` is ``H(softmax(logits[p]))`` in nats, the uncertainty about token ``p + 1``;
- the correlation is Pearson's r over every counted position of every sequence (pooled), from per-sequence
  moments ``(n, sum x, sum y, sum x^2, sum y^2, sum xy)`` so that a bootstrap over sequences (and a paired
  difference of two models) needs no per-position data.

Pure tensor math.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["next_token_entropy", "contextual_curvature", "correlation_moments", "pearson"]

_CHUNK = 1 << 22  # logits entries per entropy chunk: a large vocabulary never needs a second full copy in fp32


def next_token_entropy(logits: Tensor) -> Tensor:
    """``(B, T)`` fp32 entropy in nats of ``softmax(logits)`` ``(B, T, V)``, computed in fp32 chunks."""
    batch, length, vocab = logits.shape
    flat = logits.reshape(-1, vocab)
    rows = max(1, _CHUNK // max(vocab, 1))
    out = []
    for i in range(0, flat.shape[0], rows):
        z = flat[i:i + rows].float()
        logp = torch.log_softmax(z, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).reshape(batch, length) if out else logits.new_zeros(batch, length, dtype=torch.float32)


def contextual_curvature(values: Tensor, weights: Tensor, *, stride: int, window: int,
                         length: int) -> tuple[Tensor, Tensor]:
    """Per-position contextual curvature ``(B, T)`` and its 0/1 validity ``(B, T)``.

    ``values``/``weights`` ``(B, T - 2k)`` are per-triple bends indexed by the triple's first position (as
    :func:`amer.analysis.trajectory.token_chords` returns them); entry ``p`` of the result is the mean of the
    ``window`` bends ending at ``p - window + 1 .. p``, valid when all of them are.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    batch = values.shape[0]
    pad = 2 * stride  # the triple starting at t ends at t + 2k
    v = torch.zeros(batch, length, dtype=torch.float64, device=values.device)
    w = torch.zeros_like(v)
    n = values.shape[1]
    v[:, pad:pad + n] = (values * weights).double()
    w[:, pad:pad + n] = weights.double()
    cv = torch.nn.functional.pad(v.cumsum(1), (window, 0))
    cw = torch.nn.functional.pad(w.cumsum(1), (window, 0))
    sum_v = cv[:, window:] - cv[:, :-window]
    sum_w = cw[:, window:] - cw[:, :-window]
    ok = (sum_w > window - 0.5).float()
    return (sum_v / window * ok).float(), ok


def correlation_moments(x: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """Per-row moments ``(B, 6)`` fp64 of the weighted pairs: ``n, sum x, sum y, sum x^2, sum y^2, sum xy``."""
    x, y, w = x.double(), y.double(), weight.double()
    return torch.stack([w.sum(1), (w * x).sum(1), (w * y).sum(1), (w * x * x).sum(1), (w * y * y).sum(1),
                        (w * x * y).sum(1)], dim=1)


def pearson(moments: np.ndarray) -> np.ndarray:
    """Pearson's r from pooled moments ``(..., 6)``; NaN where either side is constant or n < 3."""
    m = np.asarray(moments, dtype=np.float64)
    n, sx, sy, sxx, syy, sxy = (m[..., i] for i in range(6))
    cov = n * sxy - sx * sy
    vx = n * sxx - sx * sx
    vy = n * syy - sy * sy
    with np.errstate(invalid="ignore", divide="ignore"):
        # relative guard: a constant side leaves only rounding in its variance
        ok = (n >= 3) & (vx > 1e-12 * np.maximum(n * sxx, 1e-300)) & (vy > 1e-12 * np.maximum(n * syy, 1e-300))
        r = np.where(ok, cov / np.sqrt(np.where(ok, vx * vy, 1.0)), np.nan)
    return np.clip(r, -1.0, 1.0)
