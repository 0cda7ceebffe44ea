"""What :func:`amer.training.loop.train` does differently under torchrun, in one place.

The loop itself stays the single-process loop. Rank 0 owns the run directory: it creates or resumes the
run (its config, the data position and the generator states, which it hands to every rank), but no rank
builds the whole model. :func:`start` builds what this rank trains: the model on the meta device, this
rank's pipeline stage of it, its experts (``--parallel.ep``), its FSDP2 shards, then memory for exactly that,
initialised per unit as one process initialises the whole model (:mod:`amer.training.materialize`) or
filled from the checkpoint being resumed. A sharded checkpoint (:mod:`amer.sharded`) is read by every rank
for its own share, whatever layout wrote it; a single-file one (a one-process run's) tensor by tensor.
:func:`validate` evaluates on every rank's rows and reduces (:mod:`amer.training.sharded_eval`);
:func:`checkpoint` writes a sharded checkpoint from every rank in parallel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from amer import sharded
from amer.checkpoint import find_checkpoint, save_sharded_checkpoint
from amer.config import TrainConfig
from amer.errors import ConfigError, TrainingError
from amer.model import HybridLM, InitUnit
from amer.stp import STPPolicy
from amer.training import distributed as D
from amer.training import run as rundir
from amer.training.checkpointing import apply_activation_checkpointing
from amer.training.compile import compile_blocks
from amer.training.expert_parallel import apply_expert_parallel, expert_modules
from amer.training.materialize import materialize, rank_units
from amer.training.optim import make_optimizer
from amer.training.pipeline import StageModule
from amer.training.pipeline_step import PipelineStep
from amer.training.restore import named_optimizer_state, read_position, restore_sharded, unit_source
from amer.training.sharded_eval import sharded_validate
from amer.training.step import TrainStep

__all__ = ["Scaled", "start", "validate", "checkpoint", "share", "on_main", "NullLogger", "describe"]

log = logging.getLogger(__name__)


@dataclass
class Scaled:
    layout: D.Layout
    module: nn.Module  # what this rank trains (wrapped)
    optimizer: torch.optim.Optimizer
    step_fn: Any  # TrainStep or PipelineStep
    stage: StageModule | None
    aliases: dict[str, str] = field(default_factory=dict)  # a stage's copy of a tied weight -> its stored name


def share(layout: D.Layout, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (CPU objects, pickled)."""
    box = [obj if layout.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(layout: D.Layout, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result on every rank; an error it raises is raised on every rank (so a refused
    run directory stops all processes with the same one-line message instead of leaving them waiting)."""
    if not layout.distributed:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if layout.main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            error = e
    result, error = share(layout, (result, error) if layout.main else None)
    if error is not None:
        raise error
    return result


def agreed(layout: D.Layout, ok: bool) -> bool:
    """Every rank's verdict: False on all ranks when any rank says False."""
    t = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class NullLogger:
    """The run log of ranks other than 0: they compute the same figures, rank 0 writes them."""

    def log(self, step: int, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def start(run: Any, layout: D.Layout, model: HybridLM, policy: STPPolicy, stp_gen: torch.Generator, batches: Any,
          say: Callable[[str], None], stop_at: int | None) -> tuple[Scaled, Any]:
    """Open (or resume) the run on rank 0, build this rank's share of ``model`` (built on the meta device; the
    modules of it this rank holds are given memory, the others stay on the meta device) and restore it; returns
    what this rank trains and the run state (the same on every rank)."""
    cfg, target = run.config, run.target
    if layout.ep > 1 and not expert_modules(model):
        raise ConfigError(f"--parallel.ep {layout.ep}: the pattern has no block with several experts to split")

    def open_run() -> Any:
        state = rundir.open_run(target, cfg, None, None, batches, stp_gen, say, stop_at,
                                restorer=lambda path: read_position(path, batches, stp_gen))
        return state, batches.state_dict(), stp_gen.get_state(), torch.get_rng_state()

    state, position, gen_state, rng = on_main(layout, open_run)
    batches.load_state_dict(position)
    stp_gen.set_state(gen_state)
    torch.set_rng_state(rng)
    # where the weights come from: the checkpoint being resumed, --init, or the seed
    src = target.checkpoint if target.checkpoint is not None else (find_checkpoint(cfg.init) if cfg.init else None)
    from_shards = src is not None and sharded.is_sharded(src)
    source = None if src is None else (lambda unit, t: True) if from_shards else unit_source(Path(src), model)
    scaled = build(cfg, layout, model, policy, stp_gen, source=source, say=say)
    resuming = target.checkpoint is not None
    if from_shards:
        restore_sharded(Path(src), D.unwrap(scaled.module), scaled.optimizer if resuming else None, say,
                        aliases=scaled.aliases)
    elif resuming and (Path(src) / "optim.safetensors").is_file():
        whole = HybridLM.empty(cfg.model)  # a fresh structure (this rank's modules of `model` now hold its share)
        order = make_optimizer(whole, cfg)  # the whole model's optimizer on the meta device: the parameter order
        D.load_optimizer_state(scaled.module, scaled.optimizer, named_optimizer_state(Path(src), whole, order),
                               aliases=scaled.aliases)
    elif resuming:
        say(f"note: {src} has no optimizer state (e.g. best/); AdamW restarts from zero moments")
    return scaled, state


def build(cfg: TrainConfig, layout: D.Layout, model: HybridLM, policy: STPPolicy, stp_gen: torch.Generator, *,
          source: Callable[[str, nn.Module], bool] | None = None, say: Callable[[str], None] = log.info) -> Scaled:
    """This rank's share of ``model`` (on the meta device): its stage, its experts, its FSDP2 shards, then memory
    for just those, initialised on ``cfg.seed`` unit by unit (or filled by ``source``); with its optimizer and
    its training step."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing)  # from outside the model (torchtitan)
    if cfg.compile == "on":
        say(compile_blocks(model).describe())
    elif cfg.compile == "auto":  # its decision times a single process's eager steps; ranks would each decide
        say("compile auto: off under torchrun (auto decides in single-process runs); --compile on compiles here")
    stage = None
    if layout.pp > 1:
        stage = StageModule(model, layout.pp_rank, layout.pp, policy, documents=cfg.packing == "documents",
                            stp_generator=stp_gen)
    held: nn.Module = stage if stage is not None else model
    tied = stage is not None and stage.tied_copy
    embed_init = next(u.init for u in model.init_units() if u.name == "embed")
    units = rank_units(model, held, [InitUnit("embed", stage.lm_head, embed_init)] if tied else [])
    experts = apply_expert_parallel(held, layout)
    module = held
    if cfg.parallel.data == "fsdp":
        module = D.wrap_data_parallel(held, layout, "fsdp", ignored=experts)
    materialize(held, units, layout.device, cfg.seed, source)
    if tied:  # the copy of the embedding takes no weight decay, as the embedding (a new parameter now)
        stage.lm_head.weight._no_weight_decay = True  # type: ignore[attr-defined]
    if cfg.parallel.data == "ddp":
        module = D.wrap_data_parallel(held, layout, "ddp")
    optimizer = make_optimizer(module, cfg)
    if stage is not None:
        step_fn: Any = PipelineStep(stage, module, optimizer, layout, microbatches=cfg.parallel.n_microbatches,
                                    schedule=cfg.parallel.schedule, grad_accum=cfg.grad_accum,
                                    grad_clip=cfg.grad_clip, dtype=cfg.dtype, rows=cfg.batch_size // layout.dp,
                                    seq_len=cfg.seq_len)
    else:
        step_fn = _Averaged(TrainStep(module, optimizer, policy, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                                      dtype=cfg.dtype, stp_generator=stp_gen, documents=cfg.packing == "documents",
                                      shard=(layout.dp_rank, layout.dp) if layout.dp > 1 else None,
                                      agree=partial(agreed, layout), clip=partial(D.clip_grad_norm, layout=layout)),
                            layout)
    return Scaled(layout, module, optimizer, step_fn, stage, {"lm_head.weight": "embed.weight"} if tied else {})


class _Averaged:
    """A data-parallel :class:`TrainStep` whose logged figures are the means over the ranks (each rank's
    loss is its own share's); the gradient norm is already global."""

    def __init__(self, step: TrainStep, layout: D.Layout) -> None:
        self.step, self.layout = step, layout

    def __call__(self, micro_batches: Any, step: int, *, lr: float | None = None, metrics: bool = False) -> Any:
        res = self.step(micro_batches, step, lr=lr, metrics=metrics)
        if not metrics or not res.applied:
            return res
        parts = res.loss
        figures = {"total": float(parts.total.detach()), "ce": float(parts.ce.detach()),
                   "aux": float(parts.aux.detach()), "stp": float(parts.stp.detach()),
                   **{f"m:{k}": v for k, v in res.metrics.items()},
                   **{f"t:{k}": float(v.detach()) for k, v in parts.per_tap.items()},
                   **{f"a:{k}": float(v.detach()) for k, v in parts.aux_parts.items()}}
        mean = D.mean_over(figures, self.layout, self.layout.dp_group)
        parts = parts._replace(total=torch.tensor(mean["total"]), ce=torch.tensor(mean["ce"]),
                               aux=torch.tensor(mean["aux"]), stp=torch.tensor(mean["stp"]),
                               per_tap={k[2:]: torch.tensor(v) for k, v in mean.items() if k.startswith("t:")},
                               aux_parts={k[2:]: torch.tensor(v) for k, v in mean.items() if k.startswith("a:")})
        res.loss, res.metrics = parts, {k[2:]: v for k, v in mean.items() if k.startswith("m:")}
        return res


def validate(scaled: Scaled, policy: STPPolicy, val_data: Any, cfg: TrainConfig,
             token_bytes: torch.Tensor | None) -> dict[str, float]:
    """Held-out figures from every rank's share of the rows, reduced (the same dict on every rank)."""
    batches = val_data.val_batches(cfg.batch_size, cfg.eval_batches, pad=True)  # one shape, even shares
    return sharded_validate(scaled, policy, batches, dtype=cfg.dtype, documents=cfg.packing == "documents",
                            token_bytes=token_bytes)


def checkpoint(scaled: Scaled, run_dir: Path, state: Any, val: dict[str, float] | None, resolved: dict[str, Any],
               batches: Any, stp_gen: torch.Generator, keep_last: int, tokenizer: Any = None) -> None:
    """``step_NNNNNN/`` (and ``best/``) as sharded checkpoints written by every rank; rank 0 prunes. ``val`` None:
    a stop's checkpoint between evaluations, never ``best/``. Weights that became non-finite on any rank stop every
    rank before anything is written."""
    layout = scaled.layout
    module = D.unwrap(scaled.module)
    bad = next((n for n, p in module.named_parameters() if not torch.isfinite(D.local_tensor(p)).all()), None)
    if not agreed(layout, bad is None):
        where = f"parameter {bad}" if bad else "a parameter on another rank"
        raise TrainingError(f"step {state.step}: {where} became non-finite; stopping without writing a checkpoint; "
                            "lower --lr")
    meta, is_best = rundir.checkpoint_meta(state, val, resolved, batches, stp_gen)
    skip = tuple(scaled.aliases)  # a stage's copy of a tied weight: the stage holding the original writes it
    save_sharded_checkpoint(run_dir / f"step_{state.step:06d}", sharded.state_dicts(module, scaled.optimizer,
                                                                                    skip=skip), meta,
                            tokenizer=tokenizer)
    if is_best:
        save_sharded_checkpoint(run_dir / "best", sharded.state_dicts(module, None, skip=skip), meta,
                                tokenizer=tokenizer)
    if layout.main:
        rundir.prune(run_dir, keep_last, state.run_id)
    dist.barrier()


def describe(cfg: TrainConfig, layout: D.Layout) -> str:
    """One line for the log: the layout and what runs where."""
    p = cfg.parallel
    parts = [f"{layout.world} processes ({layout.device.type}, {'nccl' if layout.device.type == 'cuda' else 'gloo'})"]
    if layout.dp > 1:
        parts.append(f"data parallel x{layout.dp} ({p.data}), {cfg.batch_size // layout.dp} rows per rank")
    if layout.ep > 1:
        parts.append(f"experts split over groups of {layout.ep} ranks (all-to-all)")
    if layout.pp > 1:
        parts.append(f"pipeline x{layout.pp} at '|' ({p.schedule}, {p.n_microbatches} microbatches)")
    return "scale-out: " + "; ".join(parts) + "; each rank built only its share"
