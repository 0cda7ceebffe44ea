"""Regional compilation: ``torch.compile`` of each block, not of the whole model.

Compiling the whole model traces every block into one graph (minutes of warm-up at depth), and a block
with data-dependent shapes breaks it into many guarded pieces that recompile. Compiling
the block instead (the "regional compilation" recipe of the PyTorch tutorials, as torchtitan does per
transformer block) traces ``Block.forward`` once per distinct block variant; blocks of one family with
the same settings share that code and its compiled graph (parameters are graph inputs), so an
eight-block ``AEMEAEMR`` stack compiles a handful of graphs, each with ``fullgraph=True`` (a graph break
is an error, not a silent slowdown).

What stays eager, and why:

* Blocks whose mixer says it cannot compile fullgraph (``Mixer.fullgraph_blocker()`` gives the reason and
  the setting that avoids it), e.g. a data-dependent shape read on the host.
* Everything outside the blocks (embedding, final norm, the fused LM head + cross-entropy, STP): the STP
  gate opening or ramping changes nothing inside a compiled graph, so it cannot cause a recompile.
* Calls without gradients (evaluation) and decoding with a cache run the eager forward, so evaluation
  does not add a second set of graphs or recompiles.

Not combined with activation checkpointing (refused): a checkpointed block's recomputation finds state
its first run created (the packed documents' attention mask is built by the first attention block and
shared), so it traces a different graph that saves different tensors, which checkpointing rejects.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch._functorch import config as functorch_config

from amer.errors import ConfigError

__all__ = ["CompiledBlocks", "compile_blocks", "compiles_block"]


class CompiledBlocks(NamedTuple):
    compiled: list[str]  # block names compiled (e.g. "A0", "M0")
    eager: list[str]  # block names left eager, and why is in ``reasons``
    reasons: dict[str, str]

    def describe(self) -> str:
        why = "; ".join(f"{', '.join(n for n in self.eager if self.reasons[n] == r)}: {r}"
                        for r in dict.fromkeys(self.reasons.values()))
        return (f"compile: {len(self.compiled)} blocks regionally compiled (fullgraph)"
                + (f", eager {why}" if self.eager else ""))


def compiles_block(block: nn.Module) -> str | None:
    """None when ``block`` compiles fullgraph; otherwise why it stays eager (its mixer says)."""
    if getattr(getattr(block, "layer", None), "branch", None) is not None:
        return "a branch of a parallel layer: it runs through Block.update, not the forward this compiles"
    return block.mixer.fullgraph_blocker()


def compile_blocks(model: nn.Module, *, backend: Any = "inductor", mode: str | None = None) -> CompiledBlocks:
    """Compile every block of ``model`` that can be compiled fullgraph (see the module docstring). The
    block's ``forward`` is replaced on the instance: parameter names and checkpoints are unchanged.
    Compilation itself happens at the first training step."""
    # The training step's STP probe (stp/live_grad_norm on log steps) differentiates through later blocks with
    # retain_graph=True, which AOT autograd's donated buffers forbid; they only reuse saved tensors' memory.
    functorch_config.donated_buffer = False
    compiled, eager, reasons = [], [], {}
    for blk in model.blocks:
        name = blk.layer.name
        if hasattr(blk.forward, "amer_checkpointing"):
            raise ConfigError("compile the blocks before or instead of activation checkpointing, not after: a "
                              "checkpointed block's recomputation would re-trace a different graph")
        why = compiles_block(blk)
        if why is not None:
            eager.append(name)
            reasons[name] = why
            continue
        blk.forward = _compiled(blk.forward, backend, mode)
        compiled.append(name)
    return CompiledBlocks(compiled, eager, reasons)


def _compiled(forward: Callable[..., Any], backend: Any, mode: str | None) -> Callable[..., Any]:
    fast = torch.compile(forward, fullgraph=True, backend=backend, mode=mode)

    @functools.wraps(forward)
    def run(x: torch.Tensor, cache: Any = None, doc_ids: Any = None) -> Any:
        if cache is not None or not torch.is_grad_enabled():
            return forward(x, cache, doc_ids)
        return fast(x, None, doc_ids)

    return run
