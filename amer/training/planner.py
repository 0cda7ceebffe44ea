"""What a training layout needs per rank, predicted before anyone rents the GPUs (``amer plan``).

For a model config and a layout (``dp``, ``pp``, ``ep``, microbatches and schedule, batch, sequence length,
activation checkpointing, dtype, FSDP2 or DDP), every pipeline stage gets a memory account per rank:

* **parameters**, **gradients** (fp32, as the parameters) and **AdamW state** (two fp32 moments): the stage's
  weights split as the layout splits them (FSDP2: over ``dp``; experts: over ``ep``, whole within a group;
  DDP: whole, plus its gradient buckets);
* **activations**: what autograd saves for backward, read off the model itself: the model runs once on fake
  tensors (no memory, no arithmetic: ``FakeTensorMode``) and every tensor saved for backward is counted once,
  by the block that saved it, so every family (one registered tomorrow included) is costed by its own code.
  Attention costs what fused kernels save (the CPU kernel saves what FlashAttention saves on a GPU); MoE
  experts are assumed evenly loaded. Rows are traced as one document each: packing documents adds, on a GPU,
  the attention masks (at most ``B * T * T * 4`` bytes per stage, shared by its layers). ``blocks``
  checkpointing keeps each block's input and recomputes one block at a time; ``selective`` does so for every
  other block. A stage holds the activations of its in-flight microbatches: all ``M`` under GPipe,
  ``min(M, S - s)`` for stage ``s`` of ``S`` under 1F1B;
* **transient** memory: during backward, the gradients of one block's activations; under FSDP2 the gathered
  weights of the unit being computed and of the one prefetched, the embedding, norm and head (gathered for
  the whole step), and the unsharded gradients being reduce-scattered;

and the peak is the largest of: the end of the forward pass, every point of the backward pass (activations
of the blocks not yet reached, gradients of those passed), and the first optimizer step (the moments are
created). Also the FLOPs per step (the blocks' own matmul counts, :meth:`~amer.blocks.common.Mixer.flops`,
times 3 for forward and backward, plus recomputation) and whether the largest stage fits the device. Not
counted: the CUDA context, NCCL's buffers and the caching allocator's fragmentation (``headroom`` keeps a share
of the device for them), STP's span buffers (a few rows per selected tap) and the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from amer.config import ModelConfig
from amer.errors import ConfigError
from amer.model import HybridLM
from amer.objective import cross_entropy
from amer.runtime import autocast
from amer.training.checkpointing import MODES
from amer.training.expert_parallel import expert_modules

__all__ = ["PlanLayout", "StageMemory", "Plan", "plan", "suggest", "cut_pattern", "GiB"]

GiB = 1024.0 ** 3
BACKWARD_WORK = 0.5  # a unit's backward holds gradients of about half its saved activations at once


@dataclass(frozen=True)
class PlanLayout:
    """A training layout: the ``--parallel.*`` settings and the batch shape."""

    dp: int = 1
    pp: int = 1
    ep: int = 1
    microbatches: int | None = None
    schedule: str = "1f1b"
    batch: int = 8  # sequences per micro-batch, global (as --batch-size)
    seq_len: int = 2048
    checkpointing: str = "none"
    dtype: str = "float32"
    data: str = "fsdp"

    @property
    def world(self) -> int:
        return self.dp * self.pp

    @property
    def n_micro(self) -> int:
        return self.microbatches or self.pp

    def check(self) -> None:
        if self.checkpointing not in MODES:
            raise ConfigError(f"activation checkpointing {self.checkpointing!r} is not one of {', '.join(MODES)}")
        if self.dp % self.ep:
            raise ConfigError(f"ep {self.ep} must divide dp {self.dp}")
        if self.batch % self.dp or (self.batch // self.dp) % self.n_micro:
            raise ConfigError(f"batch {self.batch} must split over dp {self.dp} and then into {self.n_micro} "
                              "microbatches")
        if self.schedule == "1f1b" and self.pp > 1 and self.n_micro < self.pp:
            raise ConfigError(f"1f1b needs at least {self.pp} microbatches, got {self.n_micro}")

    def describe(self) -> str:
        parts = [f"dp {self.dp}", f"pp {self.pp}"] + ([f"ep {self.ep}"] if self.ep > 1 else [])
        if self.pp > 1:
            parts.append(f"{self.n_micro} microbatches {self.schedule}")
        parts += [f"batch {self.batch} x {self.seq_len}", self.dtype]
        if self.checkpointing != "none":
            parts.append(f"checkpointing {self.checkpointing}")
        if self.dp > 1:
            parts.append(self.data)
        return ", ".join(parts)


@dataclass
class StageMemory:
    """One pipeline stage's bytes per rank."""

    stage: int
    layers: str
    params: float
    grads: float
    optimizer: float
    activations: float  # the in-flight microbatches' saved tensors at the peak
    in_flight: int
    transient: float
    peak: float  # the largest moment: params + grads + optimizer + activations + transient at that moment

    def row(self) -> dict[str, Any]:
        return {"stage": self.stage, "layers": self.layers, "params_GiB": self.params / GiB,
                "grads_GiB": self.grads / GiB, "adamw_GiB": self.optimizer / GiB,
                "activations_GiB": self.activations / GiB, "in_flight": self.in_flight,
                "transient_GiB": self.transient / GiB, "peak_GiB": self.peak / GiB}


