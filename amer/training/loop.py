"""The training loop: one readable pass from config to checkpoints (nanoGPT style).

``python train.py`` (or ``amer train``) trains the ``small`` preset on the bundled King James Bible,
with STP switched on by its gate part-way through. The step itself is :class:`~amer.training.step.TrainStep`;
the run directory and checkpoints are :mod:`amer.training.run`; this module only orders them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from amer import xla
from amer.checkpoint import list_checkpoints
from amer.config import TrainConfig
from amer.data import BatchIterator
from amer.errors import ConfigError, StoppedBySignal
from amer.fileio import fault_point
from amer.model import HybridLM
from amer.ops import kernels
from amer.report.curves import draw_run_curves
from amer.runtime import resolve_device, warn_slow_bfloat16
from amer.stp import STPPolicy
from amer.training import distributed, scaleout, stopping
from amer.training import run as rundir
from amer.training.checkpointing import apply_activation_checkpointing
from amer.training.compile import compile_blocks
from amer.training.evaluate import evaluate
from amer.training.guard import BadSteps, aux_loss_settings, cause_of
from amer.training.log import Progress, RunLogger
from amer.training.optim import lr_at, make_optimizer
from amer.training.resolve import Run, resolve_run
from amer.training.restore import init_weights
from amer.training.step import TrainStep

__all__ = ["train"]

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, *, stop_at: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run training; returns a summary (run dir, final/best validation loss, checkpoints). ``cfg`` as
    :func:`amer.training.resolve.resolve_config` builds it (``amer train`` does); messages go to the
    ``amer`` loggers (see :mod:`amer.logs`), none with ``quiet`` and none from ranks other than 0."""
    layout = distributed.setup(cfg.parallel, resolve_device(cfg.device))  # single-process unless under torchrun
    try:
        run = resolve_run(cfg, layout)  # rank 0 holds the run directory's lock from here
        try:
            summary = _train(run, layout, stop_at, quiet or not layout.main)
        finally:
            run.release()
    except BaseException:
        distributed.teardown(layout, clean=False)
        raise
    distributed.teardown(layout)
    return summary


