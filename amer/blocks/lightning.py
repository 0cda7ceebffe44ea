"""N family: decayed linear attention, MiniMax's "lightning attention" (MiniMax, "MiniMax-01: Scaling Foundation
Models with Lightning Attention", 2025, arXiv 2501.08313; Qin et al., "Lightning Attention-2", arXiv 2401.04658).

Linear attention whose state decays by a fixed per-head rate (TransNormerLLM's, Qin et al. 2023, arXiv
2307.14995)::

    q, k, v = act(qkv_proj(x))                     per head (act: silu in MiniMax)
    S_t     = exp(-s_h) S_{t-1} + k_t^T v_t        a (head_dim, head_dim) state per head
    o_t     = q_t S_t
    y       = out_proj(sigmoid(gate(x)) * rmsnorm(o))   one RMSNorm over all heads' outputs

The rates are ALiBi's slopes ``s_h = 2^(-8 (h + 1) / H)`` (Press et al. 2022), scaled by the layer's depth as
MiniMax does: ``(1 - l / (L - 1) + 1e-5)`` for layer ``l`` of ``L``, so the first layers forget fastest and the
last barely at all. ``depth_stride`` says how many blocks make one step of that depth (MiniMax counts decoder
layers, each an ``N`` or ``A`` block then an ``E`` block: 2).

The recurrence is a state-space scan with a constant decay (Mamba-2's SSD with ``dt = 1``, ``A = -s_h``, one B/C
group per head), so training runs :func:`amer.ops.ssd.ssd_chunked` (chunked matmuls, no loop over time steps;
mamba-ssm's kernel where it is picked) and decoding one :func:`amer.ops.ssd.ssd_step`: O(1) per token.

Checkpoint layout (transformers ``MiniMaxLightningAttention``): ``qkv_proj`` rows per head ``[q | k | v]`` (the
head's three parts side by side), ``output_gate`` -> ``gate_proj``, ``norm`` -> ``norm``, ``out_proj``; its
``slope_rate`` and decay buffers are what :meth:`LightningMixer.slopes` computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import Mixer, MixerOutput, RMSNorm
from amer.blocks.doc_ids import DocIds
from amer.config import Dims
from amer.configio import check, opt
from amer.families import FamilySpec, register_family
from amer.ops.ssd import ssd_chunked, ssd_step
from amer.pattern import LayerSpec

__all__ = ["LightningConfig", "LightningCache", "LightningMixer", "lightning_slopes"]


@dataclass(frozen=True)
class LightningConfig:
    """Decayed linear attention (the N family), MiniMax-01's lightning attention (arXiv 2501.08313)."""

    n_heads: int = opt(4, "lightning attention heads", ge=1)
    head_dim: int | None = opt(None, "lightning attention head width (default d-model / n-heads)", ge=1)
    activation: Literal["silu", "none"] = opt("silu", "activation of the query/key/value projection (MiniMax: silu)")
    decay_exponent: float = opt(8.0, "per-head decay rates 2^(-exponent (h + 1) / heads), ALiBi's slopes at 8", gt=0)
    depth_decay: bool = opt(True, "scale the rates by 1 - depth (MiniMax): deep layers keep a longer memory")
    depth_stride: int = opt(1, "blocks per step of the depth that scales the rates (MiniMax counts decoder layers of "
                            "two blocks: 2)", ge=1)
    output_gate: bool = opt(True, "multiply the normed output by sigmoid(gate_proj(x)) (MiniMax)")
    chunk_size: int = opt(64, "lightning attention chunk length of the training scan", ge=1)
    norm_eps: float | None = opt(None, "epsilon of the output RMSNorm (default the model's norm-eps; MiniMax: 1e-6)",
                                 gt=0)

    def __post_init__(self) -> None:
        check(self.activation in ("silu", "none"),
              f"lightning.activation must be 'silu' or 'none', got {self.activation!r}")

    def validate(self, dims: Dims) -> None:
        check(self.head_dim is not None or dims.d_model % self.n_heads == 0,
              f"lightning: d_model ({dims.d_model}) must be divisible by lightning.n_heads ({self.n_heads}) unless "
              "lightning.head_dim is set")


class LightningCache(NamedTuple):
    """Decoding state of one lightning-attention layer."""

    state: Tensor  # (B, H, head_dim (v), head_dim (k)) fp32: sum of decayed v_s k_s^T


