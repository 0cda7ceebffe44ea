"""D family: multi-head latent attention (MLA), DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient
Mixture-of-Experts Language Model" (2024, arXiv 2405.04434), as DeepSeek-V3 (arXiv 2412.19437) and Kimi Linear
(arXiv 2510.26692) use it.

Keys and values of all heads are decompressed from one latent per token, so decoding caches the latent
(``kv_lora_rank`` numbers) and one shared rotary key part (``qk_rope_head_dim``) instead of ``2 H hd``::

    q            = q_b(norm(q_a(x)))  (or one q_proj)          (H, nope + rope) per token
    c, k_pe      = kv_a(x);  c = norm(c)                      c: the latent; k_pe: one key part shared by the heads
    k_nope, v    = kv_b(c)                                    (H, nope), (H, v_head_dim)
    q_pe, k_pe   = RoPE(q_pe), RoPE(k_pe)                     the decoupled position part (none in Kimi Linear)
    y            = softmax([q_nope | q_pe] . [k_nope | k_pe] * scale) v;  out_proj(y)

Training runs the decompressed form through ``scaled_dot_product_attention``. Decoding absorbs ``kv_b`` into the
query and the output (the paper's section 2.1.3): ``q_nope . k_nope = (W_uk^T q_nope) . c`` and ``y = W_uv (p . c)``,
so each step attends over the cached latents as one shared key/value head ``[c | k_pe]`` and ``c``; the cache holds
``kv_lora_rank + qk_rope_head_dim`` numbers per token and layer.

With YaRN (``yarn_factor``), the rotary frequencies are YaRN's, the rotated parts are scaled by YaRN's attention
factor and the softmax scale by ``mscale(factor, yarn_mscale_all_dim)^2`` (DeepSeek-V3), see :mod:`amer.ops.rope`.

Checkpoint layout (transformers ``DeepseekV3Attention``, ``KimiLinearAttention``): ``q_a_proj``,
``q_a_layernorm`` -> ``q_a_norm``, ``q_b_proj`` (or ``q_proj``), ``kv_a_proj_with_mqa`` -> ``kv_a_proj``,
``kv_a_layernorm`` -> ``kv_a_norm``, ``kv_b_proj``, ``o_proj`` -> ``out_proj``. DeepSeek-V3's interleaved rotary
layout (``rope_interleave``) is this block's half-split layout after permuting the rotary rows of ``q_b_proj``
(each head's) and ``kv_a_proj`` to even dims first: both sides of every dot product move together, so the scores
are unchanged (:func:`deinterleave_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.attention import DOC_QUERY_BLOCK
from amer.blocks.common import Mixer, MixerOutput, RMSNorm
from amer.blocks.doc_ids import DocIds
from amer.config import Dims
from amer.configio import check, opt
from amer.families import FamilySpec, register_family
from amer.ops.fused import cast
from amer.ops.rope import rope_inv_freq, yarn_inv_freq, yarn_mscale
from amer.pattern import LayerSpec

__all__ = ["MLAConfig", "MLACache", "MLAMixer", "deinterleave_rows"]


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (the D family), DeepSeek-V2 (arXiv 2405.04434)."""

    n_heads: int = opt(4, "MLA query heads (each with its own keys and values decompressed from the latent)", ge=1)
    q_lora_rank: int = opt(0, "MLA query down-projection rank, D -> rank -> heads (DeepSeek-V3: 1536); 0: one "
                           "full-rank query projection", ge=0)
    kv_lora_rank: int = opt(64, "MLA latent width: the compressed keys and values the decoding cache stores "
                            "(DeepSeek-V3: 512)", ge=1)
    qk_nope_head_dim: int = opt(32, "MLA query/key head width without position encoding (DeepSeek-V3: 128)", ge=1)
    qk_rope_head_dim: int = opt(16, "MLA width of the decoupled rotary query/key part, its key part shared by all "
                                "heads (DeepSeek-V3: 64; even)", ge=2)
    v_head_dim: int = opt(32, "MLA value head width (DeepSeek-V3: 128)", ge=1)
    rope: bool = opt(True, "rotate the decoupled part by RoPE (Kimi Linear: false, its shared key part carries no "
                     "position)")
    rope_theta: float = opt(10000.0, "MLA RoPE base frequency", gt=0)
    yarn_factor: float | None = opt(None, "YaRN context extension factor (DeepSeek-V3: 40; default plain RoPE)", gt=0)
    yarn_original: int = opt(4096, "YaRN: the pretraining context length", ge=1)
    yarn_beta_fast: float = opt(32.0, "YaRN: frequencies turning more often than this over the pretraining context "
                                "are kept", gt=0)
    yarn_beta_slow: float = opt(1.0, "YaRN: frequencies turning less often than this are divided by the factor",
                                gt=0)
    yarn_mscale: float = opt(1.0, "YaRN: mscale of the rotated part's attention factor")
    yarn_mscale_all_dim: float = opt(0.0, "YaRN: mscale of the whole softmax scale, applied squared (DeepSeek-V3: 1; "
                                     "0: none, and the attention factor is mscale(factor, 1))")
    scale: float | None = opt(None, "MLA softmax scale (default (nope + rope)^-1/2 with YaRN's correction)", gt=0)
    bias: bool = opt(False, "biases on the query down-projection, the latent projection and the output projection "
                     "(attention_bias)")
    norm_eps: float | None = opt(None, "epsilon of the latent RMSNorms (default the model's norm-eps; DeepSeek and "
                                 "Kimi: 1e-6)", gt=0)

    def __post_init__(self) -> None:
        check(self.qk_rope_head_dim % 2 == 0,
              f"mla.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")


