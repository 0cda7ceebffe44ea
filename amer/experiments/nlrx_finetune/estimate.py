"""How long the unfinished parts of the experiment should take, from a few timed steps of each kind."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from fractions import Fraction

import torch

from amer.config import STPConfig, TrainConfig
from amer.data import BatchIterator, ByteTokenizer
from amer.experiments.nlrx.grid import model_config
from amer.experiments.nlrx_finetune.arm import evaluate_model, load_data, train_arm
from amer.experiments.nlrx_finetune.data import pretraining_corpus
from amer.experiments.nlrx_finetune.grid import SPAN, Arm, Settings, build_grid, pick_arms
from amer.experiments.nlrx_finetune.pretrain import final_path, pretrain_steps
from amer.experiments.runs import say
from amer.model import HybridLM
from amer.stp import STPPolicy
from amer.training import TrainStep, make_optimizer

__all__ = ["estimate"]


def _pretrain_step_s(pattern: str, s: Settings, timed: int) -> float:
    torch.manual_seed(0)
    mcfg = model_config(pattern, s.d_model)
    model = HybridLM(mcfg)
    data = pretraining_corpus(s.pretrain_seq_len, ByteTokenizer(), max_bytes=200_000)
    tcfg = TrainConfig(steps=timed, batch_size=s.pretrain_batch, seq_len=s.pretrain_seq_len, model=mcfg,
                       stp=STPConfig(), progress=False, tensorboard=False)
    step = TrainStep(model, make_optimizer(model, tcfg), STPPolicy(tcfg.stp, model.pattern), taps=False)
    batches = BatchIterator(data, s.pretrain_batch, 0)
    step((next(batches),), 0)  # warm-up
    t0 = time.process_time()
    for i in range(timed):
        step((next(batches),), i)
    return (time.process_time() - t0) / timed


def estimate(s: Settings, *, timed: int = 10, say: Callable[..., None] = say) -> float:
    """CPU seconds per core the unfinished work should take with ``workers`` processes of one thread each
    (process time, so a busy machine does not inflate it); printed with its parts, returned."""
    torch.set_num_threads(1)
    data = load_data(s)
    par = max(1, s.workers)
    total = 0.0
    if s.init is None and "pretrained" in s.inits:
        rows = len(pretraining_corpus(s.pretrain_seq_len, ByteTokenizer(), max_bytes=s.pretrain_max_bytes))
        todo = [(n, p) for n, p in s.models if not (final_path(s, n) / "meta.json").is_file()]
        per = {n: _pretrain_step_s(p, s, timed) * pretrain_steps(s, rows) for n, p in todo}
        for n, sec in per.items():
            say(f"estimate: pretraining {n}: {pretrain_steps(s, rows)} steps, {sec / 60:.0f} min")
        total += max(per.values(), default=0.0) if len(per) <= par else sum(per.values()) / par
    lrs = {(i, m): s.lr or s.lrs[0] for i in s.inits for m, _ in s.models}
    arms = list(dict.fromkeys(pick_arms(s) + build_grid(s, lrs)))
    cost = 0.0
    for name, pattern in s.models:
        probe = Settings(**{**asdict(s), "epochs": timed * s.batch_size / len(data.train)})
        t0 = time.process_time()
        model, tr = train_arm(Arm("scratch", name, pattern, SPAN, 0.02, s.top_fraction, 0, 1e-4), probe, data)
        step_s = (time.process_time() - t0) / max(1, tr["steps"])
        ev = evaluate_model(model, data.test, s)
        mine = [a for a in arms if a.model == name]
        steps = sum(math.ceil(s.epochs * max(1, round(Fraction(a.fraction) * len(data.train))) / s.batch_size)
                    for a in mine)
        cost += steps * step_s + len(mine) * ev["eval_cpu_s"]
        say(f"estimate: {name} `{pattern}`: {1000 * step_s:.0f} ms/step, evaluation {ev['eval_cpu_s']:.0f} s; "
            f"{len(mine)} arms, {steps} steps")
    total += cost / par
    say(f"estimate: about {total / 3600:.1f} h with {par} worker(s) on idle cores (arms already done included)")
    return total