def lightning_slopes(n_heads: int, exponent: float = 8.0, depth: tuple[int, int] | None = None) -> Tensor:
    """Per-head decay rates (H,) fp32: ``2^(-exponent / H)^(h + 1)``, times ``1 - l / (L - 1 + 1e-5) + 1e-5`` for
    ``depth = (l, L)``, computed in the order MiniMax computes them (so an import matches bit for bit)."""
    base = 1 / (2 ** (exponent / n_heads))
    rate = base ** (torch.arange(n_heads) + 1)
    if depth is not None:
        layer, layers = depth
        rate = rate * (1 - layer / (layers - 1 + 1e-5) + 1e-5)
    return rate.to(torch.float32)


class LightningMixer(Mixer):
    """Lightning attention: fixed per-head decays, an output gate and one RMSNorm over the heads."""

    def __init__(self, cfg: LightningConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.cfg = cfg
        self.H = cfg.n_heads
        self.hd = cfg.head_dim or dims.d_model // cfg.n_heads
        width = self.H * self.hd
        self.qkv_proj = nn.Linear(dims.d_model, 3 * width, bias=False)
        self.gate_proj = nn.Linear(dims.d_model, width, bias=False) if cfg.output_gate else None
        self.norm = RMSNorm(width, cfg.norm_eps if cfg.norm_eps is not None else dims.norm_eps, dims.norm_offset)
        self.out_proj = nn.Linear(width, dims.d_model, bias=False)
        self.register_buffer("slope", self.slopes(), persistent=False)
        self.reset_parameters()

    def slopes(self) -> Tensor:
        """This layer's decay rates (H,): the config's rule at the layer's depth."""
        c = self.cfg
        depth = None
        if c.depth_decay:
            depth = (self.layer.index // c.depth_stride, max(1, self.dims.n_layers // c.depth_stride))
        return lightning_slopes(self.H, c.decay_exponent, depth)

    def init_buffers(self, device: torch.device | str = "cpu") -> None:
        """Recompute the decay rates (not saved with the weights) on ``device``."""
        self.slope = self.slopes().to(device)

    def reset_parameters(self) -> None:
        """Projections N(0, init_std), the residual-writing ``out_proj`` N(0, out_std), the norm gain 1."""
        nn.init.normal_(self.qkv_proj.weight, 0.0, self.dims.init_std)
        if self.gate_proj is not None:
            nn.init.normal_(self.gate_proj.weight, 0.0, self.dims.init_std)
        nn.init.normal_(self.out_proj.weight, 0.0, self.dims.out_std)
        self.norm.reset_parameters()

    def flops(self, seq_len: int) -> dict[str, float]:
        """Projections, plus the chunked scan as executed (chunk ``L``, ``c`` chunks, per head): ``intra`` the
        (L, L) scores and their product with v (2 L^2 hd), ``state`` the chunk states and their read (2 L hd^2)."""
        L = min(self.cfg.chunk_size, seq_len)
        c = -(-seq_len // L)
        intra = c * self.H * 2 * L * L * self.hd
        state = c * self.H * 2 * L * self.hd * self.hd
        return {"proj": self.linear_flops(seq_len), "intra": float(intra), "state": float(state)}

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> LightningCache:
        """A zero fp32 state; ``max_len`` is irrelevant (constant-size state)."""
        device = device if device is not None else self.qkv_proj.weight.device
        acc = torch.promote_types(dtype or torch.float32, torch.float32)
        return LightningCache(torch.zeros(batch_size, self.H, self.hd, self.hd, device=device, dtype=acc))

    def forward(self, x: Tensor, cache: LightningCache | None = None, doc_ids: DocIds | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y, cache). Packed documents (``doc_ids``): the state restarts at each
        document's first token."""
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        if self.cfg.activation == "silu":
            qkv = F.silu(qkv)
        q, k, v = qkv.view(B, T, self.H, 3 * self.hd).split(self.hd, dim=-1)  # each (B, T, H, hd)
        A = -self.slope.to(torch.float32)
        if cache is not None and T == 1:
            o, state = ssd_step(v[:, 0], x.new_ones(B, self.H), A, k[:, 0], q[:, 0], cache.state)
            o = o.unsqueeze(1)
        else:
            o, state = ssd_chunked(v, x.new_ones(B, T, self.H), A, k, q, self.cfg.chunk_size,
                                   None if cache is None else cache.state,
                                   None if doc_ids is None else doc_ids.index)
        o = self.norm(o.reshape(B, T, self.H * self.hd))
        if self.gate_proj is not None:
            o = torch.sigmoid(self.gate_proj(x)) * o
        return MixerOutput(self.out_proj(o), None if cache is None else LightningCache(state))


register_family(FamilySpec(letter="N", name="lightning", colour="#e377c2", config_key="lightning",
                           config=LightningConfig, mixer=LightningMixer,
                           summary="decayed linear attention (MiniMax lightning); O(1) decoding state"))
