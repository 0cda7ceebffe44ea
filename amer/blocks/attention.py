"""A family: causal grouped-query attention with rotary position embeddings.

GQA (Ainslie et al. 2023, arXiv 2305.13245) shares each key/value head across
``n_heads / n_kv_heads`` query heads, shrinking the KV cache; RoPE (Su et al. 2021, arXiv
2104.09864) encodes absolute position as a rotation so attention scores depend on relative offsets.
The attention itself is ``F.scaled_dot_product_attention``, which picks the fused CPU/GPU kernel (flash or
memory-efficient on CUDA). On CUDA, packed documents and sliding windows go through ``flex_attention`` with a
block mask (:mod:`amer.ops.flex`) instead of a dense (T, T) mask; :mod:`amer.ops.kernels` picks and logs the
backend, and ``AMER_KERNELS=reference`` keeps the paths below on every device. ``output_gate`` is gated
attention (Qiu et al. 2025, arXiv 2505.06708): the heads' output times a sigmoid of the block input's projection.
"""

from __future__ import annotations

import math
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
from amer.ops import kernels
from amer.ops.doc_attention import SPLIT_MIN_MEAN, document_attention, per_document
from amer.ops.fused import cast
from amer.pattern import LayerSpec

__all__ = ["AttentionConfig", "KVCache", "AttentionMixer", "apply_rope", "softcapped_attention"]


@dataclass(frozen=True)
class AttentionConfig:
    """Causal grouped-query attention with RoPE (the A family)."""

    n_heads: int = opt(4, "attention query heads")
    n_kv_heads: int = opt(2, "attention key/value heads (grouped-query attention; divides n-heads)")
    head_dim: int | None = opt(None, "attention head width (default d-model / n-heads; must be even for RoPE)")
    rope_theta: float = opt(10000.0, "RoPE base frequency")
    qk_norm: bool = opt(False, "RMS-normalise queries and keys before the dot product")
    qk_norm_scope: Literal["head", "projection"] = opt(
        "head", "what one q/k norm spans: each head's width (Qwen3, LFM2) or the whole query and key projections, "
        "all heads together, with one gain per channel (OLMo 2, OLMo-Hybrid)")
    qkv_bias: bool = opt(False, "add a bias to the query/key/value projection (Qwen2, Llama attention-bias)")
    out_bias: bool = opt(False, "add a bias to the attention output projection")
    rope_fraction: float = opt(1.0, "share of each head's width rotated by RoPE (leading dims; 0: no position "
                               "encoding at all)", ge=0, le=1)
    rope_scale_factor: float | None = opt(None, "Llama 3.1 RoPE scaling: long wavelengths divided by this factor, "
                                          "short ones kept, a smooth blend between (default: plain RoPE)", gt=0)
    rope_scale_low: float = opt(1.0, "Llama 3.1 RoPE scaling: low-frequency factor", gt=0)
    rope_scale_high: float = opt(4.0, "Llama 3.1 RoPE scaling: high-frequency factor", gt=0)
    rope_scale_original: int = opt(8192, "Llama 3.1 RoPE scaling: the pretraining context length", ge=1)
    output_gate: bool = opt(False, "scale the attention output per channel by sigmoid of its own projection of the "
                            "block input (gated attention, Qiu et al. 2025; Qwen3-Next)")
    window: int | None = opt(None, "sliding-window attention: each token sees itself and the window - 1 tokens "
                             "before it (Mistral; default: the whole causal past)", ge=1)
    scale: float | None = opt(None, "softmax scale of the query-key products (default 1 / sqrt(head-dim))", gt=0)
    softcap: float | None = opt(None, "cap the scaled query-key products smoothly to (-c, c) as c * tanh(s / c) before "
                                "the softmax (Gemma 2; attention then runs on an explicit score matrix)", gt=0)
    rope_linear_factor: float | None = opt(None, "linear RoPE scaling (position interpolation, Chen et al. 2023): "
                                           "every frequency divided by this factor (Gemma 3's global layers)", gt=0)

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
        check(self.rope_scale_high > self.rope_scale_low, "attention.rope_scale_high must exceed rope_scale_low")
        check(self.qk_norm_scope in ("head", "projection"),
              f"attention.qk_norm_scope must be 'head' or 'projection', got {self.qk_norm_scope!r}")
        check(self.rope_linear_factor is None or self.rope_scale_factor is None,
              "attention: rope_linear_factor and rope_scale_factor (Llama 3.1) are two scalings; set one")

    def validate(self, dims: Dims) -> None:
        """Checks that need the shared dimensions (run when the pattern has A blocks)."""
        if self.head_dim is None:
            check(dims.d_model % self.n_heads == 0,
                  f"d_model ({dims.d_model}) must be divisible by attention.n_heads ({self.n_heads}) "
                  "or set attention.head_dim")
        hd = self.head_dim or dims.d_model // self.n_heads
        check(rope_width(hd, self.rope_fraction) % 2 == 0,
              f"attention: the rotated width (head_dim {hd} * rope_fraction {self.rope_fraction}) must be even "
              "for RoPE")


