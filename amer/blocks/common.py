"""Shared pieces of every block: RMSNorm, SwiGLU, the mixer contract and the pre-norm wrapper.

The mixer contract (uniform across families, as in flash-linear-attention)::

    mixer = MixerCls(cfg: ModelConfig, layer: LayerSpec)
    out = mixer(x, cache=None)          # x: (B, T, D) -> MixerOutput(y (B, T, D), cache, aux, stats)
    cache = mixer.init_cache(batch_size, max_len, device=..., dtype=...)
    out = mixer(x, cache=cache)         # continue from the cache (prefill T > 1 or a step T == 1)

``cache=None`` is the training path: no state is kept and ``out.cache`` is None. With a cache, the
mixer consumes T new tokens after those the cache has seen and returns the updated cache (caches
are NamedTuples; they are returned, not mutated, except for preallocated KV buffers).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.config import ModelConfig
from amer.ops.fused import rms_norm
from amer.pattern import Family, LayerSpec

__all__ = ["RMSNorm", "SwiGLU", "MixerOutput", "Block", "MIXERS", "register_mixer", "mixer_class"]


class MixerOutput(NamedTuple):
    y: Tensor  # (B, T, D) the mixer's contribution to the residual stream
    cache: Any = None  # updated decoding cache, None on the training path
    aux: dict[str, Tensor] = {}  # auxiliary losses to add to the objective (already weighted)
    stats: dict[str, Tensor] = {}  # detached figures for logging (MoE load, drops)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 for low-precision safety."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


MIXERS: dict[Family, type[nn.Module]] = {}


def register_mixer(family: Family) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: the one registry ``Family -> mixer class``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        MIXERS[family] = cls
        return cls

    return deco


_MODULES = {Family.ATTENTION: "attention", Family.MAMBA: "mamba", Family.EXPERT: "moe", Family.RECURRENT: "recurrent"}


def mixer_class(family: Family) -> type[nn.Module]:
    """The mixer class of ``family`` (importing its module registers it)."""
    if family not in MIXERS:
        importlib.import_module(f"amer.blocks.{_MODULES[family]}")
    return MIXERS[family]


class Block(nn.Module):
    """One letter of the pattern: ``x = x + mixer(norm(x))`` (Megatron-Core hybrid convention)."""

    def __init__(self, cfg: ModelConfig, layer: LayerSpec) -> None:
        super().__init__()
        self.layer = layer
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer_class(layer.family)(cfg, layer)

    def forward(self, x: Tensor, cache: Any = None) -> tuple[Tensor, MixerOutput]:
        out = self.mixer(self.norm(x), cache=cache)
        return x + out.y, out

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Any:
        return self.mixer.init_cache(batch_size, max_len, device=device, dtype=dtype)
