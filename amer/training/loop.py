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
from amer.config import TrainConfig, to_dict
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
from amer.training.compile import AutoCompile, compile_blocks
from amer.training.compile_auto import machine_name, workload_key
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
    if layout.distributed:  # the structure only: each rank builds its share of it (scaleout.start)
        model = HybridLM.empty(cfg.model)
    else:
        model = HybridLM(cfg.model, seed=cfg.seed)
        model = xla.move(model, device) if xla.is_xla(device) else model.to(device)
        if xla.is_xla(device) and not quiet:
            xla.announce(model)
        if cfg.init and target.checkpoint is None:  # a resumed run's own checkpoint holds newer weights
            init_weights(model, cfg.init)
        apply_activation_checkpointing(model, cfg.activation_checkpointing)  # from outside the model (torchtitan)
        if cfg.compile == "on":
            if xla.is_xla(device):
                raise ConfigError("--compile on applies to cpu and cuda; on XLA the whole step is compiled already")
            say(compile_blocks(model).describe())
    policy = STPPolicy(cfg.stp, model.pattern)  # resolves the tap selection now: a bad one fails here
    batches = BatchIterator(data.train, cfg.batch_size, cfg.seed)
    stp_gen = torch.Generator(xla.host_generator_device(device)).manual_seed(cfg.seed + 1)
    run_dir = target.run_dir
    n_params, aux_settings = model.num_params(), aux_loss_settings(model)  # the whole model's, before it is split
    scaled = None
    if layout.distributed:
        scaled, state = scaleout.start(run, layout, model, policy, stp_gen, batches, say, stop_at)
        opt = scaled.optimizer
    else:
        opt = make_optimizer(model, cfg)
        state = rundir.open_run(target, cfg, model, opt, batches, stp_gen, say, stop_at)
    scaleout.on_main(layout, lambda: tok.save(run_dir / "tokenizer.json"))
    text_bytes = torch.tensor(tok.token_bytes())  # val/bpb: comparable across tokenizers
    logger = (RunLogger(run_dir, cfg.tensorboard, resume_step=state.step if cfg.resume else None) if layout.main
              else scaleout.NullLogger())
    stp_note = f"on {cfg.stp.layers!r} from step {cfg.stp.start_step}" if cfg.stp.enabled else "off"
    say(f"amer: {cfg.model.pattern} ({model.pattern.letters}) {n_params / 1e6:.2f}M params | "
        f"data {cfg.data}: "
        f"{data.train.n_tokens / 1e6:.2f}M train / {data.val.n_tokens / 1e6:.2f}M val tokens ({tok.spec}, "
        f"{tok.vocab_size} ids) | STP {stp_note}")
    say(f"run directory: {run_dir}")  # aux_settings: what the guard names when an auxiliary loss goes non-finite

    if scaled is not None:
        say(scaleout.describe(cfg, layout))
        step_fn: Any = scaled.step_fn
    else:
        step_fn = TrainStep(model, opt, policy, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, dtype=cfg.dtype,
                            stp_generator=stp_gen, documents=cfg.packing == "documents")
    last_step = min(cfg.steps, stop_at or cfg.steps)
    progress = Progress(last_step, state.step, enabled=cfg.progress, quiet=quiet)
    bad, val, val_ok, t_last, tok_since = BadSteps(cfg.max_bad_steps, run_dir), {}, True, time.perf_counter(), 0
    first_step = saved_step = state.step  # the step of the last checkpoint written or restored
    auto = None  # --compile auto: decided after the fourth step (under torchrun: eager, said at start; XLA: eager)
    if cfg.compile == "auto" and scaled is None and not xla.is_xla(device):
        auto = AutoCompile(model, _workload_key(cfg, device), progress.say)

    def save(val: dict[str, float] | None) -> None:
        """A checkpoint of the current step (``val`` None: a stop's, with no evaluation and no best/): under
        torchrun a sharded one, every rank writing its own share; otherwise the single-file format."""
        nonlocal saved_step
        if scaled is not None:
            scaleout.checkpoint(scaled, run_dir, state, val, run.record, batches, stp_gen, cfg.keep_last, tok)
        else:
            host = (model, opt)
            if xla.is_xla(device):  # checkpoints are written from host copies (the CPU format)
                host = xla.host_copy(model, opt, lambda: HybridLM(cfg.model), lambda m: make_optimizer(m, cfg))
            rundir.checkpoint(run_dir, host[0], host[1], state, val, run.record, batches, stp_gen, cfg.keep_last,
                              tok)
        saved_step = state.step

    (scaled.module if scaled else model).train()
    try:
        for step in range(state.step, last_step):
            if signum := stopping.agreed(layout):  # every rank stops before the same step
                _stop(signum, state.step, saved_step, save, run_dir)
            log_now = (step + 1) % cfg.log_interval == 0 or step + 1 == last_step
            lr = lr_at(step, cfg)
            t_step = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            try:
                res = step_fn(micro, step, lr=lr, metrics=log_now)
            except Exception as e:  # only a compile that --compile auto chose, before its first step ran through
                if auto is None or "step" not in auto.unproven:
                    raise
                auto.fall_back(e)
                model.zero_grad(set_to_none=True)
                res = step_fn(micro, step, lr=lr, metrics=log_now)
            if auto is not None:
                auto.unproven.discard("step")
            if auto is not None and auto.phase != "done":
                if device.type == "cuda":  # the step's time, not its launch's
                    torch.cuda.synchronize(device)
                if timing := auto.after_step(step - first_step, time.perf_counter() - t_step, last_step - step - 1):
                    logger.log(step + 1, timing)
            if step == first_step:
                if cfg.compile == "on":
                    first_s = time.perf_counter() - t_step
                    progress.say(f"compile: first step {first_s:.1f} s, compilation included")
                    logger.log(step + 1, {"compile/first_step_s": first_s})
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
                if scaled is not None:  # every rank its rows, reduced: no rank holds the whole model
                    val = scaleout.validate(scaled, policy, data.val, cfg, text_bytes)
                else:
                    try:
                        val = validate(model, policy, data.val, cfg, text_bytes)
                    except Exception as e:  # as for the step: the first compiled evaluation only
                        if auto is None or "eval" not in auto.unproven:
                            raise
                        auto.fall_back(e)
                        val = validate(model, policy, data.val, cfg, text_bytes)
                    if auto is not None:
                        auto.unproven.discard("eval")
                val_ok = all(math.isfinite(v) for v in val.values())
                logger.log(state.step, val if val_ok else {**val, "val/skipped": "non-finite validation loss"})
                if layout.main and cfg.curves:  # curves.png, redrawn at every evaluation; a failure only warns
                    draw_run_curves(run_dir)
                if not val_ok:  # nothing to checkpoint: weights that evaluate to NaN are not a result
                    progress.say(f"step {state.step}: non-finite validation loss; no checkpoint written")
                    bad.bad(state.step, "the validation loss is non-finite; lower --lr or use --dtype float32",
                            train_step=False)
                    continue
                save(val)
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
    # compiled graphs (XLA's, compiled blocks) want one batch shape: the last batch padded
    pad = xla.is_xla(next(model.parameters()).device) or any(hasattr(b.forward, "amer_compiled") for b in model.blocks)
    res = evaluate(model, val_data.val_batches(cfg.batch_size, cfg.eval_batches, pad=pad), stp={"stp": policy},
                   dtype=cfg.dtype, documents=cfg.packing == "documents", token_bytes=token_bytes)
    return {"val/loss": res["loss"], **({"val/bpb": res["bpb"]} if "bpb" in res else {}),
            **({"val/stp": res["stp/stp"]} if "stp/stp" in res else {})}