def rope_width(head_dim: int, fraction: float) -> int:
    """Leading dims of a head that RoPE rotates (transformers' ``partial_rotary_factor`` convention)."""
    return int(head_dim * fraction)


class KVCache(NamedTuple):
    """Preallocated key/value buffers; ``pos`` tokens are filled. Buffers are written in place."""

    k: Tensor  # (B, Hkv, max_len, hd)
    v: Tensor  # (B, Hkv, max_len, hd)
    pos: int


# Packed documents (the strategy is measured; :mod:`amer.ops.doc_attention` has the figures):
# - on CPU, rows of doc_attention.MIN_LEN tokens or more, eager or compiled: one causal-kernel call per document;
# - shorter rows: one call with the block-diagonal causal mask (many small calls lose the batch's parallelism);
# - off the CPU without flex (XLA), with a sliding window or a soft cap: queries in blocks of DOC_QUERY_BLOCK,
#   each against the keys up to its own end, so the masked work stays near the causal triangle; eager on CPU
#   with a soft cap and rows longer than a block, one soft-capped call per document (SPLIT_MIN_MEAN tokens or
#   more per document on average).
DOC_QUERY_BLOCK = 512


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., :h], x[..., h:]) by the position angles. x: (B, H, T, hd); cos/sin: (T, hd/2),
    or (B, 1, T, hd/2) for per-row positions."""
    x1, x2 = cast(x, torch.float32).chunk(2, dim=-1)
    y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return cast(y, x.dtype)


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, cap: float) -> Tensor:
    """Attention whose scaled scores are capped as ``cap * tanh(s / cap)`` before the mask and the softmax (Gemma 2,
    Team et al. 2024, arXiv 2408.00118). q (B, H, Q, hd), k/v (B, Hkv, K, hd); ``mask`` bool (True: visible) or
    additive, broadcast to (B, H, Q, K). Scores and softmax in fp32 at least."""
    if k.shape[1] != q.shape[1]:  # grouped heads: each KV head serves H / Hkv query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    s = torch.tanh(s / cap) * cap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(acc)
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)


class AttentionMixer(Mixer):
    """Causal GQA + RoPE; one fused QKV projection and an output projection."""

    document_mask = True

    def __init__(self, cfg: AttentionConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim or dims.d_model // cfg.n_heads
        self.max_seq_len = dims.max_seq_len
        hd = self.head_dim
        self.qkv = nn.Linear(dims.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.n_heads * hd, dims.d_model, bias=cfg.out_bias)
        # gated attention: a per-channel sigmoid gate on the heads' output (its bias follows the query's)
        self.gate = nn.Linear(dims.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias) if cfg.output_gate else None
        self.rot = rope_width(hd, cfg.rope_fraction)  # leading dims rotated; the rest carry no position
        self.window, self.scale, self.softcap = cfg.window, cfg.scale, cfg.softcap
        # per head: one (hd,) gain shared by the heads; per projection: the (H hd,) / (Hkv hd,) projections normed whole
        self.norm_whole = cfg.qk_norm_scope == "projection"
        q_width, k_width = (cfg.n_heads * hd, cfg.n_kv_heads * hd) if self.norm_whole else (hd, hd)
        self.q_norm = RMSNorm(q_width, dims.norm_eps, dims.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, dims.norm_eps, dims.norm_offset) if cfg.qk_norm else None
        self.rope_theta, self.cfg_rope = cfg.rope_theta, cfg
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.reset_parameters()

    def _inv_freq(self) -> Tensor:
        rot = max(self.rot, 2)  # a rotated width of 0 keeps a (never used) buffer of one frequency
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        c = self.cfg_rope
        if c.rope_linear_factor is not None:
            return inv / c.rope_linear_factor
        if c.rope_scale_factor is None:
            return inv
        # Llama 3.1 (Meta, "The Llama 3 Herd of Models", 2024): wavelengths above original / low are stretched by
        # the factor, those below original / high kept, and the band between blended linearly in original / wavelen
        wavelen = 2 * math.pi / inv
        smooth = ((c.rope_scale_original / wavelen - c.rope_scale_low) / (c.rope_scale_high - c.rope_scale_low))
        blended = (1 - smooth.clamp(0, 1)) * inv / c.rope_scale_factor + smooth.clamp(0, 1) * inv
        return torch.where(wavelen < c.rope_scale_original / c.rope_scale_high, inv,
                           torch.where(wavelen > c.rope_scale_original / c.rope_scale_low, inv / c.rope_scale_factor,
                                       blended))

    def init_buffers(self, device: torch.device | str = "cpu") -> None:
        """Recompute the RoPE frequencies (not saved with the weights) on ``device``: a model built on the meta
        device and given its weights by assignment has none."""
        self.inv_freq = self._inv_freq().to(device)

    def reset_parameters(self) -> None:
        """N(0, init_std) projections; ``out_proj`` writes into the residual stream, so it is scaled by
        1/sqrt(2 n_layers) (GPT-2); q/k norm gains start at 1."""
        nn.init.normal_(self.qkv.weight, 0.0, self.dims.init_std)
        nn.init.normal_(self.out_proj.weight, 0.0, self.dims.out_std)
        for lin in (self.qkv, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, 0.0, self.dims.init_std)
            if self.gate.bias is not None:
                nn.init.zeros_(self.gate.bias)

    def device_note(self, device_type: str) -> str | None:
        if self.softcap is not None and device_type != "cpu":
            return ("attention.softcap: scores are capped on an explicit (T, T) matrix per head; no fused attention "
                    "kernel (flash, flex) runs for these layers")
        return None

    def flops(self, seq_len: int) -> dict[str, float]:
        """Projections, plus ``QK^T`` and ``AV`` over the causal half: 2 * H * hd * T (T + 1) / 2 (fewer pairs with
        a sliding window)."""
        T = seq_len
        w = T if self.window is None else min(self.window, T)  # keys per query once the window is full
        pairs = w * (w + 1) / 2 + (T - w) * w
        return {"proj": self.linear_flops(T), "attention": 2 * self.n_heads * self.head_dim * pairs}

    def _rope(self, start: int, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t = torch.arange(start, start + T, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (T, hd/2)
        return freqs.cos(), freqs.sin()

    def _rope_decoding(self, start: int, T: int, cache_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The angles of positions ``start .. start + T`` read from a table of the cache's whole length, built
        once per cache size and device: a decoding step would otherwise spend four ops per block on them."""
        table = getattr(self, "_rope_table", None)
        key = (cache_len, device, self.inv_freq.dtype)
        if table is None or table[0] != key:
            table = (key, self._rope(0, cache_len, device))
            self._rope_table = table
        cos, sin = table[1]
        return cos[start:start + T], sin[start:start + T]

    def _rope_at(self, position: Tensor) -> tuple[Tensor, Tensor]:
        """Angles for per-token positions (B, T): (B, 1, T, hd/2), broadcast over heads."""
        freqs = position.to(torch.float32).unsqueeze(-1) * self.inv_freq.to(position.device)  # (B, T, hd/2)
        return freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """RoPE on the leading ``rot`` dims of each head (all of them by default, none at rope_fraction 0)."""
        if self.rot == self.head_dim:
            return apply_rope(x, cos, sin)
        if self.rot == 0:
            return x
        return torch.cat((apply_rope(x[..., :self.rot], cos, sin), x[..., self.rot:]), dim=-1)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """``scaled_dot_product_attention`` with this layer's scale and grouped heads; with a soft cap, the same
        attention over an explicit score matrix (no fused kernel caps the scores before the softmax)."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        if causal:
            mask = self._band(k.shape[2] - q.shape[2], k.shape[2], q.device)
        return softcapped_attention(q, k, v, mask, self.scale or q.shape[-1] ** -0.5, self.softcap)

    def _band(self, q_start: int, q_end: int, device: torch.device) -> Tensor:
        """Bool (Q, q_end): key j is visible to query i (absolute positions) when j <= i and, with a sliding
        window, i - j < window."""
        rows = torch.arange(q_start, q_end, device=device)[:, None]
        cols = torch.arange(q_end, device=device)[None, :]
        allowed = cols <= rows
        return allowed if self.window is None else allowed & (rows - cols < self.window)

    def reads_document_mask(self, T: int, device: torch.device) -> bool:
        return not (self.window is None and self.softcap is None
                    and per_document(device, T, self.n_heads, self.n_kv_heads))

    def _attend_documents(self, q: Tensor, k: Tensor, v: Tensor, doc_ids: DocIds) -> Tensor:
        """Causal attention within each packed document: (B, H, T, hd); the strategy is chosen as measured
        (see DOC_QUERY_BLOCK)."""
        B, T = q.shape[0], q.shape[2]
        if not self.reads_document_mask(T, q.device):
            return document_attention(q, k, v, doc_ids.index, self.scale)
        if q.device.type == "cpu" and T > DOC_QUERY_BLOCK and self.window is None and not torch.compiler.is_compiling():
            lengths = doc_ids.lengths()  # a soft cap (no fused kernel caps scores), or grouped heads before torch 2.9
            if sum(map(len, lengths)) * SPLIT_MIN_MEAN <= B * T:
                return self._attend_split(q, k, v, lengths)
        outs = []
        for start in range(0, T, DOC_QUERY_BLOCK):  # T / 512 calls: a fixed count per shape, not per token
            end = min(start + DOC_QUERY_BLOCK, T)
            mask = doc_ids.attention_mask(start, end, q.dtype)  # (B, 1, Q, end)
            if self.window is not None:  # positions within a document differ as they do in the row
                mask = mask.masked_fill(~self._band(start, end, q.device), float("-inf"))
            outs.append(self._sdpa(q[:, :, start:end], k[:, :, :end], v[:, :, :end], mask=mask))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _attend_flex(self, q: Tensor, k: Tensor, v: Tensor, doc_ids: DocIds | None) -> Tensor:
        """Block-sparse causal attention within documents and the window (CUDA); the block mask is built once per
        forward and shared by the layers with the same window."""
        from amer.ops.flex import document_block_mask, flex_attend  # flex_attention: only where it is picked

        T = q.shape[2]
        index = None if doc_ids is None else doc_ids.index

        def build() -> object:
            return document_block_mask(index, T, self.window, q.device)

        mask = build() if doc_ids is None else doc_ids.cached(("flex", T, self.window), build)
        return flex_attend(q, k, v, mask, self.scale, self.n_heads != self.n_kv_heads)

    def _attend_split(self, q: Tensor, k: Tensor, v: Tensor, lengths: list[list[int]]) -> Tensor:
        """One soft-capped call per document. unbind/split/cat/stack, not slicing: their backward is one
        concatenation, where every slice's backward would allocate a full-size zero gradient."""
        rows = []
        for qr, kr, vr, lens in zip(q.unbind(0), k.unbind(0), v.unbind(0), lengths):
            parts = [self._sdpa(qd[None], kd[None], vd[None], causal=True)[0]
                     for qd, kd, vd in zip(qr.split(lens, 1), kr.split(lens, 1), vr.split(lens, 1))]
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return torch.stack(rows)

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                       0)

    def forward(self, x: Tensor, cache: KVCache | None = None, doc_ids: DocIds | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y, cache). With packed documents (``doc_ids``, training path), each token attends
        only to its own document's earlier tokens and its rotary position counts from the document's start."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        start = 0 if cache is None else cache.pos
        if start + T > (self.max_seq_len if cache is None else cache.k.shape[2]):
            limit = self.max_seq_len if cache is None else cache.k.shape[2]
            raise ValueError(f"sequence of {start + T} tokens exceeds the attention limit of {limit} "
                             "(max_seq_len / cache size)")
        if doc_ids is not None and cache is not None:
            raise ValueError("attention: packed documents apply to the training path, not to a decoding cache")
        if doc_ids is not None:
            cos, sin = self._rope_at(doc_ids.position)
        elif cache is not None:
            cos, sin = self._rope_decoding(start, T, cache.k.shape[2], x.device)
        else:
            cos, sin = self._rope(start, T, x.device)
        qkv = self.qkv(x)
        v = qkv[..., (H + Hkv) * hd:].view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.q_norm is None:  # queries and keys rotated together: one set of RoPE ops instead of two
            qk = qkv[..., :(H + Hkv) * hd].view(B, T, H + Hkv, hd).transpose(1, 2)  # (B, H + Hkv, T, hd)
            q, k = self._rotate(qk, cos, sin).split([H, Hkv], dim=1)
        elif self.norm_whole:  # the norms see all heads of the projection at once, before the split into heads
            q = self.q_norm(qkv[..., :H * hd]).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_norm(qkv[..., H * hd:(H + Hkv) * hd]).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        else:
            q = qkv[..., :H * hd].view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k = qkv[..., H * hd:(H + Hkv) * hd].view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
            q, k = self._rotate(self.q_norm(q), cos, sin), self._rotate(self.k_norm(k), cos, sin)
        if cache is None and self.softcap is None and (doc_ids is not None or (self.window is not None
                                                                           and self.window < T)) \
                and kernels.attention_backend(x.device, documents=doc_ids is not None) == "flex":
            y = self._attend_flex(q, k, v, doc_ids)
            new_cache = None
        elif cache is None and doc_ids is not None:
            y = self._attend_documents(q, k, v, doc_ids)
            new_cache = None
        elif cache is None and (self.window is None or self.window >= T):
            if x.device.type == "cuda":
                kernels.attention_backend(x.device, documents=False)  # logs the choice: SDPA's flash / efficient
            y = self._sdpa(q, k, v, causal=True)
            new_cache = None
        elif cache is None:
            y = self._sdpa(q, k, v, mask=self._band(0, T, x.device))
            new_cache = None
        else:
            end = start + T
            cache.k[:, :, start:end] = cast(k, cache.k.dtype)
            cache.v[:, :, start:end] = cast(v, cache.v.dtype)
            keys, values = cast(cache.k[:, :, :end], q.dtype), cast(cache.v[:, :, :end], q.dtype)
            if T == 1 and (self.window is None or end <= self.window):
                mask = None  # a single new query may see every cached key
            else:  # query i sits at absolute position start + i
                mask = self._band(start, end, x.device)  # (T, end)
            y = self._sdpa(q, keys, values, mask=mask)
            new_cache = KVCache(cache.k, cache.v, end)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H*hd)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x))
        return MixerOutput(self.out_proj(y), new_cache)


register_family(FamilySpec(letter="A", name="attention", colour="#1f77b4", config_key="attention",
                           config=AttentionConfig, mixer=AttentionMixer,
                           summary="causal grouped-query attention with RoPE and a KV cache"))
