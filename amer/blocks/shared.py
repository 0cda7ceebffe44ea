"""Shared blocks: one set of parameters used at several depths (the pattern's ``A:z``).

Zamba (Glorioso et al. 2024, arXiv 2405.16712) applies one attention block at several depths of a Mamba stack,
which costs its parameters once. Here the block built for a share name's first use is held once by the model
(``HybridLM.shared[name]``, state-dict keys ``shared.<name>.*``, counted once in ``num_params``); every use is a
:class:`SharedUse` in ``HybridLM.blocks`` that holds no parameters and runs the shared block. Gradients from every
use accumulate in the one set of parameters. What belongs to a use stays the use's: its
:class:`~amer.pattern.LayerSpec` (family index, tap), its decoding cache (``init_cache`` returns a fresh one per
use) and its place in a parallel layer. The shared mixer itself was built from its first use's ``LayerSpec``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from amer.blocks.common import Block, MixerOutput
from amer.blocks.doc_ids import DocIds
from amer.pattern import LayerSpec

__all__ = ["SharedUse"]


class SharedUse(nn.Module):
    """One use of a shared block: the block's interface (``forward``, ``update``, ``init_cache``, ``mixer``,
    ``norm``...) over parameters it does not hold. The shared :class:`Block` is kept outside the module tree
    (``object.__setattr__``), so it is registered, stored and counted once, by its owner."""

    def __init__(self, block: Block, layer: LayerSpec, parts: nn.ModuleDict | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.parts = parts  # the use's own submodules (Mixer.per_use), state-dict keys blocks.<i>.parts.*
        object.__setattr__(self, "shared_block", block)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["shared_block"], name)

    def reset_parameters(self) -> None:
        """The use's own submodules only: the shared block is initialised once, as its own unit."""
        if self.parts is not None:
            self.shared_block.mixer.reset_parts(self.parts)

    def update(self, h: Tensor, cache: Any = None, doc_ids: DocIds | None = None,
               embed: Tensor | None = None) -> tuple[Tensor, MixerOutput]:
        return self.shared_block.update(h, cache, doc_ids, embed, self.parts)

    def forward(self, x: Tensor, cache: Any = None, doc_ids: DocIds | None = None,
                embed: Tensor | None = None) -> tuple[Tensor, MixerOutput]:
        return self.shared_block(x, cache, doc_ids, embed, self.parts)

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Any:
        return self.shared_block.init_cache(batch_size, max_len, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"uses shared block {self.layer.share!r}"
