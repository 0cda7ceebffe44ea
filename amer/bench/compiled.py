"""The ``compiled`` suite: the training step with regionally compiled blocks (:mod:`amer.training.compile`)
vs eager, with the compile time, for the preset as it is (dropless MoE on grouped GEMM, compiled too) and with the
capacity MoE dispatch."""

from __future__ import annotations

import time

from amer.bench.harness import BenchOptions, SuiteResult, interleave, median, paired_ratio
from amer.bench.workloads import OPTIMIZER_SETTINGS, build_model, family_config, make_batch, no_stp, train_step
from amer.config import ModelConfig, to_dict
from amer.training.compile import compile_blocks
from amer.training.optim import make_optimizer

__all__ = ["suite_compile"]


def suite_compile(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("compiled")
    base = ModelConfig.from_preset(opts.preset)
    moe = {**to_dict(base)["moe"], "dispatch": "capacity"}
    configs = {"dropless": base, "capacity": family_config(base, base.pattern, moe=moe)}
    batch = make_batch(base.vocab_size, opts.batch, opts.seq_len, opts.seed)
    backend = opts.compile_backend or ("aot_eager" if opts.quick else "inductor")
    for label, cfg in configs.items():
        fns, compile_s, described = {}, 0.0, ""
        for mode in ("eager", "compiled"):
            model = build_model(cfg, opts.seed)
            if mode == "compiled":
                described = compile_blocks(model, backend=backend).describe()
            fn = train_step(model, batch, no_stp(model), make_optimizer(model, OPTIMIZER_SETTINGS))
            t0 = time.perf_counter()
            fn()  # eager: the first call; compiled: tracing and code generation happen here
            if mode == "compiled":
                compile_s = time.perf_counter() - t0
            fns[mode] = fn
        times = interleave(fns, opts.repeats, opts.warmup)
        for mode in fns:
            res.rows.append({"name": f"{label} {mode}", "ms": median(times[mode]) * 1e3,
                             "speedup": paired_ratio(times["eager"], times[mode]),
                             "first_step_s": compile_s if mode == "compiled" else ""})
        res.notes.append(f"{label}: {described}")
    res.notes.append(f"{opts.preset} preset, batch {opts.batch}x{opts.seq_len}, full step (forward + backward + clip "
                     f"+ AdamW, no STP); backend {backend}; speedup = median of per-round (eager / compiled); "
                     "first_step_s: the first compiled step, tracing and code generation included; target >= 1.15")
    return res
