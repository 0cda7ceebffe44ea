"""The geometry every STP form and curvature estimator shares: the bend ``1 - cos`` of two chords, and the
(B, T) masks that say which positions are real and where documents start.

Masks (``mask`` arguments) are ``None``, a ``(B, T)`` bool validity mask (``True`` = real token) or a
``(B, T)`` integer document-id tensor (``doc_ids``). Document ids: a document is a maximal run of equal
consecutive ids (so packing order, not id uniqueness, defines documents), and a negative id marks padding
(never a valid position). Everything here is static-shape and host-sync free.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EPS", "one_minus_cos", "check_mask", "valid_and_runs", "count_below", "suffix_min", "draw_device"]

# Norms are clamped to this before dividing; in fp32 eps**2 (1e-16) is still a normal number.
EPS = 1e-8


def one_minus_cos(u: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """``1 - cos(u, v)`` along the last axis, in fp32, clamped to [0, 2].

    The single place every estimator computes the bend. Both norms are clamped separately (as in
    ``F.cosine_similarity``), so a zero-length chord gives cos = 0 (loss 1) with finite gradients
    instead of 0/0; squared norms are clamped before ``rsqrt`` so the gradient at zero is 0, not
    NaN. Upcasting first keeps bf16/fp16 inputs from overflowing the dot product or losing the
    small differences between neighbouring states.
    """
    u = u.float()
    v = v.float()
    eps2 = eps * eps
    dot = (u * v).sum(-1)
    inv_u = torch.rsqrt((u * u).sum(-1).clamp_min(eps2))
    inv_v = torch.rsqrt((v * v).sum(-1).clamp_min(eps2))
    # Rounding can push |cos| a few ulp past 1; the clamp keeps the documented [0, 2] range.
    return (1.0 - dot * inv_u * inv_v).clamp(0.0, 2.0)


def check_mask(mask: Tensor, batch: int, length: int) -> None:
    if mask.shape != (batch, length):
        raise ValueError(f"mask must have shape (B, T) = {(batch, length)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"mask must be bool (validity) or integer (document ids), got {mask.dtype}")


def valid_and_runs(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Validity ``(B, T)`` bool and a run id ``(B, T)`` int64 that changes at every document start.

    A bool mask is one run per row (triples may span padding gaps: all that is asked of them is
    that each position is real); document ids start a new run wherever the id changes.
    """
    if mask.dtype == torch.bool:
        return mask, torch.zeros_like(mask, dtype=torch.long)
    change = mask[:, 1:] != mask[:, :-1]  # (B, T-1)
    runs = torch.cat([torch.zeros_like(mask[:, :1], dtype=torch.long), change.long().cumsum(1)], 1)
    return mask >= 0, runs


def count_below(sorted_seq: Tensor, values: Tensor) -> Tensor:
    """``torch.searchsorted(sorted_seq, values)`` (left) for (B, T) / (B, S) integer counts, as a count of the
    entries below each value: the same integers, and an op XLA compiles (its searchsorted falls back to the
    host, which would cut the training step's graph); (B, S, T) comparisons, small next to the model."""
    return (sorted_seq.unsqueeze(1) < values.unsqueeze(-1)).sum(-1)


def suffix_min(x: Tensor) -> Tensor:
    """Running minimum from the right along dim 1, through cummax (which XLA compiles; cummin falls back)."""
    return -(-x).flip(1).cummax(dim=1).values.flip(1)


def draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str | None:
    """Where a draw happens: on the generator's device (a host generator driving an XLA run draws on the
    host and the draw travels as an input, the same numbers a CPU run draws), else on ``device``."""
    return device if generator is None else generator.device
