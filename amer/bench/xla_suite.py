"""The ``xla`` suite: the training step on the XLA device (torch_xla; PJRT_DEVICE=CPU runs it on the host) next
to the same step in eager PyTorch on the CPU: time to the first step (tracing and compilation included), the
steady step time after warm-up, and how many graphs XLA compiled during warm-up and after it (0 after: every
step replays the compiled graphs)."""

from __future__ import annotations

import time

import torch

from amer import xla
from amer.bench.harness import BenchOptions, SuiteResult, median
from amer.bench.workloads import OPTIMIZER_SETTINGS, build_model, make_batch, train_step, with_stp
from amer.config import ModelConfig
from amer.training.optim import make_optimizer

__all__ = ["suite_xla"]


def suite_xla(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("xla")
    if not xla.available():
        res.notes.append("skipped: torch_xla is not installed (it needs its own environment with torch 2.9.1: "
                         "pip install -e '.[xla]'; see docs/scaling.md)")
        return res
    cfg = ModelConfig.from_preset(opts.preset)
    batch = make_batch(cfg.vocab_size, opts.batch, opts.seq_len, opts.seed)
    for label, device in (("eager cpu", torch.device("cpu")), ("xla", xla.xla_device())):
        model = build_model(cfg, opts.seed)
        if xla.is_xla(device):
            model = xla.move(model, device)
        fn = train_step(model, batch, with_stp(model, 4), make_optimizer(model, OPTIMIZER_SETTINGS))

        def timed() -> float:
            t0 = time.perf_counter()
            fn()
            xla.wait(device)
            return time.perf_counter() - t0

        c0 = xla.compile_count()
        first = timed()
        for _ in range(max(opts.warmup, 2) - 1):
            timed()
        c1 = xla.compile_count()
        times = [timed() for _ in range(opts.repeats)]
        c2 = xla.compile_count()
        on_xla = xla.is_xla(device)
        res.rows.append({"name": label, "first_step_s": first, "ms": median(times) * 1e3,
                         "graphs_warmup": c1 - c0 if on_xla else "", "graphs_after": c2 - c1 if on_xla else ""})
    res.notes.append(f"{opts.preset} preset, batch {opts.batch}x{opts.seq_len}, full step (forward + backward + clip "
                     "+ AdamW) with STP on the last block of each family (n_spans 4); on XLA the MoE runs the static "
                     "causal capacity dispatch; graphs_after must be 0")
    return res
