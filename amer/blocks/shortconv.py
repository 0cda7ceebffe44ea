"""Gated short convolution (the C family): the convolution operator of Liquid AI's LFM2 (2025), a
double-gated causal depthwise convolution in the line of Hyena (Poli et al. 2023, arXiv 2302.10866)
with a filter only a few taps long::

    B, C, x = in_proj(u)                        D -> 3 D, in this order
    y       = C * causal_depthwise_conv(B * x)  kernel L_cache (3 in LFM2), input gate B, output gate C
    out     = out_proj(y)                       D -> D

There is no state beyond the last ``L_cache - 1`` gated inputs, so decoding is O(1) per token and the
training path is a handful of shifted multiply-adds (:func:`amer.ops.conv.causal_conv1d`); packed
documents stop the window at each document's first token.

Loading transformers' ``Lfm2ShortConv``: ``in_proj.{weight,bias}`` and ``out_proj.{weight,bias}`` keep
their names, ``conv.weight`` (D, 1, K) -> ``conv_weight`` (D, K) and ``conv.bias`` -> ``conv_bias``;
LFM2's one ``conv_bias`` flag sets all three biases, as ``bias`` does here, and ``conv_L_cache`` is
``l_cache``. An LFM2 convolution layer is ``x + conv(operator_norm(x))`` followed by its SwiGLU
``x + feed_forward(ffn_norm(x))``: the pattern ``CE`` with a dense E (``operator_norm.weight`` ->
``blocks.i.norm.weight``); its attention layers are ``AE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from amer.blocks.common import Mixer, MixerOutput
from amer.blocks.doc_ids import DocIds
from amer.config import Dims
from amer.configio import opt
from amer.families import FamilySpec, register_family
from amer.ops.conv import causal_conv1d, conv_state_init
from amer.pattern import LayerSpec

__all__ = ["ShortConvConfig", "ShortConvCache", "ShortConvMixer"]


@dataclass(frozen=True)
class ShortConvConfig:
    """Gated short convolution (the C family), LFM2 (Liquid AI 2025)."""

    l_cache: int = opt(3, "short-conv kernel width (LFM2's conv_L_cache)", ge=1)
    bias: bool = opt(False, "short-conv biases on the input projection, the convolution and the output projection "
                     "(LFM2's conv_bias)")


class ShortConvCache(NamedTuple):
    """Decoding state of one short-conv layer: O(1) in the context length."""

    conv_state: Tensor  # (B, l_cache - 1, D) the last gated inputs B * x


class ShortConvMixer(Mixer):
    """LFM2's gated short convolution (module docstring).

    Initialisation: ``in_proj`` N(0, init_std) and ``out_proj`` the residual-scaled std, as every amer
    block; the depthwise filter takes nn.Conv1d's default (uniform +-1/sqrt(K)), as amer's M and R blocks do;
    biases start at zero. (transformers initialises LFM2's filter like its projections, N(0, 0.02): with the
    two multiplicative gates on top, that starts the block at a few 1e-5 of its input.)
    """

    def __init__(self, cfg: ShortConvConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.cfg = cfg
        self.d_model = dims.d_model
        self.l_cache = cfg.l_cache
        D = dims.d_model
        self.in_proj = nn.Linear(D, 3 * D, bias=cfg.bias)
        self.conv_weight = nn.Parameter(torch.empty(D, cfg.l_cache))
        self.conv_bias = nn.Parameter(torch.empty(D)) if cfg.bias else None
        self.out_proj = nn.Linear(D, D, bias=cfg.bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.in_proj.weight, 0.0, self.dims.init_std)
        bound = 1.0 / math.sqrt(self.l_cache)
        self.conv_weight.uniform_(-bound, bound)
        nn.init.normal_(self.out_proj.weight, 0.0, self.dims.out_std)
        for b in (self.in_proj.bias, self.conv_bias, self.out_proj.bias):
            if b is not None:
                b.zero_()

    def flops(self, seq_len: int) -> dict[str, float]:
        """Projections, plus the depthwise filter (K multiply-adds per channel and token)."""
        return {"proj": self.linear_flops(seq_len), "conv": float(seq_len * self.d_model * self.l_cache)}

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> ShortConvCache:
        """Zero window; ``max_len`` is irrelevant (the window has a fixed size)."""
        device = device if device is not None else self.in_proj.weight.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        return ShortConvCache(conv_state_init(batch_size, self.d_model, self.l_cache, device=device, dtype=dtype))

    def forward(self, x: Tensor, cache: ShortConvCache | None = None,
                doc_ids: DocIds | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y (B, T, D), new cache or None)."""
        Bg, Cg, v = self.in_proj(x).chunk(3, dim=-1)  # (B, T, D) each: input gate, output gate, values
        y, conv_state = causal_conv1d(Bg * v, self.conv_weight, self.conv_bias,
                                      None if cache is None else cache.conv_state,
                                      position=None if doc_ids is None else doc_ids.position)
        out = self.out_proj(Cg * y)
        return MixerOutput(out, None if cache is None else ShortConvCache(conv_state), {}, {})


register_family(FamilySpec(letter="C", name="shortconv", colour="#bcbd22", config_key="shortconv",
                           config=ShortConvConfig, mixer=ShortConvMixer,
                           summary="LFM2 gated short convolution; O(1) decoding state"))
