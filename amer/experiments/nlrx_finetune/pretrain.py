"""Pretraining the models the experiment fine-tunes: next-token prediction on the bundled corpora (King James
Bible + Python standard library source), packed documents, through the shared training step.

Resumable: a checkpoint (weights, AdamW moments, batch-order state) replaces ``OUT/pretrain/<model>/latest``
every ``pretrain_every`` steps; the finished model is ``OUT/pretrain/<model>/final``, a checkpoint that
:func:`amer.checkpoint.load_checkpoint` (and ``amer train --init``) read. A checkpoint written with other
pretraining settings is refused, never silently continued."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from amer.checkpoint import read_checkpoint, restore_model, restore_optimizer, save_checkpoint
from amer.config import STPConfig, TrainConfig
from amer.configio import to_dict
from amer.data import BatchIterator, ByteTokenizer
from amer.errors import ExperimentError, TrainingError
from amer.experiments.nlrx.grid import model_config
from amer.experiments.nlrx_finetune.data import pretraining_corpus
from amer.experiments.nlrx_finetune.grid import Settings
from amer.experiments.runs import say
from amer.fileread import json_loads
from amer.model import HybridLM
from amer.stp import STPPolicy
from amer.training import TrainStep, lr_at, make_optimizer

__all__ = ["pretrain", "pretrain_steps", "final_path"]

PRETRAIN_SEED = 0  # one pretrained model per pattern, shared by every fine-tuning seed (as in the paper)


def final_path(s: Settings, name: str) -> Path:
    return Path(s.out) / "pretrain" / name / "final"


def pretrain_steps(s: Settings, rows: int) -> int:
    return max(1, math.ceil(s.pretrain_epochs * rows / s.pretrain_batch))


def _check(meta: dict[str, Any], s: Settings, path: Path) -> None:
    old, new = meta.get("pretrain"), json_loads(json.dumps(s.pretrain_fingerprint()))
    if old != new:
        raise ExperimentError(f"{path} was pretrained with other settings ({old} -> {new}); use another --out, or "
                              "delete that directory to start over")


def pretrain(name: str, pattern: str, s: Settings, *, say: Callable[..., None] = say) -> dict[str, Any]:
    """Pretrain (or finish pretraining) model ``name``; returns its summary (also in the final checkpoint)."""
    final = final_path(s, name)
    if (final / "meta.json").is_file():
        meta = read_checkpoint(final, with_optimizer=False)[2]
        _check(meta, s, final)
        return meta["summary"]
    tok = ByteTokenizer()
    data = pretraining_corpus(s.pretrain_seq_len, tok, max_bytes=s.pretrain_max_bytes)
    steps = pretrain_steps(s, len(data))
    torch.manual_seed(PRETRAIN_SEED)
    mcfg = model_config(pattern, s.d_model)
    model = HybridLM(mcfg).train()
    tcfg = TrainConfig(steps=steps, batch_size=s.pretrain_batch, lr=s.pretrain_lr, warmup_steps=s.pretrain_warmup,
                       seq_len=s.pretrain_seq_len, seed=PRETRAIN_SEED, model=mcfg, stp=STPConfig(), progress=False,
                       tensorboard=False)
    opt = make_optimizer(model, tcfg)
    latest = final.parent / "latest"
    start, state, spent = 0, None, 0.0
    if (latest / "meta.json").is_file():
        weights, moments, meta = read_checkpoint(latest)
        _check(meta, s, latest)
        restore_model(model, weights, source=str(latest))
        if moments is not None:
            restore_optimizer(opt, moments, meta, model)
        start, state, spent = int(meta["step"]), meta["batches"], float(meta.get("train_s", 0.0))
        say(f"pretrain {name}: resuming at step {start}/{steps}")
    batches = BatchIterator(data, s.pretrain_batch, PRETRAIN_SEED, state=state)
    step_fn = TrainStep(model, opt, STPPolicy(tcfg.stp, model.pattern), grad_clip=1.0, taps=False)
    t0 = time.perf_counter()
    losses: list[float] = []

    def meta(step: int) -> dict[str, Any]:
        return {"step": step, "config": {"model": to_dict(mcfg)}, "pretrain": s.pretrain_fingerprint(),
                "batches": batches.state_dict(), "train_s": spent + time.perf_counter() - t0}

    for step in range(start, steps):
        res = step_fn((next(batches),), step, lr=lr_at(step, tcfg))
        if res.applied:
            losses.append(float(res.loss.ce.detach()))
        if (step + 1) % s.pretrain_every == 0 and step + 1 < steps:
            save_checkpoint(latest, model, opt, meta(step + 1))
            recent = losses[-s.pretrain_every:]
            say(f"pretrain {name}: step {step + 1}/{steps}, train CE {sum(recent) / max(1, len(recent)):.3f}")
    if not losses and steps > start:
        raise TrainingError(f"pretraining {name}: every step was non-finite and skipped; lower --pretrain-lr")
    tail = losses[-max(1, (steps - start) // 10):]
    summary = {"model": name, "pattern": pattern, "params": model.num_params(), "steps": steps,
               "rows": len(data), "tokens_per_epoch": len(data) * s.pretrain_seq_len, "epochs": s.pretrain_epochs,
               "final_train_ce": sum(tail) / max(1, len(tail)), "train_s": spent + time.perf_counter() - t0,
               "corpus": data.name}
    save_checkpoint(final, model, None, {**meta(steps), "summary": summary})
    say(f"pretrain {name}: done, {steps} steps, train CE {summary['final_train_ce']:.3f} "
        f"({summary['train_s'] / 60:.1f} min)")
    return summary