class MLACache(NamedTuple):
    """Preallocated latents, ``pos`` tokens filled (written in place, as the A family's KV buffers)."""

    latent: Tensor  # (B, max_len, kv_lora_rank + qk_rope_head_dim): normed latent | rotated shared key part
    pos: int


def deinterleave_rows(w: Tensor, rope: int) -> Tensor:
    """Rows of a projection whose trailing ``rope`` outputs (per group of rows) are laid out in interleaved pairs
    (x0, x1), (x2, x3), ... reordered to the half-split layout (x0, x2, ... | x1, x3, ...). ``w`` (G, n, ...) with
    the rotary outputs last in each group's ``n`` rows."""
    order = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    nope = w.shape[1] - rope
    return torch.cat([w[:, :nope], w[:, nope:][:, order]], dim=1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Turn pairs (x[..., :h], x[..., h:]) by the angles, in the angles' precision."""
    x1, x2 = cast(x, cos.dtype).chunk(2, dim=-1)
    return cast(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1), x.dtype)


class MLAMixer(Mixer):
    """Multi-head latent attention: decompressed heads in training, the absorbed latent form in decoding."""

    document_mask = True

    def __init__(self, cfg: MLAConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.cfg = cfg
        H, D = cfg.n_heads, dims.d_model
        self.H, self.nope, self.rot, self.vd, self.R = (H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                                                        cfg.kv_lora_rank)
        self.qk = self.nope + self.rot
        self.max_seq_len = dims.max_seq_len
        eps = cfg.norm_eps if cfg.norm_eps is not None else dims.norm_eps
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, eps, dims.norm_offset)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * self.qk, bias=False)
        self.kv_a_proj = nn.Linear(D, self.R + self.rot, bias=cfg.bias)
        self.kv_a_norm = RMSNorm(self.R, eps, dims.norm_offset)
        self.kv_b_proj = nn.Linear(self.R, H * (self.nope + self.vd), bias=False)
        self.out_proj = nn.Linear(H * self.vd, D, bias=cfg.bias)
        scale = cfg.scale if cfg.scale is not None else self.qk ** -0.5
        self.rope_factor = 1.0  # YaRN's attention factor on the rotated parts
        if cfg.yarn_factor is not None:
            f = cfg.yarn_factor
            self.rope_factor = (yarn_mscale(f, cfg.yarn_mscale) / yarn_mscale(f, cfg.yarn_mscale_all_dim)
                                if cfg.yarn_mscale and cfg.yarn_mscale_all_dim else yarn_mscale(f))
            if cfg.scale is None and cfg.yarn_mscale_all_dim:
                scale = scale * yarn_mscale(f, cfg.yarn_mscale_all_dim) ** 2
        self.scale = scale
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.reset_parameters()

    def _inv_freq(self) -> Tensor:
        c = self.cfg
        if c.yarn_factor is None:
            return rope_inv_freq(self.rot, c.rope_theta)
        return yarn_inv_freq(self.rot, c.rope_theta, c.yarn_factor, c.yarn_original, c.yarn_beta_fast, c.yarn_beta_slow)

    def init_buffers(self, device: torch.device | str = "cpu") -> None:
        """Recompute the RoPE frequencies (not saved with the weights) on ``device``."""
        self.inv_freq = self._inv_freq().to(device)

    def reset_parameters(self) -> None:
        """Projections N(0, init_std), the residual-writing ``out_proj`` N(0, out_std), biases 0, norm gains 1."""
        for lin in self.modules():
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, 0.0, self.dims.out_std if lin is self.out_proj else self.dims.init_std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            elif isinstance(lin, RMSNorm):
                lin.reset_parameters()

    def flops(self, seq_len: int) -> dict[str, float]:
        """Projections, plus ``QK^T`` (width nope + rope) and ``AV`` (width v) over the causal half, per head, as in
        training (decoding's absorbed form trades them for the latent width)."""
        pairs = seq_len * (seq_len + 1) / 2
        return {"proj": self.linear_flops(seq_len), "attention": float(self.H * (self.qk + self.vd) * pairs)}

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> MLACache:
        return MLACache(torch.zeros(batch_size, max_len, self.R + self.rot, device=device, dtype=dtype), 0)

    def _angles(self, x: Tensor, start: int, T: int, doc_ids: DocIds | None) -> tuple[Tensor, Tensor]:
        """cos, sin of the rotary angles in fp32 at least (fp64 inputs keep fp64), times YaRN's factor."""
        acc = torch.promote_types(x.dtype, torch.float32)
        inv = self.inv_freq.to(device=x.device, dtype=acc)
        if doc_ids is not None:  # positions restart at each packed document: (B, 1, T, rope / 2)
            freqs = (doc_ids.position.to(acc).unsqueeze(-1) * inv).unsqueeze(1)
        else:
            freqs = torch.outer(torch.arange(start, start + T, device=x.device, dtype=acc), inv)  # (T, rope / 2)
        cos, sin = freqs.cos(), freqs.sin()
        return (cos, sin) if self.rope_factor == 1 else (cos * self.rope_factor, sin * self.rope_factor)

    def _queries(self, x: Tensor) -> Tensor:
        if self.cfg.q_lora_rank:
            return self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        return self.q_proj(x)

    def forward(self, x: Tensor, cache: MLACache | None = None, doc_ids: DocIds | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y, cache). Packed documents (``doc_ids``, training path): each token attends
        within its own document and its rotary position counts from the document's start."""
        B, T, _ = x.shape
        H, nope, rot, vd, R = self.H, self.nope, self.rot, self.vd, self.R
        start = 0 if cache is None else cache.pos
        limit = self.max_seq_len if cache is None else cache.latent.shape[1]
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} tokens exceeds the MLA limit of {limit} "
                             "(max_seq_len / cache size)")
        if doc_ids is not None and cache is not None:
            raise ValueError("mla: packed documents apply to the training path, not to a decoding cache")
        q = self._queries(x).view(B, T, H, self.qk).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_pe = q.split([nope, rot], dim=-1)
        c, k_pe = self.kv_a_proj(x).split([R, rot], dim=-1)
        c = self.kv_a_norm(c)  # (B, T, R)
        k_pe = k_pe.unsqueeze(1)  # (B, 1, T, rope): one key part for every head
        if self.cfg.rope:
            cos, sin = self._angles(x, start, T, doc_ids)
            q_pe, k_pe = _rope(q_pe, cos, sin), _rope(k_pe, cos, sin)
        if cache is None:
            k_nope, v = self.kv_b_proj(c).view(B, T, H, nope + vd).transpose(1, 2).split([nope, vd], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(B, H, T, rot)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            if doc_ids is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            else:
                y = self._attend_documents(q, k, v, doc_ids)
            new_cache = None
        else:
            end = start + T
            cache.latent[:, start:end] = cast(torch.cat([c, k_pe[:, 0]], dim=-1), cache.latent.dtype)
            latent = cast(cache.latent[:, None, :end], x.dtype)  # (B, 1, S, R + rope)
            w = self.kv_b_proj.weight.view(H, nope + vd, R)
            q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w[:, :nope])  # W_uk absorbed into the query
            mask = None
            if T > 1:  # query i sits at absolute position start + i
                mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
            o = F.scaled_dot_product_attention(torch.cat([q_lat, q_pe], dim=-1), latent, latent[..., :R],
                                               attn_mask=mask, scale=self.scale, enable_gqa=True)  # (B, H, T, R)
            y = torch.einsum("bhtr,hvr->bhtv", o, w[:, nope:])  # W_uv absorbed into the output
            new_cache = MLACache(cache.latent, end)
        return MixerOutput(self.out_proj(y.transpose(1, 2).reshape(B, T, H * vd)), new_cache)

    def _attend_documents(self, q: Tensor, k: Tensor, v: Tensor, doc_ids: DocIds) -> Tensor:
        """Causal attention within each packed document, queries in blocks of DOC_QUERY_BLOCK against the keys up
        to each block's end (the block-diagonal mask shared by every attention layer of the forward)."""
        T = q.shape[2]
        outs = []
        for s in range(0, T, DOC_QUERY_BLOCK):  # a fixed count per shape, not per token
            e = min(s + DOC_QUERY_BLOCK, T)
            outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e],
                                                       attn_mask=doc_ids.attention_mask(s, e, q.dtype),
                                                       scale=self.scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


register_family(FamilySpec(letter="D", name="mla", colour="#8c564b", config_key="mla", config=MLAConfig,
                           mixer=MLAMixer, summary="multi-head latent attention (DeepSeek-V2/V3); latent KV cache"))
