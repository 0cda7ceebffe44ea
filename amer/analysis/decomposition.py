"""The bend of two consecutive chords, in the units of the literature and split into what STP sees and what
it cannot see.

Notation, used throughout amer's curvature report. For a trajectory ``h`` and a stride ``k``, a triple of
positions ``(t, t+k, t+2k)`` gives two consecutive chords

- ``d1 = h[t+k] - h[t]``: the step into the middle point; its direction ``u = d1 / |d1|`` is the
  *direction of travel* (STP's ``h[r] - h[s]``);
- ``d2 = h[t+2k] - h[t+k]``: the step out of it (STP's ``h[t] - h[r]``);
- ``a = d2 - d1``: the discrete *acceleration* (second difference);
- ``a_par = (a . u) u``: its tangential part, along the direction of travel;
- ``a_perp = a - a_par``: its normal part. Because ``d1`` has no normal part, ``a_perp`` is also the
  component of ``d2`` normal to ``d1``: ``a_perp = d2 - (d2 . u) u``.

With ``theta`` the angle between ``d1`` and ``d2``, ``|a_perp| / |d2| = sin(theta)``, hence the identity

    1 - cos(theta) = 1 - sgn(d1 . d2) * sqrt(1 - |a_perp|^2 / |d2|^2)

(for bends up to 90 degrees, ``d1 . d2 >= 0``, the sign is +1 and the STP loss is exactly
``1 - sqrt(1 - |a_perp|^2 / |d2|^2)``). So the loss is a function of the normal part relative to the
outgoing step alone: a trajectory that only speeds up or slows down along a straight line (``a_perp = 0``)
costs nothing however large ``a_par`` is, unless it reverses.

Figures per triple (:func:`bend_parts`):

- ``one_minus_cos``: ``1 - cos(theta)`` in [0, 2] (the STP loss of that triple);
- ``angle``: ``theta`` in degrees, [0, 180] (Hosseini & Fedorenko, NeurIPS 2023, "Large language models
  implicitly learn to straighten neural sentence trajectories", report the mean of this angle), computed
  with Kahan's ``2 atan2(|u1 - u2|, |u1 + u2|)``, accurate for angles near 0 and 180 where ``acos`` of a
  rounded cosine is not;
- ``normal``: ``|a_perp| / |d2|`` = ``sin(theta)``, in [0, 1];
- ``tangential``: ``|a_par| / |d2|`` = ``| |d2| cos(theta) - |d1| | / |d2|``, >= 0;
- ``slowing``: 1 where the trajectory decelerates along its direction of travel, ``a . u < 0`` (it advances
  less along ``u`` than in the step before), else 0; a relative tolerance ``SLOWING_TOL * max(|d1|, |d2|)``
  keeps rounding from deciding exact ties (a straight line at constant speed does not slow);
- ``defined``: 1 where both chords have a length (``min(|d1|, |d2|) > DEGENERATE * max(|d1|, |d2|)``), else
  0. A zero-length chord (a repeated token at the embedding, a state that does not move) has no direction of
  travel and makes ``|a_par| / |d2|`` unbounded, so the decomposition is averaged over defined triples only;
  the bend keeps the STP convention (a zero chord counts as ``1 - cos = 1``, 90 degrees).

All figures come from the two half-angle lengths ``p = |u1 - u2|`` and ``q = |u1 + u2|`` of the unit chords
(``1 - cos = p^2/2``, ``sin = pq/2``, ``theta = 2 atan2(p, q)``), which lose no precision near 0 or 180 degrees.
Pure tensor math in fp32; a zero-length chord (norm below :data:`amer.stp.geometry.EPS`) makes a right angle,
as in :func:`amer.stp.geometry.one_minus_cos`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from amer.stp.geometry import EPS

__all__ = ["SLOWING_TOL", "DEGENERATE", "BendParts", "bend_parts", "bend_units", "angle_deg", "stp_from_normal"]

SLOWING_TOL = 1e-5
DEGENERATE = 1e-6
_DEG = 180.0 / math.pi


class BendParts(NamedTuple):
    """Per-triple figures of :func:`bend_parts`, each fp32 of the chords' leading shape."""

    one_minus_cos: Tensor
    angle: Tensor
    normal: Tensor
    tangential: Tensor
    slowing: Tensor
    defined: Tensor