def _train(run: Run, layout: distributed.Layout, stop_at: int | None, quiet: bool) -> dict[str, Any]:
    cfg, tok, data, target = run.config, run.tokenizer, run.data, run.target  # resolved once, never rewritten
    say = (lambda *a: None) if quiet else log.info
    device = layout.device
    torch.manual_seed(cfg.seed)
    warn_slow_bfloat16(cfg.dtype, device, quiet=quiet)
    model = HybridLM(cfg.model)
    model = xla.move(model, device) if xla.is_xla(device) else model.to(device)
    if xla.is_xla(device) and not quiet:
        xla.announce(model)
    if cfg.init and target.checkpoint is None:  # a resumed run's own checkpoint holds newer weights
        init_weights(model, cfg.init)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)  # from outside the model (torchtitan)
    if cfg.compile:
        if xla.is_xla(device):
            raise ConfigError("--compile applies to cpu and cuda; on XLA the whole step is compiled already")
        say(compile_blocks(model).describe())
    policy = STPPolicy(cfg.stp, model.pattern)  # resolves the tap selection now: a bad one fails here
    opt = make_optimizer(model, cfg)
    batches = BatchIterator(data.train, cfg.batch_size, cfg.seed)
    stp_gen = torch.Generator(xla.host_generator_device(device)).manual_seed(cfg.seed + 1)
    run_dir = target.run_dir
    state = scaleout.on_main(layout, lambda: rundir.open_run(target, cfg, model, opt, batches, stp_gen, say, stop_at))
    scaleout.on_main(layout, lambda: tok.save(run_dir / "tokenizer.json"))
    text_bytes = torch.tensor(tok.token_bytes())  # val/bpb: comparable across tokenizers
    logger = (RunLogger(run_dir, cfg.tensorboard, resume_step=state.step if cfg.resume else None) if layout.main
              else scaleout.NullLogger())
    stp_note = f"on {cfg.stp.layers!r} from step {cfg.stp.start_step}" if cfg.stp.enabled else "off"
    say(f"amer: {cfg.model.pattern} ({model.pattern.letters}) {model.num_params() / 1e6:.2f}M params | "
        f"data {cfg.data}: "
        f"{data.train.n_tokens / 1e6:.2f}M train / {data.val.n_tokens / 1e6:.2f}M val tokens ({tok.spec}, "
        f"{tok.vocab_size} ids) | STP {stp_note}")
    say(f"run directory: {run_dir}")
    aux_settings = aux_loss_settings(model)  # what the guard names when an auxiliary loss goes non-finite

    scaled = None
    if layout.distributed:
        scaled, state = scaleout.start(cfg, layout, model, opt, policy, stp_gen, batches, state)
        say(scaleout.describe(cfg, layout))
        step_fn: Any = scaled.step_fn
    else:
        step_fn = TrainStep(model, opt, policy, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, dtype=cfg.dtype,
                            stp_generator=stp_gen, documents=cfg.packing == "documents")
    last_step = min(cfg.steps, stop_at or cfg.steps)
    progress = Progress(last_step, state.step, enabled=cfg.progress, quiet=quiet)
    bad, val, val_ok, t_last, tok_since = BadSteps(cfg.max_bad_steps, run_dir), {}, True, time.perf_counter(), 0
    first_step = saved_step = state.step  # the step of the last checkpoint written or restored

    def save(val: dict[str, float] | None, host: Any = _GATHER) -> None:
        """A checkpoint of the current step (``val`` None: a stop's, with no evaluation and no best/). ``host`` is
        an evaluation's gathered copy, None on ranks other than 0, so only its absence gathers again."""
        nonlocal saved_step
        if host is _GATHER:
            host = (model, opt) if scaled is None else scaleout.host_copy(scaled, cfg)  # rank 0: whole model
        if xla.is_xla(device):  # checkpoints are written from host copies (the CPU format)
            host = xla.host_copy(model, opt, lambda: HybridLM(cfg.model), lambda m: make_optimizer(m, cfg))
        scaleout.on_main(layout, lambda: rundir.checkpoint(run_dir, host[0], host[1], state, val, run.record,
                                                           batches, stp_gen, cfg.keep_last, tok))
        saved_step = state.step

    (scaled.module if scaled else model).train()
    try:
        for step in range(state.step, last_step):
            if signum := stopping.agreed(layout):  # every rank stops before the same step
                _stop(signum, state.step, saved_step, save, run_dir)
            log_now = (step + 1) % cfg.log_interval == 0 or step + 1 == last_step
            lr = lr_at(step, cfg)
            t_step = time.perf_counter()
            res = step_fn((next(batches) for _ in range(cfg.grad_accum)), step, lr=lr, metrics=log_now)
            if step == first_step:
                if cfg.compile:
                    progress.say(f"compile: first step {time.perf_counter() - t_step:.1f} s, compilation included")
                ran = kernels.choices()  # which backend each op took, said once (each op logs it at debug level)
                if ran:
                    progress.say("kernels: " + "; ".join(f"{op} -> {how}" for op, how in sorted(ran.items())))
            if not res.applied:
                progress.say(f"step {step + 1}: {res.skipped_reason}; step skipped "
                             f"({bad.in_a_row + 1}/{cfg.max_bad_steps})")
                logger.log(step + 1, {"skipped": 1, "skipped_reason": res.skipped_reason})
                bad.bad(step + 1, cause_of(res, aux_settings))
                continue
            bad.good()
            if res.finite is False:  # XLA reads its guard with the log figures: the step was applied as a zero step
                progress.say(f"step {step + 1}: non-finite loss or gradient; applied with a zero gradient (XLA)")
            state.step = step + 1
            fault_point(f"step:{state.step}")
            tok_since += cfg.batch_size * cfg.grad_accum * cfg.seq_len
            if log_now:
                now = time.perf_counter()
                record = _record(res, lr, tok_since / max(now - t_last, 1e-9), batches.epochs_done)
                t_last, tok_since = now, 0
                logger.log(state.step, record)
                progress.show({"loss": f"{record['ce']:.3f}", "tok_s": f"{record['tokens_per_s']:,.0f}",
                               "stp": f"{record['stp/coeff']:.3g}"},
                              lambda: f"step {state.step}/{cfg.steps} loss {record['ce']:.4f} stp {record['stp']:.4f} "
                                      f"coeff {record['stp/coeff']:.3g} lr {lr:.2e} "
                                      f"{record['tokens_per_s']:,.0f} tok/s")
            progress.update()
            if state.step % cfg.eval_interval == 0 or state.step == last_step:
                host = (model, opt) if scaled is None else scaleout.host_copy(scaled, cfg)  # rank 0: whole model
                val = scaleout.on_main(layout, lambda: validate(host[0], policy, data.val, cfg, text_bytes))
                val_ok = all(math.isfinite(v) for v in val.values())
                logger.log(state.step, val if val_ok else {**val, "val/skipped": "non-finite validation loss"})
                if layout.main and cfg.curves:  # curves.png, redrawn at every evaluation; a failure only warns
                    draw_run_curves(run_dir)
                if not val_ok:  # nothing to checkpoint: weights that evaluate to NaN are not a result
                    progress.say(f"step {state.step}: non-finite validation loss; no checkpoint written")
                    bad.bad(state.step, "the validation loss is non-finite; lower --lr or use --dtype float32",
                            train_step=False)
                    continue
                save(val, host)
                progress.say(f"step {state.step}: val loss {val['val/loss']:.4f}"
                             + (f" bpb {val['val/bpb']:.4f}" if "val/bpb" in val else "")
                             + (f" val stp {val['val/stp']:.4f}" if "val/stp" in val else ""))
    finally:
        progress.close()
        logger.close()
        if layout.main and cfg.curves:
            draw_run_curves(run_dir)  # the end of the run (a no-op when the log is unchanged)
    bad.finish(last_step - first_step, val_ok)
    latest = (list_checkpoints(run_dir) or [None])[-1]
    say(f"done: checkpoint {latest} | best {run_dir / 'best'} (val loss {state.best_val:.4f}) | logs "
        f"{run_dir / 'log.jsonl'} | tensorboard --logdir {cfg.out_dir}")
    return {"run_dir": str(run_dir), "checkpoint": str(latest) if latest else None, "best_val": state.best_val,
            "val": val, "steps": last_step}


