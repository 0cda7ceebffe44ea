"""How long the unfinished parts of the experiment should take: timed here (``--estimate``), or projected for a
GPU this machine does not have (``--estimate --gpu h100``).

Timed: a few real steps of each kind on the run's device and dtype (process time on a CPU, so a busy machine
does not inflate it; wall-clock time with the device synchronised on CUDA), one held-out evaluation, times the
arms still to run.

Projected: no step is timed. The work is counted exactly (every arm's steps, from the data encoded with the
model's own tokenizer and chat template, and the matmul FLOPs of a step from the model's structure,
:func:`amer.bench.flops.training_flops`), and turned into time with stated assumptions: the GPU's dense
bfloat16 peak and bandwidth, a model FLOP utilisation (:data:`MFU`), and a launch floor per block (eager PyTorch
runs one block's forward in tens of kernels: a small model at batch 16 is bound by their launches, not by FLOPs). Each
step takes the larger of the two, plus the memory-bound work of the update (AdamW, clipping and autocast's
weight casts: :data:`STEP_BYTES` per parameter at the GPU's bandwidth). It is an estimate of a run nobody has
measured; ``--estimate`` on the GPU itself replaces it with timed steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from fractions import Fraction
from typing import Any, NamedTuple

import torch

from amer.bench.flops import training_flops
from amer.config import STPConfig, TrainConfig
from amer.data import BatchIterator, ByteTokenizer
from amer.experiments.nlrx.grid import model_config
from amer.experiments.nlrx_finetune.arm import Data, evaluate_model, load_data, train_arm
from amer.experiments.nlrx_finetune.data import pretraining_corpus
from amer.experiments.nlrx_finetune.grid import SPAN, Arm, Settings, build_grid, pick_arms
from amer.experiments.nlrx_finetune.init import describe
from amer.experiments.nlrx_finetune.pretrain import final_path, pretrain_steps
from amer.experiments.runs import say
from amer.model import HybridLM
from amer.stp import STPPolicy
from amer.training import TrainStep, make_optimizer

__all__ = ["GPU", "GPUS", "MFU", "LAUNCH_S", "STEP_BYTES", "estimate", "project", "work"]


class GPU(NamedTuple):
    name: str
    bf16_flops: float  # dense bfloat16 tensor-core peak, FLOP/s (vendor figure, no sparsity)
    bandwidth: float  # memory bandwidth, bytes/s (vendor figure)
    memory_gib: float


GPUS = {"h100": GPU("NVIDIA H100 SXM", 989e12, 3.35e12, 80), "h200": GPU("NVIDIA H200 SXM", 989e12, 4.8e12, 141)}
MFU = 0.3  # model FLOP utilisation assumed for a bf16-autocast step at ~1-2k tokens (an assumption)
LAUNCH_S = 2.0e-4  # seconds of kernel launches per block per forward in eager mode (an assumption)
# bytes moved per parameter per step outside the matmuls: AdamW reads weight, gradient and two moments and writes
# three (28), gradient clipping reads the gradient (4), autocast reads each fp32 weight and writes its bf16 copy (6)
STEP_BYTES = 38


def _timer(device: str) -> Callable[[], float]:
    if device.startswith("cuda"):
        def wall() -> float:
            torch.cuda.synchronize(torch.device(device))
            return time.perf_counter()
        return wall
    return time.process_time


def _pretrain_step_s(pattern: str, s: Settings, timed: int) -> float:
    torch.manual_seed(0)
    mcfg = model_config(pattern, s.d_model)
    model = HybridLM(mcfg).to(s.device)
    data = pretraining_corpus(s.pretrain_seq_len, ByteTokenizer(), max_bytes=200_000)
    tcfg = TrainConfig(steps=timed, batch_size=s.pretrain_batch, seq_len=s.pretrain_seq_len, model=mcfg,
                       stp=STPConfig(), progress=False, tensorboard=False)
    step = TrainStep(model, make_optimizer(model, tcfg), STPPolicy(tcfg.stp, model.pattern), taps=False,
                     dtype=s.dtype)
    batches = BatchIterator(data, s.pretrain_batch, 0)
    step((next(batches),), 0)  # warm-up
    clock = _timer(s.device)
    t0 = clock()
    for i in range(timed):
        step((next(batches),), i)
    return (clock() - t0) / timed


def _arm_steps(s: Settings, arms: list[Arm], n_train: int) -> int:
    return sum(math.ceil(s.epochs * max(1, round(Fraction(a.fraction) * n_train)) / s.batch_size) for a in arms)


def _todo(s: Settings) -> list[Arm]:
    lrs = {(i, m): s.lr or s.lrs[0] for i in s.inits for m, _ in s.models}
    return list(dict.fromkeys(pick_arms(s) + build_grid(s, lrs)))


def estimate(s: Settings, *, timed: int = 10, say: Callable[..., None] = say) -> float:
    """Seconds the unfinished work should take here with ``workers`` processes (CPU seconds per core on a CPU,
    wall-clock seconds on CUDA); printed with its parts, returned."""
    if not s.device.startswith("cuda"):
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
    arms = _todo(s)
    cost = 0.0
    cuda = s.device.startswith("cuda")
    init = "pretrained" if s.init is not None and "pretrained" in s.inits else "scratch"
    for name, pattern in s.models:
        probe = Settings(**{**asdict(s), "epochs": (timed + 2) * s.batch_size / len(data.train)})
        # the steps alone (loading or initialising the model is not timed): wall-clock on CUDA, where the tail
        # steps' loss read-back synchronises the device; process time on a CPU
        model, tr = train_arm(Arm(init, name, pattern, SPAN, 0.02, s.top_fraction, 0, s.lr or 1e-4), probe, data)
        step_s = (tr["train_s"] if cuda else tr["train_cpu_s"]) / max(1, tr["steps"])
        ev = evaluate_model(model, data.test, s)
        eval_s = ev["eval_s"] if cuda else ev["eval_cpu_s"]
        mine = [a for a in arms if a.model == name]
        steps = _arm_steps(s, mine, len(data.train))
        cost += steps * step_s + len(mine) * eval_s
        say(f"estimate: {name} `{pattern}` on {s.device} ({s.dtype}): {1000 * step_s:.0f} ms/step, evaluation "
            f"{eval_s:.0f} s; {len(mine)} arms, {steps} steps")
    total += cost / par
    say(f"estimate: about {total / 3600:.2f} h with {par} worker(s) (arms already done included)")
    return total


def work(s: Settings, data: Data) -> dict[str, Any]:
    """What the grid computes, counted from the encoded data: steps, tokens per step, and test-set sizes."""
    lens = [len(q) - 1 for q in data.train.seqs]
    test = [len(q) - 1 for q in data.test.seqs]
    answers = [len(q) - st for q, st in zip(data.test.seqs, data.test.starts)]
    arms = _todo(s)
    return {"arms": len(arms), "steps": _arm_steps(s, arms, len(data.train)), "mean_len": sum(lens) / len(lens),
            "test_rows": len(test), "test_len": sum(test) / len(test), "answer_len": max(answers)}


def project(s: Settings, gpu: str, *, say: Callable[..., None] = say) -> dict[str, float]:
    """The grid's time on one ``gpu`` (a key of :data:`GPUS`), projected from its FLOPs (see the module
    docstring); printed with every assumption, returned as seconds by part."""
    g = GPUS[gpu]
    if s.init is None:
        raise ValueError("a projection needs the --init model (its size and tokenizer)")
    cfg = describe(s.init).cfg
    data = load_data(s)
    w = work(s, data)
    blocks = len(cfg.parsed.layers)
    seq = max(1, round(w["mean_len"] * 1.03))  # length-bucketed batches: ~3% padding on NL-RX
    flops = training_flops(cfg, s.batch_size, seq)["total"]
    launch = 3 * blocks * LAUNCH_S  # forward, backward (~2 forwards of launches)
    with torch.device("meta"):
        params = HybridLM(cfg).num_params()
    update_s = params * STEP_BYTES / g.bandwidth
    step_s = max(flops / (g.bf16_flops * MFU), launch) + update_s
    fwd = training_flops(cfg, s.eval_batch, max(1, round(w["test_len"])))["total"] / 3
    evals = math.ceil(w["test_rows"] / s.eval_batch)
    eval_s = evals * max(fwd / (g.bf16_flops * MFU), blocks * LAUNCH_S)
    decode_steps = math.ceil(w["test_rows"] / s.decode_batch) * min(s.max_new_tokens, w["answer_len"] + 8)
    decode_s = 2 * eval_s + decode_steps * blocks * LAUNCH_S  # prefill (~ a held-out pass) + one token per step
    memory = params * 16 / 2**30  # fp32 weights, gradients and two AdamW moments
    parts = {"train": w["steps"] * step_s, "eval": w["arms"] * (eval_s + decode_s)}
    parts["total"] = parts["train"] + parts["eval"]
    bound = "FLOPs" if flops / (g.bf16_flops * MFU) >= launch else "kernel launches"
    say(f"projection for {g.name} (estimated, not measured): {params / 1e6:.0f}M parameters, {blocks} blocks, "
        f"{w['arms']} arms, {w['steps']} steps of {s.batch_size} x ~{seq} tokens")
    say(f"projection: {flops / 1e12:.2f} TFLOP per step at {MFU:.0%} of {g.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
        f"launch floor {1000 * launch:.1f} ms, optimizer and casts {1000 * update_s:.1f} ms "
        f"({STEP_BYTES} bytes per parameter at {g.bandwidth / 1e12:.2f} TB/s): {1000 * step_s:.1f} ms per step "
        f"({bound}-bound)")
    say(f"projection: evaluation {eval_s + decode_s:.0f} s per arm ({w['test_rows']} test rows, greedy decoding)")
    say(f"projection: training {parts['train'] / 3600:.2f} h + evaluation {parts['eval'] / 3600:.2f} h = "
        f"{parts['total'] / 3600:.2f} h on one GPU; memory {memory:.1f} GiB of weights and AdamW state "
        f"(of {g.memory_gib:.0f})")
    return parts