def _workload_key(cfg: TrainConfig, device: torch.device) -> str:
    """What decides ``--compile auto``'s warm-up and speedup (:func:`amer.training.compile_auto.workload_key`)."""
    return workload_key(to_dict(cfg.model), batch=cfg.batch_size, seq_len=cfg.seq_len, grad_accum=cfg.grad_accum,
                        dtype=cfg.dtype, device=machine_name(device), checkpointing=cfg.activation_checkpointing,
                        packing=cfg.packing, stp=cfg.stp.enabled, threads=torch.get_num_threads())


def _record(res: Any, lr: float, tokens_per_s: float, epoch: float) -> dict[str, Any]:
    parts = res.loss
    return {"lr": lr, "loss": float(parts.total.detach()), "ce": float(parts.ce.detach()),
            "aux": float(parts.aux.detach()), **{f"aux/{k}": float(v.detach()) for k, v in parts.aux_parts.items()},
            "stp": float(parts.stp.detach()), "stp/coeff": parts.coeff,
            "stp/live_grad_norm": res.metrics.get("stp/live_grad_norm", 0.0), "grad_norm": float(res.grad_norm),
            "tokens_per_s": tokens_per_s, "epoch": epoch,
            **{k: v for k, v in res.metrics.items() if k != "stp/live_grad_norm"}}
