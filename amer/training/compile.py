"""Regional compilation: ``torch.compile`` of each block, not of the whole model.

Compiling the whole model traces every block into one graph (minutes of warm-up at depth), and a block
with data-dependent shapes breaks it into many guarded pieces that recompile. Compiling
the block instead (the "regional compilation" recipe of the PyTorch tutorials, as torchtitan does per
transformer block) traces ``Block.forward`` once per distinct block variant; blocks of one family with
the same settings share that code and its compiled graph (parameters are graph inputs), so an
eight-block ``AEMEAEMR`` stack compiles a handful of graphs, each with ``fullgraph=True`` (a graph break
is an error, not a silent slowdown). When to compile at all is :mod:`amer.training.compile_auto`'s call.

What stays eager, and why:

* Blocks whose mixer says it cannot compile fullgraph (``Mixer.fullgraph_blocker()`` gives the reason and
  the setting that avoids it), e.g. a data-dependent shape read on the host.
* Everything outside the blocks (embedding, final norm, the fused LM head + cross-entropy, STP): the STP
  gate opening or ramping changes nothing inside a compiled graph, so it cannot cause a recompile.
* Decoding with a cache (one token at a time, a cache object per call): the eager forward.

Evaluation (no gradients) runs the compiled blocks too: one more graph per block variant, traced at the first
evaluation, then reused. Compiled blocks read the packed documents' layout (``DocIds``) without caching into it,
so every block of a variant runs the same graph and a checkpointed block's recomputation traces nothing new:
activation checkpointing wraps the compiled forward (applied before or after compilation, the order is the same).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch._dynamo import config as dynamo_config
from torch._functorch import config as functorch_config

from amer.errors import ConfigError
from amer.ops import kernels
from amer.training.checkpointing import checkpointed
from amer.training.compile_auto import Timer, decide, estimate, use_cache_dir

__all__ = ["AutoCompile", "CompiledBlocks", "compile_blocks", "compiles_block", "graph_count"]

RECOMPILE_LIMIT = 64


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
    block's ``forward`` is replaced on the instance: parameter names and checkpoints are unchanged. A block
    already checkpointed is compiled inside its checkpoint. Compilation itself happens at the next training step."""
    # The training step's STP probe (stp/live_grad_norm on log steps) differentiates through later blocks with
    # retain_graph=True, which AOT autograd's donated buffers forbid; they only reuse saved tensors' memory.
    functorch_config.donated_buffer = False
    # Every block runs one code object, Block.forward, so its dynamo cache holds a graph per block variant, shape
    # and grad mode (training and evaluation): torch's default of 8 is reached by a 4-family stack that evaluates,
    # and with fullgraph=True reaching it is an error. The count stays bounded (it is fixed by the model).
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    use_cache_dir()
    kernels.available()  # import the kernel packages now: under compilation one not imported yet counts as missing
    compiled, eager, reasons = [], [], {}
    for blk in model.blocks:
        name = blk.layer.name
        if hasattr(blk.forward, "amer_compiled"):
            raise ConfigError(f"block {name} is compiled already: compile a model once")
        why = compiles_block(blk)
        if why is not None:
            eager.append(name)
            reasons[name] = why
            continue
        checkpointing = getattr(blk.forward, "amer_checkpointing", None)
        inner = blk.forward.__wrapped__ if checkpointing else blk.forward
        blk.forward = _compiled(inner, backend, mode, blk.mixer)
        if checkpointing:
            blk.forward = checkpointed(blk.forward, checkpointing)
        compiled.append(name)
    return CompiledBlocks(compiled, eager, reasons)


def graph_count(model: nn.Module) -> int:
    """Distinct training graphs compiling ``model`` would build: one per block variant that compiles (the warm-up
    estimate before anything was measured)."""
    variants = {(type(b.mixer), getattr(b.layer, "variant", None)) for b in model.blocks if compiles_block(b) is None}
    return len(variants)


