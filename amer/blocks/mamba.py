"""Mamba-2 mixer (the M family), Dao & Gu 2024, "Transformers are SSMs" (arXiv 2405.21060).

Structure follows the paper's Mamba-2 block (figure 6) and mamba_ssm's ``Mamba2``:

    in_proj: D -> [z (d_inner) | xBC (d_inner + 2 G N) | dt (H)]     one fused Linear (parallel projections)
    xBC = silu(causal_depthwise_conv(xBC))                          x, B, C all see the short conv
    y   = SSD(x, dt = softplus(dt + dt_bias), A = -exp(A_log), B, C) + D * x
    y   = rmsnorm(y * silu(z))                                      gate before the norm (extra norm, sec. 7.4)
    out = out_proj(y)                                               d_inner -> D

Training uses the chunked matmul scan (:func:`amer.ops.ssd.ssd_chunked`); decoding keeps the last
``d_conv - 1`` conv inputs and one (H, P, N) fp32 state per sequence, O(1) in the context length.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import MixerOutput, register_mixer
from amer.ops.fused import rms_norm
from amer.config import ModelConfig
from amer.ops.conv import causal_conv1d, conv_state_init
from amer.ops.ssd import ssd_chunked, ssd_step
from amer.pattern import Family, LayerSpec

__all__ = ["MambaCache", "MambaMixer"]


class MambaCache(NamedTuple):
    """Decoding state of one Mamba-2 layer."""

    conv_state: Tensor  # (B, d_conv - 1, conv_dim) the last conv inputs (xBC before the conv)
    ssm_state: Tensor  # (B, H, P, N) fp32: the SSM state after the tokens seen so far


@register_mixer(Family.MAMBA)
class MambaMixer(nn.Module):
    """Mamba-2 (SSD) token mixer with a depthwise causal conv and a gated RMSNorm.

    Parameters outside Linear layers are initialised here as in mamba_ssm's ``Mamba2``:
    ``dt_bias`` is the inverse softplus of dt ~ logU[dt_min, dt_max] (floored) so softplus(dt_bias)
    starts in the range that Mamba found to train well; ``A_log = log U[a_init_range]`` gives
    per-head decay rates spanning short and long memories; ``D = 1`` (skip connection).
    ``A_log``, ``dt_bias``, ``D`` and the norm weight carry ``_no_weight_decay = True`` as in mamba_ssm.
    """

    def __init__(self, cfg: ModelConfig, layer: LayerSpec) -> None:
        super().__init__()
        m = cfg.mamba
        self.layer = layer
        self.d_model = cfg.d_model
        self.d_inner = m.expand * cfg.d_model
        self.head_dim = m.head_dim
        self.n_heads = self.d_inner // m.head_dim
        self.n_groups = m.n_groups
        self.d_state = m.d_state
        self.d_conv = m.d_conv
        self.chunk_size = m.chunk_size
        self.norm_eps = cfg.norm_eps
        self.conv_dim = self.d_inner + 2 * m.n_groups * m.d_state
        H = self.n_heads

        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + H, bias=False)
        # nn.Conv1d's default init for a depthwise kernel: U(-1/sqrt(K), 1/sqrt(K)), fan_in = K
        bound = 1.0 / math.sqrt(m.d_conv)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, m.d_conv).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim).uniform_(-bound, bound))

        dt = torch.exp(torch.rand(H) * (math.log(m.dt_max) - math.log(m.dt_min)) + math.log(m.dt_min))
        dt = dt.clamp(min=m.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        lo, hi = m.a_init_range
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        for p in (self.dt_bias, self.A_log, self.D, self.norm_weight):
            p._no_weight_decay = True  # type: ignore[attr-defined]

        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> MambaCache:
        """Zero conv window and zero fp32 SSM state; ``max_len`` is irrelevant (constant-size state)."""
        device = device if device is not None else self.in_proj.weight.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        conv_state = conv_state_init(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state,
                                device=device, dtype=torch.float32)
        return MambaCache(conv_state, ssm_state)

    def _gated_norm(self, y: Tensor, z: Tensor) -> Tensor:
        """rmsnorm(y * silu(z)) in fp32, normalised per B/C group as mamba_ssm's RMSNormGated does."""
        if self.n_groups == 1:
            return rms_norm(y, self.norm_weight, self.norm_eps, gate=z)
        G = self.n_groups
        out = rms_norm(y.unflatten(-1, (G, -1)), self.norm_weight.view(G, -1), self.norm_eps,
                       gate=z.unflatten(-1, (G, -1)))  # (..., G, d_inner / G)
        return out.flatten(-2)

    def forward(self, x: Tensor, cache: MambaCache | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y (B, T, D), new cache or None)."""
        T = x.shape[1]
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)

        xBC, conv_state = causal_conv1d(xBC, self.conv_weight, self.conv_bias,
                                        None if cache is None else cache.conv_state)
        xBC = F.silu(xBC)  # (B, T, conv_dim)
        xs, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.unflatten(-1, (H, P))  # (B, T, H, P)
        Bm = Bm.unflatten(-1, (G, N))  # (B, T, G, N)
        Cm = Cm.unflatten(-1, (G, N))
        acc = torch.promote_types(x.dtype, torch.float32)  # decays in fp32 at least
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (B, T, H)
        A = -torch.exp(self.A_log.to(acc))  # (H,) < 0: a stable, decaying state

        if cache is not None and T == 1:
            y, ssm_state = ssd_step(xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], cache.ssm_state)
            y = y.unsqueeze(1)  # (B, 1, H, P)
        else:
            init = None if cache is None else cache.ssm_state
            y, ssm_state = ssd_chunked(xs, dt, A, Bm, Cm, self.chunk_size, init)

        y = torch.addcmul(y, xs, self.D.to(y.dtype).unsqueeze(-1))  # skip connection D x per head
        y = self._gated_norm(y.flatten(-2), z)  # (B, T, d_inner)
        out = self.out_proj(y)
        new_cache = None if cache is None else MambaCache(conv_state, ssm_state)
        return MixerOutput(out, new_cache, {}, {})
