"""Parallel layers: several blocks side by side in one residual layer (the pattern's ``[AM]``).

Falcon-H1 (Zuo et al. 2025, arXiv 2507.22448) runs attention and Mamba-2 heads in parallel on one normed input
and adds their outputs: ``h = norm(x)``, ``x + sum_i out_mult_i * f_i(in_mult_i * h)``. Each branch is an ordinary
:class:`~amer.blocks.common.Block` (its multipliers are its block options ``input_multiplier`` and
``update_multiplier``); the first branch holds the layer's one pre-norm. The branches' updates are summed; another
combination (Hymba's mean of per-branch-normed heads, Dong et al. 2024, arXiv 2411.13676) is a different reduction
of the same per-branch updates, which is why :func:`parallel_layer` returns them.

Every branch keeps its own decoding cache and sees the packed documents; it also has its own tap,
``x + update_i`` (the stream as that branch alone would leave it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from amer.blocks.common import Block, MixerOutput
from amer.blocks.doc_ids import DocIds

__all__ = ["parallel_layer", "residual_layer"]


def parallel_layer(blocks: Sequence[Block], x: Tensor, caches: Sequence[Any], doc_ids: DocIds | None = None,
                   embed: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[MixerOutput]]:
    """One parallel layer: the stream after it, each branch's tap and each branch's mixer output."""
    h = blocks[0].norm(x)
    total, taps, outs = None, [], []
    for blk, cache in zip(blocks, caches):
        y, out = blk.update(h, cache, doc_ids, embed)
        taps.append(x + y)
        outs.append(out)
        total = y if total is None else total + y
    return x + total, taps, outs


def residual_layer(blocks: Sequence[Block], x: Tensor, caches: Sequence[Any], doc_ids: DocIds | None = None,
                   embed: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[MixerOutput]]:
    """One residual layer of the stack, a block alone (through its ``forward``, which regional compilation and
    activation checkpointing wrap) or a parallel layer: as :func:`parallel_layer` (no branch taps for a block alone).
    ``embed`` (the embedding output) reaches the mixers that read it (``Mixer.reads_embedding``)."""
    if len(blocks) == 1:
        x, out = blocks[0](x, caches[0], doc_ids) if embed is None else blocks[0](x, caches[0], doc_ids, embed)
        return x, [], [out]
    return parallel_layer(blocks, x, caches, doc_ids, embed)
