"""A family: causal grouped-query attention with rotary position embeddings.

GQA (Ainslie et al. 2023, arXiv 2305.13245) shares each key/value head across
``n_heads / n_kv_heads`` query heads, shrinking the KV cache; RoPE (Su et al. 2021, arXiv
2104.09864) encodes absolute position as a rotation so attention scores depend on relative offsets.
The attention itself is ``F.scaled_dot_product_attention``, which picks the fused CPU/GPU kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import MixerOutput, RMSNorm, register_mixer
from amer.config import ModelConfig
from amer.pattern import Family, LayerSpec

__all__ = ["KVCache", "AttentionMixer", "apply_rope"]


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


@register_mixer(Family.ATTENTION)
class AttentionMixer(nn.Module):
    """Causal GQA + RoPE; one fused QKV projection and an output projection."""

    def __init__(self, cfg: ModelConfig, layer: LayerSpec) -> None:
        super().__init__()
        a = cfg.attention
        self.n_heads, self.n_kv_heads = a.n_heads, a.n_kv_heads
        self.head_dim = a.head_dim or cfg.d_model // a.n_heads
        self.max_seq_len = cfg.max_seq_len
        hd = self.head_dim
        self.qkv = nn.Linear(cfg.d_model, (a.n_heads + 2 * a.n_kv_heads) * hd, bias=False)
        self.out_proj = nn.Linear(a.n_heads * hd, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if a.qk_norm else None
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

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