def _up(x: Tensor) -> Tensor:
    """fp64 stays fp64 (a reference computation), anything else is computed in fp32."""
    return x if x.dtype == torch.float64 else x.float()


def _halves(d1: Tensor, d2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(p, q, |d1|, |d2|, zero)`` with ``p = |u1 - u2| = 2 sin(theta/2)``, ``q = |u1 + u2| = 2 cos(theta/2)``
    for the unit chords, and ``zero`` where a chord has no length (norm <= EPS, STP's clamp)."""
    n1, n2 = d1.norm(dim=-1), d2.norm(dim=-1)
    u1 = d1 / n1.clamp_min(EPS).unsqueeze(-1)
    u2 = d2 / n2.clamp_min(EPS).unsqueeze(-1)
    return (u1 - u2).norm(dim=-1), (u1 + u2).norm(dim=-1), n1, n2, (n1 <= EPS) | (n2 <= EPS)


def _omc_and_angle(p: Tensor, q: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    # 1 - cos = p^2 / 2 and theta = 2 atan2(p, q): no cancellation near 0 or 180 degrees; a zero chord is a
    # right angle, as in amer.stp.geometry.one_minus_cos
    omc = torch.where(zero, torch.ones_like(p), (0.5 * p * p).clamp(0.0, 2.0))
    angle = torch.where(zero, torch.full_like(p, 90.0), 2.0 * torch.atan2(p, q) * _DEG)
    return omc, angle


def angle_deg(u: Tensor, v: Tensor) -> Tensor:
    """The angle between ``u`` and ``v`` along the last axis, in degrees [0, 180], fp32 (fp64 for fp64 input;
    Kahan's formula ``2 atan2(|u/|u| - v/|v||, |u/|u| + v/|v||)``, stable where the cosine is close to +-1; a
    zero-length vector makes a right angle)."""
    p, q, _, _, zero = _halves(_up(u), _up(v))
    return _omc_and_angle(p, q, zero)[1]


def bend_units(d1: Tensor, d2: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 - cos, angle in degrees)`` of the bend from ``d1`` to ``d2`` (both ``(..., D)``), sharing one
    normalisation; ``1 - cos`` equals :func:`amer.stp.geometry.one_minus_cos` up to rounding."""
    p, q, _, _, zero = _halves(_up(d1), _up(d2))
    return _omc_and_angle(p, q, zero)


def bend_parts(d1: Tensor, d2: Tensor) -> BendParts:
    """Every per-triple figure of the bend from chord ``d1`` to chord ``d2`` (both ``(..., D)``); see the
    module docstring for the definitions. fp32 (fp64 for fp64 chords, e.g. a reference computation)."""
    d1, d2 = _up(d1), _up(d2)
    p, q, n1, n2, zero = _halves(d1, d2)
    omc, angle = _omc_and_angle(p, q, zero)
    cos = 1.0 - 0.5 * p * p
    a_par = n2 * cos - n1  # signed tangential acceleration a . u = d2 . u - |d1|
    den = n2.clamp_min(EPS)
    tol = SLOWING_TOL * torch.maximum(n1, n2)
    return BendParts(
        one_minus_cos=omc,
        angle=angle,
        normal=(0.5 * p * q).clamp(0.0, 1.0),  # sin(theta) = 2 sin(theta/2) cos(theta/2) = |a_perp| / |d2|
        tangential=a_par.abs() / den,
        slowing=((a_par < -tol) & ~zero).to(d1.dtype),
        defined=((torch.minimum(n1, n2) > DEGENERATE * torch.maximum(n1, n2)) & ~zero).to(d1.dtype),
    )


def stp_from_normal(normal: Tensor, sign: Tensor) -> Tensor:
    """``1 - sign * sqrt(1 - normal^2)``: the STP loss of a triple rebuilt from its normal part alone
    (``normal = |a_perp| / |d2|``, ``sign = sgn(d1 . d2)``); equals :func:`one_minus_cos` of the chords."""
    return 1.0 - sign * torch.sqrt((1.0 - normal.double() ** 2).clamp_min(0.0))