_GATHER = object()  # save(): no copy given, gather one (every rank joins the collective)


def _stop(signum: int, step: int, saved_step: int, save: Any, run_dir: Any) -> None:
    """End the run before ``step + 1`` as a signal asked, with a checkpoint of ``step`` unless one exists."""
    name = stopping.signal_name(signum)
    if step > saved_step:
        save(None)
        raise StoppedBySignal(f"stopped by {name} after step {step}: checkpoint {run_dir / f'step_{step:06d}'} "
                              f"written; continue with --resume {run_dir}", signum)
    if step == 0:
        raise StoppedBySignal(f"stopped by {name} before the first step: nothing to keep", signum)
    raise StoppedBySignal(f"stopped by {name} at step {step}, whose checkpoint exists; continue with --resume "
                          f"{run_dir}", signum)


def validate(model: HybridLM, policy: STPPolicy, val_data: Any, cfg: TrainConfig,
             token_bytes: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out cross-entropy (and bits per byte, given the tokenizer's ``token_bytes``), and held-out STP on
    the run's own selection (fixed spans) when STP is on."""
    pad = xla.is_xla(next(model.parameters()).device)  # XLA: one batch shape, the last batch padded
    res = evaluate(model, val_data.val_batches(cfg.batch_size, cfg.eval_batches, pad=pad), stp={"stp": policy},
                   dtype=cfg.dtype, documents=cfg.packing == "documents", token_bytes=token_bytes)
    return {"val/loss": res["loss"], **({"val/bpb": res["bpb"]} if "bpb" in res else {}),
            **({"val/stp": res["stp/stp"]} if "stp/stp" in res else {})}


def _record(res: Any, lr: float, tokens_per_s: float, epoch: float) -> dict[str, Any]:
    parts = res.loss
    return {"lr": lr, "loss": float(parts.total.detach()), "ce": float(parts.ce.detach()),
            "aux": float(parts.aux.detach()), **{f"aux/{k}": float(v.detach()) for k, v in parts.aux_parts.items()},
            "stp": float(parts.stp.detach()), "stp/coeff": parts.coeff,
            "stp/live_grad_norm": res.metrics.get("stp/live_grad_norm", 0.0), "grad_norm": float(res.grad_norm),
            "tokens_per_s": tokens_per_s, "epoch": epoch,
            **{k: v for k, v in res.metrics.items() if k != "stp/live_grad_norm"}}