def _compiled(forward: Callable[..., Any], backend: Any, mode: str | None, mixer: Any) -> Callable[..., Any]:
    fast = torch.compile(forward, fullgraph=True, backend=backend, mode=mode)

    @functools.wraps(forward)
    def run(x: torch.Tensor, cache: Any = None, doc_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        if cache is not None:
            return forward(x, cache, doc_ids, *args, **kwargs)
        if doc_ids is not None and mixer.reads_document_mask(x.shape[1], x.device):
            kind = x.device.type  # one shared mask, built here eagerly (see DocIds.cached)
            doc_ids.prepare(torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype)
        return fast(x, None, doc_ids, *args, **kwargs)

    run.amer_compiled = True  # type: ignore[attr-defined]
    return run


class AutoCompile:
    """``--compile auto`` over a single-process run's first steps (:mod:`amer.training.compile_auto`): the eager
    steps 2 to 4 are timed and decide; a compiled run then measures its warm-up and speedup and keeps them. A
    compile that fails (no C++ compiler, an unsupported op) puts the eager blocks back: ``auto`` never ends a run."""

    EAGER_TIMED = 3  # eager steps timed after the first (which pays one-off costs), their median decides

    def __init__(self, model: nn.Module, key: str, say: Callable[[str], None]) -> None:
        self.model, self.key, self.say = model, key, say
        self.timer = Timer(key)
        self.eager: list[float] = []
        self.phase = "eager"  # -> "compiled" (measuring) -> "done", or -> "done" when it stays eager
        self.unproven: set[str] = set()  # compiled, and no "step" / "eval" of that kind has run through yet
        self._forwards: dict[nn.Module, Any] = {}

    def after_step(self, index: int, seconds: float, steps_left: int) -> dict[str, float]:
        """Account the run's step ``index`` (0-based, this process) that took ``seconds``; returns figures to log."""
        if self.phase == "eager":
            if index >= 1:
                self.eager.append(seconds)
            return self._decide(steps_left) if len(self.eager) == self.EAGER_TIMED else {}
        if self.phase != "compiled":
            return {}
        first = self.timer.first_compiled_s is None
        got = self.timer.compiled_step(seconds)
        if first:
            self.say(f"compile: first compiled step {seconds:.1f} s, compilation included")
            return {"compile/first_step_s": seconds}
        if got is None:
            return {}
        self.phase = "done"
        warmup, speedup = got
        self.say(f"compile: warm-up {warmup:.1f} s, step {speedup:.2f}x the eager one (kept for the next auto "
                 "decision of this workload)")
        return {"compile/warmup_s": warmup, "compile/speedup": speedup}

    def _decide(self, steps_left: int) -> dict[str, float]:
        eager_s = statistics.median(self.eager)
        self.timer.eager_step_s = eager_s
        n_graphs = graph_count(self.model)
        decision = decide(steps_left, eager_s, estimate(self.key, n_graphs))
        go = decision.compile and n_graphs > 0
        self.say(decision.describe(steps_left, eager_s) if n_graphs else "compile auto: off: no block compiles "
                 "fullgraph here")
        if go:
            self._forwards = {b: b.__dict__.get("forward") for b in self.model.blocks}
            self.say(compile_blocks(self.model).describe())
            self.unproven = {"step", "eval"}
        self.phase = "compiled" if go else "done"
        return {"compile/auto": float(go)}

    def fall_back(self, error: Exception) -> None:
        """The compiled blocks failed before running once: back to the eager ones for the rest of the run."""
        for blk, fwd in self._forwards.items():
            if fwd is None:
                del blk.forward
            else:
                blk.forward = fwd
        self.phase, self.unproven = "done", set()
        while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
            error = inner  # dynamo wraps the backend's own error: name that one
        first = (str(error).splitlines() or ["no message"])[0][:200]
        self.say(f"compile auto: compiling failed ({type(error).__name__}: {first}); the run goes on eager "
                 "(--compile on shows the whole error)")