@dataclass
class Plan:
    layout: PlanLayout
    pattern: str  # the pattern as cut into stages
    stages: list[StageMemory]
    n_params: int
    flops_per_step: float
    tokens_per_step: int
    device_bytes: float
    headroom: float = 0.1
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(s.peak for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_bytes * (1.0 - self.headroom)


def cut_pattern(cfg: ModelConfig, pp: int) -> ModelConfig:
    """``cfg`` with its pattern cut into ``pp`` stages of consecutive layers (as equal in layers as they go);
    a pattern already cut into ``pp`` stages is kept."""
    if cfg.parsed.n_stages == pp:
        return cfg
    letters = cfg.parsed.letters.replace("|", "")
    n = len(letters)
    if pp > n:
        raise ConfigError(f"pp {pp} exceeds the {n} layers of the pattern")
    bounds = [round(i * n / pp) for i in range(pp + 1)]
    return replace(cfg, pattern="|".join(letters[bounds[i]:bounds[i + 1]] for i in range(pp)))


# ----------------------------------------------------------------------------------------------
# activations, traced on fake tensors


@contextmanager
def _balanced_experts() -> Iterator[None]:
    """Fake tensors carry no routing: a bincount of expert ids (the slot counts dropless dispatch reads back)
    answers an even load."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.overrides import TorchFunctionMode

    class Even(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func is torch.bincount:
                n, bins = args[0].numel(), int(kwargs.get("minlength", 0) or (args[1] if len(args) > 1 else 1))
                with unset_fake_temporarily():
                    out = torch.full((bins,), n // bins, dtype=torch.long)
                    out[: n % bins] += 1
                return out
            return func(*args, **kwargs)

    with Even():
        yield


def _fake_model(cfg: ModelConfig, mode: Any) -> HybridLM:
    model = HybridLM.empty(cfg)
    with mode:
        for m in model.modules():
            for n, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
            for n, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[n] = torch.zeros(b.shape, dtype=b.dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


_TRACES: dict[tuple[Any, ...], dict[str, float]] = {}


def trace_activations(cfg: ModelConfig, rows: int, seq_len: int, *, dtype: str = "float32",
                      logits: bool = False) -> dict[str, float]:
    """Bytes autograd saves for backward in one forward of ``rows`` x ``seq_len`` tokens, by unit (``embed``,
    ``blocks.<i>``, ``head``: the final norm, head and cross-entropy), each tensor counted once; ``logits``:
    the head computes the logits (a pipeline's last stage), else the fused head + cross-entropy."""
    key = (repr(replace(cfg, pattern=cfg.parsed.letters.replace("|", ""))), rows, seq_len, dtype, logits)
    if key not in _TRACES:
        _TRACES[key] = _trace(cfg, rows, seq_len, dtype=dtype, logits=logits)
    return dict(_TRACES[key])


def _trace(cfg: ModelConfig, rows: int, seq_len: int, *, dtype: str, logits: bool) -> dict[str, float]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_model(cfg, mode)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    where = ["embed"]
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, f"blocks.{i}"))
        blk.register_forward_hook(lambda *_: where.__setitem__(0, "head"))
    seen: set[int] = set()
    out: dict[str, float] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen and key not in weights:
            seen.add(key)
            out[where[0]] = out.get(where[0], 0.0) + storage.nbytes()
        return t

    with mode, _balanced_experts(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tokens = torch.zeros(rows, seq_len, dtype=torch.long)
        with autocast(dtype, torch.device("cpu")):  # rows run straight through (see the module docstring)
            res = model(tokens, taps=False, head=logits)
        cross_entropy(res.logits if logits else res, tokens)
    return out


# ----------------------------------------------------------------------------------------------
# the account


def _units(model: HybridLM, layers: list[int], first: bool, last: bool) -> list[str]:
    return (["embed"] if first else []) + [f"blocks.{i}" for i in layers] + (["head"] if last else [])


def _unit_params(model: HybridLM, name: str) -> tuple[float, float]:
    """(all parameters, expert parameters) of a unit, in elements; the head includes the final norm (and an
    untied LM head)."""
    if name == "embed":
        return float(model.embed.weight.numel()), 0.0
    if name == "head":
        n = model.norm.weight.numel() + (0 if model.cfg.tie_embeddings else model.lm_head.weight.numel())
        return float(n), 0.0
    blk = model.get_submodule(name)
    experts = sum(getattr(m, p).numel() for m in expert_modules(blk) for p in m.expert_params)
    return float(sum(p.numel() for p in blk.parameters())), float(experts)


def _stage(model: HybridLM, s: int, units: list[str], acts: dict[str, float], lay: PlanLayout,
           width_bytes: float) -> StageMemory:
    fsdp = lay.data == "fsdp" and lay.dp > 1
    S, M = lay.pp, lay.n_micro
    k = 1 if S == 1 else (M if lay.schedule == "gpipe" else min(M, S - s))
    p_loc, full = [], []
    for u in units:
        n, ex = _unit_params(model, u)
        dense = n - ex
        local = (dense / lay.dp if fsdp else dense) + (ex / lay.ep if lay.ep > 1 else (ex / lay.dp if fsdp else ex))
        if S > 1 and s == S - 1 and u == "head" and model.cfg.tie_embeddings:
            local += model.embed.weight.numel() / (lay.dp if fsdp else 1)  # the last stage's copy of the embedding
            n += model.embed.weight.numel()
        p_loc.append(4.0 * local)
        full.append(4.0 * n)
    P = sum(p_loc)
    bucket = P if lay.data == "ddp" and lay.dp > 1 else 0.0  # DDP's gradient buckets, allocated when it wraps
    G, adam = P, 2 * P
    # activations per microbatch, by unit, after checkpointing; what a checkpointed block recomputes
    blocks = [u for u in units if u.startswith("blocks.")]
    ckpt = set(blocks if lay.checkpointing == "blocks" else blocks[1::2] if lay.checkpointing == "selective" else [])
    a = [width_bytes if u in ckpt else acts.get(u, 0.0) for u in units]
    redo = [acts.get(u, 0.0) if u in ckpt else 0.0 for u in units]
    A = sum(a)
    # FSDP2: the embedding, final norm and head stay gathered through the step; a block is gathered while it
    # runs, the next one prefetched; its gradient is whole until reduce-scattered
    root = sum(f for u, f in zip(units, full) if not u.startswith("blocks.")) if fsdp else 0.0
    gathered = [2 * f if fsdp and u.startswith("blocks.") else 0.0 for u, f in zip(units, full)]
    # moments: (grads, optimizer, activations, transient)
    moments = [(bucket, adam, k * A, root + max(gathered, default=0.0))]  # the end of the forward passes in flight
    for i in reversed(range(len(units))):  # backward, one unit at a time
        held = sum(a[: i + 1]) + (k - 1) * A
        # the gradients of the unit's activations in flight (about half their size, as measured on CPU), what a
        # checkpointed unit recomputes; FSDP2: the unit's and the next one's gathered weights, its whole
        # gradient and the reduce-scatter's copy of it
        work = BACKWARD_WORK * (redo[i] or a[i]) + redo[i] + root + gathered[i] + (2 * full[i] if fsdp else 0.0)
        moments.append((bucket + sum(p_loc[i + 1:]), adam, held, work))  # the first microbatch: gradients so far
        if S > 1 and M > 1:
            moments.append((bucket + G, adam, held, work))  # a later microbatch of the step: every gradient exists
    moments.append((bucket + G, adam, 0.0, root))  # the first optimizer step creates the moments
    g, o, act, tr = max(moments, key=sum)
    letters = "".join(str(model.pattern.layers[int(u.split(".")[1])].family) for u in blocks)
    return StageMemory(s, letters, P, g, o, act, k, tr, P + g + o + act + tr)


def _flops(model: HybridLM, lay: PlanLayout) -> float:
    """Matmul FLOPs of one optimizer step (2 per multiply-add; backward twice the forward; recomputed blocks
    once more)."""
    T = lay.seq_len
    per_block = [sum(blk.mixer.flops(T).values()) for blk in model.blocks]
    redo = {"none": 0.0, "blocks": sum(per_block), "selective": sum(per_block[1::2])}[lay.checkpointing]
    head = float(T * model.lm_head.weight.numel())
    return 2.0 * lay.batch * (3 * (sum(per_block) + head) + redo)


def plan(cfg: ModelConfig, lay: PlanLayout, device_bytes: float, *, headroom: float = 0.1, exact: bool = True) -> Plan:
    """The per-rank memory account of every stage of ``cfg`` trained under ``lay`` (see the module docstring).
    ``exact=False`` scales one traced row by the rows of a microbatch (activations grow linearly with them, to a
    few percent): quick enough to screen many layouts."""
    lay.check()
    stages_before = cfg.parsed.n_stages
    cfg = cut_pattern(cfg, lay.pp)
    model = HybridLM.empty(cfg)
    if lay.ep > 1:
        for m in expert_modules(model):
            n = getattr(m, m.expert_params[0]).shape[0]
            if n % lay.ep:
                raise ConfigError(f"ep {lay.ep} must divide the {n} experts of each expert block")
    rows = lay.batch // lay.dp // (lay.n_micro if lay.pp > 1 else 1)
    if exact:
        acts = trace_activations(cfg, rows, lay.seq_len, dtype=lay.dtype, logits=lay.pp > 1)
    else:
        acts = {k: rows * v for k, v in trace_activations(cfg, 1, lay.seq_len, dtype=lay.dtype,
                                                           logits=lay.pp > 1).items()}
    width = rows * lay.seq_len * cfg.d_model * 4.0  # a checkpointed block keeps its fp32 input
    stages = []
    for s in range(lay.pp):
        layers = [layer.index for layer in model.pattern.stage_layers(s)] if lay.pp > 1 else \
            list(range(len(model.blocks)))
        units = _units(model, layers, s == 0, s == lay.pp - 1)
        stages.append(_stage(model, s, units, acts, lay, width))
    notes = []
    if lay.pp > 1 and stages_before != lay.pp:  # what --pattern must say for amer train to run these stages
        notes.append(f"pattern cut into {lay.pp} stages: {cfg.parsed.letters}")
    return Plan(lay, cfg.parsed.letters, stages, model.num_params(), _flops(model, lay),
                lay.batch * lay.seq_len, device_bytes, headroom, notes)


def suggest(cfg: ModelConfig, base: PlanLayout, device_bytes: float, *, max_world: int = 4096,
            headroom: float = 0.1, world: int | None = None) -> Plan | None:
    """The smallest layout (fewest ranks; then no recomputation; then the fewest stages) that fits, keeping
    ``base``'s batch, sequence length, dtype and engine; None when none up to ``max_world`` ranks does.
    ``world``: only layouts of exactly that many ranks."""
    n_layers = len(cfg.parsed.layers)
    experts = [getattr(m, m.expert_params[0]).shape[0] for m in expert_modules(HybridLM.empty(cfg))]
    worlds = [world] if world else [2 ** i for i in range(max_world.bit_length()) if 2 ** i <= max_world]
    for world in worlds:
        found = []
        for pp in [d for d in range(1, min(world, n_layers) + 1) if world % d == 0]:
            dp = world // pp
            for ep in [e for e in range(1, dp + 1) if dp % e == 0 and all(n % e == 0 for n in experts)]:
                for ck in MODES:
                    micro = max(pp, base.microbatches or 1) if pp > 1 else None
                    lay = replace(base, dp=dp, pp=pp, ep=ep if experts else 1, microbatches=micro, checkpointing=ck)
                    try:
                        lay.check()
                    except ConfigError:
                        continue
                    found.append((MODES.index(ck), pp, -ep, lay))
        for _, _, _, lay in sorted(found, key=lambda f: f[:3]):
            if plan(cfg, lay, device_bytes, headroom=headroom, exact=False).fits:  # screened, then confirmed
                p = plan(cfg, lay, device_bytes, headroom=headroom)
                if p.fits:
                    return p
    return None


