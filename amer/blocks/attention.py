"""A family: causal grouped-query attention with rotary position embeddings.

GQA (Ainslie et al. 2023, arXiv 2305.13245) shares each key/value head across
``n_heads / n_kv_heads`` query heads, shrinking the KV cache; RoPE (Su et al. 2021, arXiv
2104.09864) encodes absolute position as a rotation so attention scores depend on relative offsets.
The attention itself is ``F.scaled_dot_product_attention``, which picks the fused CPU/GPU kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import Mixer, MixerOutput, RMSNorm
from amer.config import Dims
from amer.configio import check, opt
from amer.families import FamilySpec, register_family
from amer.pattern import LayerSpec

__all__ = ["AttentionConfig", "KVCache", "AttentionMixer", "apply_rope"]


@dataclass
class AttentionConfig:
    """Causal grouped-query attention with RoPE (the A family)."""

    n_heads: int = opt(4, "attention query heads")
    n_kv_heads: int = opt(2, "attention key/value heads (grouped-query attention; divides n-heads)")
    head_dim: int | None = opt(None, "attention head width (default d-model / n-heads; must be even for RoPE)")
    rope_theta: float = opt(10000.0, "RoPE base frequency")
    qk_norm: bool = opt(False, "RMS-normalise queries and keys before the dot product")

    def __post_init__(self) -> None:
        check(self.n_heads >= 1, f"attention.n_heads must be >= 1, got {self.n_heads}")
        check(self.n_kv_heads >= 1, f"attention.n_kv_heads must be >= 1, got {self.n_kv_heads}")
        check(
            self.n_heads % self.n_kv_heads == 0,
            f"attention.n_heads ({self.n_heads}) must be divisible by attention.n_kv_heads "
            f"({self.n_kv_heads}); accepted n_kv_heads: "
            f"{[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}",
        )
        check(self.head_dim is None or self.head_dim >= 1, "attention.head_dim must be >= 1")
        check(self.rope_theta > 0, f"attention.rope_theta must be > 0, got {self.rope_theta}")

    def validate(self, dims: Dims) -> None:
        """Checks that need the shared dimensions (run when the pattern has A blocks)."""
        if self.head_dim is None:
            check(dims.d_model % self.n_heads == 0,
                  f"d_model ({dims.d_model}) must be divisible by attention.n_heads ({self.n_heads}) "
                  "or set attention.head_dim")
        check((self.head_dim or dims.d_model // self.n_heads) % 2 == 0, "attention head_dim must be even for RoPE")


class KVCache(NamedTuple):
    """Preallocated key/value buffers; ``pos`` tokens are filled. Buffers are written in place."""

    k: Tensor  # (B, Hkv, max_len, hd)
    v: Tensor  # (B, Hkv, max_len, hd)
    pos: int


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :h], x[..., h:]) by the position angles. x: (B, H, T, hd); cos/sin: (T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return y.to(x.dtype)


class AttentionMixer(Mixer):
    """Causal GQA + RoPE; one fused QKV projection and an output projection."""

    def __init__(self, cfg: AttentionConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim or dims.d_model // cfg.n_heads
        self.max_seq_len = dims.max_seq_len
        hd = self.head_dim
        self.qkv = nn.Linear(dims.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * hd, dims.d_model, bias=False)
        self.q_norm = RMSNorm(hd, dims.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, dims.norm_eps) if cfg.qk_norm else None
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) projections; ``out_proj`` writes into the residual stream, so it is scaled by
        1/sqrt(2 n_layers) (GPT-2); q/k norm gains start at 1."""
        nn.init.normal_(self.qkv.weight, 0.0, self.dims.init_std)
        nn.init.normal_(self.out_proj.weight, 0.0, self.dims.out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def flops(self, seq_len: int) -> dict[str, float]:
        """Projections, plus ``QK^T`` and ``AV`` over the causal half: 2 * H * hd * T (T + 1) / 2."""
        T = seq_len
        return {"proj": self.linear_flops(T), "attention": 2 * self.n_heads * self.head_dim * T * (T + 1) / 2}

    def _rope(self, start: int, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t = torch.arange(start, start + T, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (T, hd/2)
        return freqs.cos(), freqs.sin()

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype), 0)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> MixerOutput:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        start = 0 if cache is None else cache.pos
        if start + T > (self.max_seq_len if cache is None else cache.k.shape[2]):
            limit = self.max_seq_len if cache is None else cache.k.shape[2]
            raise ValueError(f"sequence of {start + T} tokens exceeds the attention limit of {limit} (max_seq_len / cache size)")
        cos, sin = self._rope(start, T, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
            new_cache = None
        else:
            end = start + T
            cache.k[:, :, start:end] = k.to(cache.k.dtype)
            cache.v[:, :, start:end] = v.to(cache.v.dtype)
            keys, values = cache.k[:, :, :end].to(q.dtype), cache.v[:, :, :end].to(q.dtype)
            if T == 1:
                mask = None  # a single new query may see every cached key
            else:  # query i sits at absolute position start + i
                qpos = torch.arange(start, end, device=x.device)[:, None]
                mask = torch.arange(end, device=x.device)[None, :] <= qpos  # (T, end)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != Hkv)
            new_cache = KVCache(cache.k, cache.v, end)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H*hd)
        return MixerOutput(self.out_proj(y), new_cache)


register_family(FamilySpec(letter="A", name="attention", colour="#1f77b4", config_key="attention",
                           config=AttentionConfig, mixer=AttentionMixer,
                           summary="causal grouped-query attention with RoPE and a KV cache"))
