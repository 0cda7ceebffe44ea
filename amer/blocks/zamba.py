"""Zamba2's hybrid layer (the H family): a shared transformer whose output feeds a Mamba-2's input.

Zamba2 (Glorioso et al. 2024, arXiv 2411.15242; Zamba, arXiv 2405.16712) applies a few shared attention + MLP blocks
at many depths of a Mamba-2 stack. Its hybrid layer does not add the transformer's output to the residual stream:

    t = W_use . mlp(norm2(attn(norm1(concat(x, e)))))      e: the embedding output, attn: 2D -> D
    x = x + mamba(norm(x + t))

so the unit is one family (the pattern ``M H:a M M H:b``...), with ``x + mixer(x)`` as its block (``owns_norm``). The
transformer (its two norms, attention and MLP) is what a share name shares; the per-use LoRA adapters on q/k/v and
on the MLP's gate/up projection, the per-use linear ``W_use``, and the Mamba-2 with its norm belong to each use
(``Mixer.per_use``). The Mamba-2 is the M family's mixer built from ``[model.mamba]`` (this family's companion);
``companion = "mamba1"`` runs the S family's (multi-head) Mamba-1 from ``[model.mamba1]`` instead, as Zamba does.

The attention reads 2D channels, so its heads are 2D / n_heads wide; Zamba2 scales the scores by
1 / sqrt(head_dim / 2), the width one half of the concatenation gives a head. Decoding keeps a KV cache for the
attention and the Mamba-2's O(1) state, one per use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.attention import KVCache, apply_rope
from amer.blocks.common import Mixer, MixerOutput, RMSNorm
from amer.blocks.doc_ids import DocIds
from amer.blocks.mamba import MambaConfig
from amer.config import Dims
from amer.configio import check, opt
from amer.families import FamilySpec, families, register_family
from amer.ops.activation import activation
from amer.ops.doc_attention import document_attention, per_document
from amer.ops.fused import cast
from amer.ops.rope import rope_inv_freq
from amer.pattern import LayerSpec

__all__ = ["ZambaConfig", "ZambaCache", "ZambaMixer"]


@dataclass(frozen=True)
class ZambaConfig:
    """Zamba2's hybrid layer (the H family): shared attention + MLP on concat(stream, embedding), per-use adapters
    and linear, feeding an M-family Mamba-2."""

    n_heads: int = opt(4, "zamba attention heads (each 2 * d-model / n-heads wide)", ge=1)
    n_kv_heads: int | None = opt(None, "zamba attention key/value heads (default n-heads)", ge=1)
    d_ff: int | None = opt(None, "zamba MLP hidden width (default 4 * d-model)", ge=1)
    act: Literal["gelu", "gelu_tanh", "silu"] = opt("gelu", "zamba gated MLP activation: act(gate) * up")
    adapter_rank: int = opt(0, "zamba per-use LoRA rank on the MLP's gate/up projection (0: none)")
    attention_adapter: bool = opt(False, "zamba per-use LoRA adapters (adapter-rank) on the q/k/v projections")
    rope: bool = opt(False, "zamba rotary position embeddings in the shared attention (Zamba2's use_mem_rope)")
    rope_theta: float = opt(10000.0, "zamba RoPE base frequency", gt=0)
    companion: Literal["mamba", "mamba1"] = opt("mamba", "zamba state-space mixer after the transformer: mamba "
                                                "(Mamba-2, Zamba2) or mamba1 (Mamba-1, Zamba)")

    def __post_init__(self) -> None:
        check(self.companion in ("mamba", "mamba1"),
              f"zamba.companion must be 'mamba' or 'mamba1', got {self.companion!r}")
        check(self.act in ("gelu", "gelu_tanh", "silu"), f"zamba.act must be gelu, gelu_tanh or silu, got {self.act!r}")
        check(not self.attention_adapter or self.adapter_rank > 0,
              "zamba.attention_adapter needs zamba.adapter_rank >= 1")

    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def validate(self, dims: Dims) -> None:
        check((2 * dims.d_model) % self.n_heads == 0,
              f"zamba.n_heads ({self.n_heads}) must divide the attention width 2 * d_model ({2 * dims.d_model})")
        check(self.n_heads % self.kv_heads() == 0,
              f"zamba.n_kv_heads ({self.kv_heads()}) must divide zamba.n_heads ({self.n_heads})")
        check(not self.attention_adapter or self.kv_heads() == self.n_heads,
              "zamba.attention_adapter adds 2 * d_model wide adapters to k and v: it needs n_kv_heads == n_heads")


class ZambaCache(NamedTuple):
    """Decoding state of one use: the shared attention's keys and values, and the Mamba's state."""

    kv: KVCache
    mamba: Any  # the companion mixer's cache


def _lora(d_in: int, rank: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out, bias=False))


class ZambaMixer(Mixer):
    """Zamba2's hybrid layer; ``forward(x, cache, doc_ids, embed=e, parts=use_modules)``."""

    reads_embedding = True
    document_mask = True
    owns_norm = True
    per_use = ("q_adapter", "k_adapter", "v_adapter", "ff_adapter", "linear", "mamba_norm", "mamba")

    def __init__(self, cfg: ZambaConfig, dims: Dims, layer: LayerSpec, *, companion: Any = None) -> None:
        super().__init__(dims, layer)
        check(layer.branch is None, f"{layer.key} (layer {layer.index}): a zamba hybrid layer adds to the stream "
              "through its own Mamba-2, so it cannot be a branch of a parallel layer")
        self.cfg = cfg
        D, W = dims.d_model, 2 * dims.d_model
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads()
        self.head_dim = hd = W // cfg.n_heads
        self.scale = (hd / 2) ** -0.5
        self.d_ff = cfg.d_ff or 4 * D
        self.act = activation(cfg.act).fn
        self.in_norm = RMSNorm(W, dims.norm_eps, dims.norm_offset)
        self.qkv = nn.Linear(W, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, D, bias=False)
        self.ff_norm = RMSNorm(D, dims.norm_eps, dims.norm_offset)
        self.gate_up = nn.Linear(D, 2 * self.d_ff, bias=False)
        self.down = nn.Linear(self.d_ff, D, bias=False)
        r = cfg.adapter_rank
        self.q_adapter = _lora(W, r, self.n_heads * hd) if cfg.attention_adapter else None
        self.k_adapter = _lora(W, r, self.n_kv_heads * hd) if cfg.attention_adapter else None
        self.v_adapter = _lora(W, r, self.n_kv_heads * hd) if cfg.attention_adapter else None
        self.ff_adapter = _lora(D, r, 2 * self.d_ff) if r > 0 else None
        self.linear = nn.Linear(D, D, bias=False)
        self.mamba_norm = RMSNorm(D, dims.norm_eps, dims.norm_offset)
        self._mamba_cfg = companion or MambaConfig()
        # the companion's mixer class is the family's whose config it is (the registry knows every family)
        self._mamba_cls = next(f.mixer for f in families() if isinstance(self._mamba_cfg, f.config))
        self.mamba = self._mamba_cls(self._mamba_cfg, dims, layer)
        self.register_buffer("inv_freq", rope_inv_freq(hd, cfg.rope_theta), persistent=False)
        self.reset_parameters()

    def init_buffers(self, device: torch.device | str = "cpu") -> None:
        self.inv_freq = rope_inv_freq(self.head_dim, self.cfg.rope_theta).to(device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Shared part: N(0, init_std) projections, the residual-writing ones (``out_proj``, ``down``) at out_std,
        norm gains 1; then this mixer's own per-use part (:meth:`reset_parts`)."""
        for norm in (self.in_norm, self.ff_norm):
            if norm is not None:
                norm.reset_parameters()
        for lin, std in ((self.qkv, self.dims.init_std), (self.gate_up, self.dims.init_std),
                         (self.out_proj, self.dims.out_std), (self.down, self.dims.out_std)):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, std)
        self.reset_parts(self.own_parts())

    def own_parts(self) -> dict[str, nn.Module]:
        """The per-use modules this mixer holds itself (all of them, unless it is a shared block's)."""
        parts = {}
        for name in self.per_use:
            module = getattr(self, name)
            if module is not None:
                parts[name] = module
        return parts

    @torch.no_grad()
    def reset_parts(self, parts: Any) -> None:
        """A use's own modules: both LoRA factors N(0, init_std) as Zamba2 initialises them (a zero up-factor would
        leave the down-factor without a gradient at the first step), the linear at out_std (it writes into the
        Mamba-2's input), the Mamba-2 and its norm their own way."""
        for name, m in parts.items():
            if name.endswith("_adapter"):
                for lin in m:
                    nn.init.normal_(lin.weight, 0.0, self.dims.init_std)
            elif name == "linear":
                nn.init.normal_(m.weight, 0.0, self.dims.out_std)
            else:
                m.reset_parameters()

    def flops(self, seq_len: int) -> dict[str, float]:
        """Counted from the shapes, so a shared block and its uses report the same: the transformer's and the
        per-use projections, attention over the causal half, and the Mamba-2's own terms."""
        T, D, W, hd, r = seq_len, self.dims.d_model, 2 * self.dims.d_model, self.head_dim, self.cfg.adapter_rank
        H, Hkv, F_ = self.n_heads, self.n_kv_heads, self.d_ff
        proj = W * (H + 2 * Hkv) * hd + H * hd * D + D * 3 * F_ + D * D
        proj += (W * 3 * r + r * (H + 2 * Hkv) * hd if self.cfg.attention_adapter else 0) + (r * (D + 2 * F_))
        mamba = {f"mamba_{k}": v for k, v in self.mamba_module().flops(T).items()}
        return {"proj": float(T * proj), "attention": 2 * H * hd * T * (T + 1) / 2, **mamba}

    def mamba_module(self) -> Mixer:
        """A Mamba of this layer's shape (the mixer's own; a shared block's was taken out, so a fresh one on meta)."""
        if self.mamba is not None:
            return self.mamba
        with torch.device("meta"):
            return self._mamba_cls(self._mamba_cfg, self.dims, self.layer)

    def reads_document_mask(self, T: int, device: torch.device) -> bool:
        return not per_document(device, T, self.n_heads, self.n_kv_heads)

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> ZambaCache:
        device = device if device is not None else self.qkv.weight.device
        dtype = dtype if dtype is not None else self.qkv.weight.dtype
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        kv = KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype), 0)
        return ZambaCache(kv, self.mamba_module().init_cache(batch_size, max_len, device=device, dtype=dtype))

    def _attend(self, h: Tensor, cache: KVCache | None, doc_ids: DocIds | None,
                parts: Any) -> tuple[Tensor, KVCache | None]:
        B, T, _ = h.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(h).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        if "q_adapter" in parts:
            q, k, v = q + parts["q_adapter"](h), k + parts["k_adapter"](h), v + parts["v_adapter"](h)
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        start = 0 if cache is None else cache.pos
        if self.cfg.rope:
            pos = (doc_ids.position.to(torch.float32).unsqueeze(1) if doc_ids is not None
                   else torch.arange(start, start + T, device=h.device, dtype=torch.float32))
            freqs = pos.unsqueeze(-1) * self.inv_freq.to(h.device)  # (T, hd/2) or (B, 1, T, hd/2)
            q, k = apply_rope(q, freqs.cos(), freqs.sin()), apply_rope(k, freqs.cos(), freqs.sin())
        gqa = H != Hkv
        if cache is None and doc_ids is not None and not self.reads_document_mask(T, h.device):
            y = document_attention(q, k, v, doc_ids.index, self.scale)  # as the A family does
            return y.transpose(1, 2).reshape(B, T, H * hd), None
        if cache is None:
            mask = None if doc_ids is None else doc_ids.attention_mask(0, T, q.dtype)  # (B, 1, T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=gqa)
            return y.transpose(1, 2).reshape(B, T, H * hd), None
        end = start + T
        check(end <= cache.k.shape[2], f"zamba: {end} tokens exceed the decoding cache of {cache.k.shape[2]}")
        cache.k[:, :, start:end] = cast(k, cache.k.dtype)
        cache.v[:, :, start:end] = cast(v, cache.v.dtype)
        keys, values = cast(cache.k[:, :, :end], q.dtype), cast(cache.v[:, :, :end], q.dtype)
        mask = None if T == 1 else (torch.arange(end, device=h.device)[None, :]
                                    <= torch.arange(start, end, device=h.device)[:, None])
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(B, T, H * hd), KVCache(cache.k, cache.v, end)

    def forward(self, x: Tensor, cache: ZambaCache | None = None, doc_ids: DocIds | None = None, *,
                embed: Tensor | None = None, parts: Any = None) -> MixerOutput:
        """x (B, T, D), embed (B, T, D) -> MixerOutput(mamba(norm(x + t)), cache); the block adds x."""
        if embed is None:
            raise ValueError(f"{self.layer.key} (layer {self.layer.index}): a zamba layer reads the embedding "
                             "output; call it with embed=")
        if parts is None:
            parts = self.own_parts()
        h = self.in_norm(torch.cat([x, embed], dim=-1))  # (B, T, 2D)
        y, kv = self._attend(h, None if cache is None else cache.kv, doc_ids, parts)
        h = self.ff_norm(self.out_proj(y))  # no residual between attention and MLP, as in Zamba2
        gu = self.gate_up(h)
        if "ff_adapter" in parts:
            gu = gu + parts["ff_adapter"](h)
        gate, up = gu.chunk(2, dim=-1)
        t = parts["linear"](self.down(self.act(gate) * up))
        out = parts["mamba"](parts["mamba_norm"](x + t), None if cache is None else cache.mamba, doc_ids)
        new_cache = None if cache is None else ZambaCache(kv, out.cache)
        return MixerOutput(out.y, new_cache)


register_family(FamilySpec(letter="H", name="zamba", colour="#7f7f7f", config_key="zamba", config=ZambaConfig,
                           mixer=ZambaMixer, companion=("mamba", "mamba1"),
                           summary="Zamba2 hybrid layer: shared attention+MLP on concat(stream, embedding) feeding "
                                   "a Mamba-2 (or Mamba-1), per-use LoRA and linear"))
