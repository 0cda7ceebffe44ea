"""Causal attention over packed documents (and sliding windows) with ``flex_attention``'s block-sparse kernels.

FlexAttention (Dong et al. 2024, arXiv 2412.05496) takes the mask as a function of (row, head, query, key)
and a *block mask*: which 128 x 128 tiles hold any allowed pair. Tiles across a document boundary, or above
the causal diagonal, or outside a sliding window, are skipped, so packed rows cost what their documents
cost, where a dense (T, T) mask computes the whole square. Inside one tile the function masks exactly, so
the result is the block-diagonal causal attention of :meth:`amer.blocks.doc_ids.DocIds.attention_mask`.

Outside ``torch.compile`` the op is compiled once here (it is meant to be; uncompiled it materialises the
scores); inside a compiled block the block's compiler lowers it. Its CPU backward is not implemented (torch
2.13), which is one reason :mod:`amer.ops.kernels` picks it on CUDA only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

__all__ = ["document_block_mask", "flex_attend"]

_compiled: dict[str, Any] = {}


def document_block_mask(index: Tensor | None, seq_len: int, window: int | None, device: torch.device) -> BlockMask:
    """Keys ``j <= i`` of query ``i``, in the same document (``index`` (B, T) document numbers; None: one
    document per row) and, with ``window``, ``i - j < window``."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        keep = kv <= q
        if index is not None:
            keep = keep & (index[b, q] == index[b, kv])
        if window is not None:
            keep = keep & (q - kv < window)
        return keep

    rows = None if index is None else index.shape[0]
    return create_block_mask(mask_mod, rows, None, seq_len, seq_len, device=device)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float | None, gqa: bool,
                compiled: bool = True) -> Tensor:
    """q (B, H, T, hd), k/v (B, Hkv, T, hd) -> (B, H, T, hd) under ``block_mask``; ``compiled=False`` runs the
    uncompiled op (tests on CPU, forward only)."""
    fn = flex_attention
    if compiled and not torch.compiler.is_compiling():
        fn = _compiled.get("flex")
        if fn is None:
            fn = _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
