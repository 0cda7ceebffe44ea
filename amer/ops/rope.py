"""Rotary position embedding frequencies: plain RoPE (Su et al. 2021, arXiv 2104.09864) and YaRN's context
extension (Peng et al. 2023, arXiv 2309.00071), as DeepSeek-V2/V3 use it.

YaRN leaves the high frequencies (more than ``beta_fast`` rotations over the pretraining context) as they
are, divides the low ones (fewer than ``beta_slow`` rotations) by ``factor`` and blends linearly between,
then scales the rotated part by an attention factor ``0.1 * m * ln(factor) + 1`` ("mscale"). DeepSeek's
multi-head latent attention also multiplies the whole softmax scale by ``mscale(factor, mscale_all_dim)^2``
(:func:`yarn_mscale`), which the mixer applies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["rope_inv_freq", "yarn_inv_freq", "yarn_mscale"]


def rope_inv_freq(dim: int, theta: float) -> Tensor:
    """The ``dim / 2`` inverse frequencies ``theta^(-2i / dim)`` of plain RoPE, fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, factor: float, original: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, truncate: bool = True) -> Tensor:
    """YaRN's ``dim / 2`` inverse frequencies for a context ``factor`` times the pretraining length ``original``:
    frequency ``i`` interpolated (divided by ``factor``) by the share a linear ramp between the dimensions
    that turn ``beta_slow`` and ``beta_fast`` times over ``original`` tokens gives it, extrapolated (kept)
    otherwise."""
    def correction_dim(rotations: float) -> float:  # the dimension that turns ``rotations`` times over ``original``
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # share of each frequency kept as it is
    pos = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
