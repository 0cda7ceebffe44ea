"""Document structure of packed rows: what every block reads to keep documents apart.

A packed training row holds several documents back to back. ``doc_ids`` (B, T) names each token's
document: a change between neighbouring tokens starts a new document, and negative ids mark padding
(which forms documents of its own and is excluded from statistics). :class:`DocIds` derives, once
per forward and with static shapes only, what the families need:

- ``starts`` (B, T) bool, a document begins here (always at t = 0): the RG-LRU and the SSD cut their
  state at these positions;
- ``index`` (B, T) int64, non-decreasing document number within the row (mamba-ssm's ``seq_idx``),
  so "same document" is an equality test even when ids repeat;
- ``position`` (B, T) int64, the offset into the token's own document: rotary positions restart at
  each document, and a causal convolution of width K reaches back only ``min(K - 1, position)`` steps;
- ``valid`` (B, T) bool, real tokens (MoE load statistics count only these);
- :meth:`attention_mask`, the block-diagonal causal mask, built once per forward and shared by every
  attention layer (:meth:`prepare` builds it ahead of compiled blocks).

A row that holds one document gives exactly the computation of an unpacked row, so decoding (which
always runs one document) and single-document forwards are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from amer.ops.doc_attention import block_causal_mask, document_spans

__all__ = ["DocIds"]


class DocIds:
    """The document ids of a (B, T) batch (``.ids``) and the per-token layout derived from them once per
    forward; see the module docstring. What every mixer receives as ``doc_ids``."""

    def __init__(self, doc_ids: Tensor) -> None:
        if doc_ids.dim() != 2 or doc_ids.is_floating_point() or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be a (B, T) integer tensor, got {tuple(doc_ids.shape)} {doc_ids.dtype}")
        B, T = doc_ids.shape
        self.ids = doc_ids
        first = torch.ones(B, min(T, 1), dtype=torch.bool, device=doc_ids.device)
        self.starts = torch.cat([first, doc_ids[:, 1:] != doc_ids[:, :-1]], dim=1)  # (B, T)
        self.index = self.starts.long().cumsum(1)  # (B, T), 1-based
        t = torch.arange(T, device=doc_ids.device).expand(B, T)
        self.position = t - torch.where(self.starts, t, 0).cummax(dim=1).values  # (B, T)
        self.valid = doc_ids >= 0
        self._masks: dict[Any, Any] = {}
        self._lengths: list[list[int]] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def lengths(self) -> list[list[int]]:
        """Each row's document lengths, read to the host once per forward (eager paths only: the count
        is data-dependent)."""
        if self._lengths is None:
            self._lengths = [[e - s for s, e in row] for row in document_spans(self.index)]
        return self._lengths

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per forward, shared by every layer (a kernel's mask of this layout, for example). Inside
        a compiled block nothing is stored (state written there would make the next block of the same variant trace
        a second graph, and a checkpointed block's recomputation a different one): what was built before the
        block ran (:meth:`prepare`) is read, anything else built anew."""
        if torch.compiler.is_compiling():
            return self._masks[key] if key in self._masks else build()
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def prepare(self, dtype: torch.dtype) -> None:
        """Build the masks a block would ask for before it runs (eagerly, outside a compiled region), so that every
        compiled block reads one shared copy: :meth:`attention_mask` in ``dtype``."""
        self.attention_mask(0, self.ids.shape[1], dtype)

    def attention_mask(self, q_start: int, q_end: int, dtype: torch.dtype) -> Tensor:
        """Additive mask (B, 1, q_end - q_start, q_end): 0 where query i may see key j (same document,
        j <= i), -inf elsewhere. A view of one (B, 1, T, T) mask per dtype, built once and shared by every layer.

        Additive rather than bool: on CPU, ``scaled_dot_product_attention`` with a float mask measured
        as fast as its causal kernel at T = 256, a bool mask slower.
        """
        return self.cached(("attention", dtype), lambda: block_causal_mask(self.index, dtype))[:, :, q_start:q_end,
                                                                                             :q_end]
