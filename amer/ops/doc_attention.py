"""Causal attention within packed documents on CPU: one fused-kernel call per document.

A row of ``T`` tokens packed with documents of lengths ``l_i`` needs ``sum_i l_i^2 / 2`` query-key products;
one call with the block-diagonal causal mask computes the whole ``T^2`` square (on this CPU the causal kernel
was no faster than the masked one either: 38.1 vs 40.6 ms at 4 x 512 in one run). Calling the causal kernel once
per document does only the needed work: fwd + bwd of the attention alone, documents of ~96 tokens, 8 heads, 2 KV
heads, width 32, on a 2-core AMD EPYC: 15.6 vs 36.0 ms with the mask at 4 x 512, 15.9 vs 73.5 ms at 2 x 1024.
Short rows lose: many small calls cost the batch's parallelism (4.8 vs 2.6 ms at 16 x 64, 10.4 vs 12.6 ms at
8 x 256 but far worse than the mask while another process loads the cores), hence ``MIN_LEN``. Rows whose
documents average under ``SPLIT_MIN_MEAN`` tokens take one masked call instead.

The calls go straight to ATen's CPU flash kernel and its backward (``_scaled_dot_product_flash_attention_for_cpu``
and ``..._backward``): the forward keeps each document's log-sum-exp, the backward writes each document's
gradients into its slice of three buffers, with no autograd graph per document and no concatenations. Eager
training runs them as one autograd node; under ``torch.compile`` they are one opaque op per direction (the
document count is read on the host, which a traced graph could not do). The kernel takes grouped heads (fewer
key/value heads than query heads) from torch 2.9 on; before, grouped heads keep the masked path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MIN_LEN", "SPLIT_MIN_MEAN", "block_causal_mask", "document_attention", "document_spans", "per_document"]

MIN_LEN = 512  # rows of at least this many tokens attend per document (see the module docstring)
SPLIT_MIN_MEAN = 16  # mean document length (tokens) below which a row takes one masked call
_GROUPED_HEADS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 9)


def per_document(device: torch.device, T: int, n_heads: int, n_kv_heads: int) -> bool:
    """Whether packed rows of ``T`` tokens on ``device`` attend through :func:`document_attention`."""
    return device.type == "cpu" and T >= MIN_LEN and (n_heads == n_kv_heads or _GROUPED_HEADS)


def document_spans(index: Tensor) -> list[list[tuple[int, int]]]:
    """Each row's documents as (start, end) pairs, read to the host; ``index`` (B, T) non-decreasing per row."""
    B, T = index.shape
    if T == 0:
        return [[] for _ in range(B)]
    cuts = (index[:, 1:] != index[:, :-1]).nonzero().tolist()  # (row, t - 1) before each start but the first
    bounds: list[list[int]] = [[0] for _ in range(B)]
    for row, t in cuts:
        bounds[row].append(t + 1)
    return [[(a, b) for a, b in zip(s, [*s[1:], T])] for s in bounds]


def block_causal_mask(index: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive block-diagonal causal mask (B, 1, T, T) of ``index`` (B, T): 0 where query i may see key j (same
    document, j <= i), -inf elsewhere."""
    T = index.shape[1]
    pos = torch.arange(T, device=index.device)
    allowed = (index[:, :, None] == index[:, None, :]) & (pos[None, :] <= pos[:, None])  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=index.device)
    return mask.masked_fill_(~allowed, float("-inf")).unsqueeze(1)


def _split(docs: list[tuple[int, int]], T: int) -> bool:
    return T >= len(docs) * SPLIT_MIN_MEAN


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _forward(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    """q (B, H, T, d), k and v (B, Hkv, T, d) -> out (B, H, T, d), logsumexp (B, H, T)."""
    B, H, T, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(B, H, T, dtype=_lse_dtype(q.dtype))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for b, docs in enumerate(document_spans(index)):
        r = slice(b, b + 1)
        if not _split(docs, T):
            out[r], lse[r] = flash(q[r], k[r], v[r], 0.0, False, attn_mask=block_causal_mask(index[r], q.dtype),
                                   scale=scale)
            continue
        for s, e in docs:
            t = slice(s, e)
            out[r, :, t], lse[r, :, t] = flash(q[r, :, t], k[r, :, t], v[r, :, t], 0.0, True, scale=scale)
    return out, lse


def _backward(g: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, index: Tensor,
              scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`_forward` for q, k and v, each document's from its own slice of every tensor."""
    T = q.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    for b, docs in enumerate(document_spans(index)):
        r = slice(b, b + 1)
        if not _split(docs, T):
            dq[r], dk[r], dv[r] = flash_bwd(g[r], q[r], k[r], v[r], out[r], lse[r], 0.0, False,
                                            attn_mask=block_causal_mask(index[r], q.dtype), scale=scale)
            continue
        for s, e in docs:
            t = slice(s, e)
            dq[r, :, t], dk[r, :, t], dv[r, :, t] = flash_bwd(
                g[r, :, t], q[r, :, t], k[r, :, t], v[r, :, t], out[r, :, t], lse[r, :, t], 0.0, True, scale=scale)
    return dq, dk, dv


class _DocumentAttention(torch.autograd.Function):
    """Eager training: :func:`_forward` and :func:`_backward` as one autograd node."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, index: Tensor,  # type: ignore[override]
                scale: float | None) -> Tensor:
        out, lse = _forward(q, k, v, index, scale)
        ctx.save_for_backward(q, k, v, out, lse, index)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        q, k, v, out, lse, index = ctx.saved_tensors
        return (*_backward(g, q, k, v, out, lse, index, ctx.scale), None, None)


@torch.library.custom_op("amer::document_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, index, scale)


@_attention_op.register_fake
def _(q, k, v, index, scale):
    B, H, T, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, T, dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("amer::document_attention_backward", mutates_args=())
def _attention_op_backward(g: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, index: Tensor,
                           scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(g, q, k, v, out, lse, index, scale)


@_attention_op_backward.register_fake
def _(g, q, k, v, out, lse, index, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _op_setup(ctx, inputs, output) -> None:
    q, k, v, index, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, index)
    ctx.scale = scale


def _op_autograd(ctx, g: Tensor, _g_lse: Tensor | None):
    q, k, v, out, lse, index = ctx.saved_tensors
    return (*_attention_op_backward(g, q, k, v, out, lse, index, ctx.scale), None, None)


_attention_op.register_autograd(_op_autograd, setup_context=_op_setup)


def document_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float | None = None) -> Tensor:
    """Causal attention of each packed document to itself alone, on CPU.

    q (B, H, T, d), k and v (B, Hkv, T, d) with ``H`` a multiple of ``Hkv`` (grouped heads; one width, as the
    CPU flash kernel requires);
    ``index`` (B, T) int, each token's document number, non-decreasing along a row (``DocIds.index``);
    ``scale`` of the query-key products (default ``d ** -0.5``). Keys and values are taken to the queries' dtype
    (the kernel wants one dtype and, unlike SDPA, nothing casts it under autocast). Returns (B, H, T, d).
    """
    k, v = k.to(q.dtype), v.to(q.dtype)
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, index, scale)[0]
    return _DocumentAttention.apply(q, k, v, index, scale)
