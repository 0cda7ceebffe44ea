"""Depthwise causal 1-D convolution with a decoding state, shared by the M and R blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["causal_conv1d", "conv_state_init"]


def conv_state_init(batch_size: int, channels: int, width: int, *, device=None, dtype=None) -> Tensor:
    """Zero state: the last ``width - 1`` inputs, (B, width - 1, C)."""
    return torch.zeros(batch_size, max(width - 1, 0), channels, device=device, dtype=dtype)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                  state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """y[t, c] = bias[c] + sum_k weight[c, k] * x[t - (K-1) + k, c], causal in t.

    x: (B, T, C); weight: (C, K); state: (B, K-1, C) inputs preceding x (zeros at the start of a
    sequence), or None on the training path. Returns y (B, T, C) and the new state (or None).
    """
    K = weight.shape[-1]
    B, T, C = x.shape
    if state is None:
        xp = F.pad(x.transpose(1, 2), (K - 1, 0))  # (B, C, T + K - 1)
        new_state = None
    else:
        xs = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K - 1 + T, C)
        new_state = xs[:, xs.shape[1] - (K - 1):] if K > 1 else state
        xp = xs.transpose(1, 2)
    if T == 1 and state is not None:
        # decoding step: a dot product over the window is cheaper than launching conv1d
        y = torch.einsum("bck,ck->bc", xp, weight.to(x.dtype)).unsqueeze(1)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y, new_state
    y = F.conv1d(xp, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=C)
    return y.transpose(1, 2), new_state
