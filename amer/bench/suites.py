"""The amer-only suites: blocks, stp, taps, scaling, flops (``peers`` lives in :mod:`amer.bench.peers`).

Per-family rows come from the family registry: one single-family stack per registered family.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from amer.bench.flops import training_flops
from amer.bench.harness import MB, BenchOptions, SuiteResult, interleave, median, paired_ratio, peak_tensor_bytes
from amer.bench.opprofile import op_profile
from amer.bench.workloads import (
    OPTIMIZER_SETTINGS,
    STP_SPANS,
    build_model,
    family_config,
    make_batch,
    no_stp,
    single_family_stacks,
    train_step,
    with_stp,
)
from amer.config import ModelConfig
from amer.model import HybridLM
from amer.tap import last_of_each_family
from amer.training.optim import make_optimizer

__all__ = ["suite_blocks", "suite_stp", "suite_taps", "suite_scaling", "suite_flops", "suite_packing"]


def suite_blocks(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("blocks")
    base = ModelConfig.from_preset(opts.preset)
    B, T = opts.batch, opts.seq_len
    batch = make_batch(base.vocab_size, B, T, opts.seed)
    depth = 2 if opts.quick else 4
    variants: dict[str, tuple[str, HybridLM]] = {
        letter: (cfg.pattern, build_model(cfg, opts.seed, opts.compile))
        for letter, cfg in single_family_stacks(base, depth).items()}
    variants[opts.preset] = (base.pattern, build_model(base, opts.seed, opts.compile))
    fns = {name: train_step(model, batch, no_stp(model), None) for name, (_, model) in variants.items()}
    times = interleave(fns, opts.repeats, opts.warmup)
    for name, (pat, model) in variants.items():
        t = median(times[name])
        res.rows.append({"name": name, "pattern": pat, "params_M": model.num_params() / 1e6,
                         "batch": f"{B}x{T}", "ms": t * 1e3, "tokens_per_s": B * T / t})
    res.notes.append("forward+backward (cross-entropy + MoE aux, every tap recorded), no optimizer step; "
                     f"single-family stacks at the {opts.preset} preset's dimensions")
    return res


def _preset_step(opts: BenchOptions) -> tuple[HybridLM, torch.optim.Optimizer, dict[str, Tensor]]:
    """The preset's model, the training loop's optimizer for it, and one batch: what a full step needs."""
    cfg = ModelConfig.from_preset(opts.preset)
    model = build_model(cfg, opts.seed, opts.compile)
    return model, make_optimizer(model, OPTIMIZER_SETTINGS), make_batch(cfg.vocab_size, opts.batch, opts.seq_len,
                                                                        opts.seed)


def suite_stp(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("stp")
    model, opt, batch = _preset_step(opts)
    fns = {"off": train_step(model, batch, no_stp(model), opt)}
    for n in STP_SPANS:
        fns[f"n_spans={n}"] = train_step(model, batch, with_stp(model, n), opt)
    times = interleave(fns, opts.repeats, opts.warmup)
    base = median(times["off"])
    res.rows.append({"name": "off", "ms": base * 1e3, "ratio": 1.0})
    for n in STP_SPANS:
        key = f"n_spans={n}"
        res.rows.append({"name": key, "ms": median(times[key]) * 1e3, "ratio": paired_ratio(times[key], times["off"])})
    res.notes.append(f"{opts.preset} preset, batch {opts.batch}x{opts.seq_len}, "
                     f"STP on {last_of_each_family(model.pattern)} "
                     "with the document-id mask; step = forward + backward + clip + AdamW; ratio = median of "
                     "per-round (STP step / plain step); target <= 1.02 at n_spans=4, flat in n_spans")
    return res


def suite_packing(opts: BenchOptions) -> SuiteResult:
    """The full step with packed documents kept apart vs run straight through, at the preset's sequence
    length and at 8x it (the same tokens per batch), with short documents and with documents as long as
    the bundled corpus's (its chapters average 3,560 bytes)."""
    res = SuiteResult("packing")
    base = ModelConfig.from_preset(opts.preset)
    tokens = opts.batch * opts.seq_len
    for T in (opts.seq_len, 8 * opts.seq_len):
        cfg = family_config(base, base.pattern, max_seq_len=max(base.max_seq_len, T))
        model = build_model(cfg, opts.seed, opts.compile)
        opt = make_optimizer(model, OPTIMIZER_SETTINGS)
        B = max(1, tokens // T)
        for mean_doc in (96, 3560):
            batch = make_batch(cfg.vocab_size, B, T, opts.seed, mean_doc=mean_doc)
            fns = {"none": train_step(model, batch, no_stp(model), opt, documents=False),
                   "documents": train_step(model, batch, no_stp(model), opt, documents=True)}
            times = interleave(fns, opts.repeats, opts.warmup)
            res.rows.append({"seq_len": T, "batch": f"{B}x{T}", "mean_doc": mean_doc,
                             "docs_per_row": round(float(batch["doc_ids"][:, -1].float().mean()) + 1, 1),
                             "none_ms": median(times["none"]) * 1e3, "documents_ms": median(times["documents"]) * 1e3,
                             "ratio": paired_ratio(times["documents"], times["none"])})
    res.notes.append(f"{opts.preset} preset, full step (forward + backward + clip + AdamW, no STP); 'documents' "
                     "keeps every block inside each packed document, 'none' runs across them; ratio = median of "
                     "per-round (documents / none); target <= 1.05")
    return res


def suite_taps(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("taps")
    model, opt, batch = _preset_step(opts)
    policy = no_stp(model)
    fns = {"taps=True": train_step(model, batch, policy, opt, taps=True),
           "taps=False": train_step(model, batch, policy, opt, taps=False),
           "taps=True, held": train_step(model, batch, policy, opt, taps=True, hold_output=True),
           "taps=True, held, logits": train_step(model, batch, policy, opt, taps=True, hold_output=True,
                                                 fused_ce=False)}
    times = interleave(fns, opts.repeats, opts.warmup)
    peaks = {name: peak_tensor_bytes(fn) for name, fn in fns.items()}
    for name in fns:
        res.rows.append({"name": name, "ms": median(times[name]) * 1e3,
                         "time_ratio": paired_ratio(times[name], times["taps=False"]),
                         "peak_MB": peaks[name] / MB, "extra_MB": (peaks[name] - peaks["taps=False"]) / MB})
    n_taps = len(model.pattern.layers) + 2
    one = opts.batch * opts.seq_len * model.cfg.d_model * 4
    res.notes.append(f"training step without STP; peak = live tensor bytes during the step (profiler allocator "
                     f"events); for scale, one tap is {one / MB:.2f} MB and the model records {n_taps}. "
                     "the step drops the model output before backward, as the training loop does; 'held' keeps "
                     "it through backward, which pins every tapped state until the step ends; 'logits': the plain LM "
                     "head, whose held (B, T, V) logits do cost memory (the fused head + cross-entropy holds none)")
    return res


def suite_scaling(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("scaling")
    base = ModelConfig.from_preset(opts.preset)
    lengths = (16, 32, 64) if opts.quick else (256, 512, 1024, 2048, 4096)
    contexts = (8, 16, 32) if opts.quick else (256, 512, 1024, 2048, 4096)
    tokens = 2 * lengths[0] if opts.quick else 2048  # tokens per batch at the shorter lengths
    depth = 2
    n_decode = 4 if opts.quick else 32
    max_len = max(max(lengths), max(contexts) + 1)
    for fam, cfg in single_family_stacks(base, depth, max_seq_len=max_len).items():
        model = build_model(cfg, opts.seed, opts.compile)
        fns, shapes = {}, {}
        for T in lengths:
            B = max(1, tokens // T)
            shapes[T] = B
            fns[T] = train_step(model, make_batch(cfg.vocab_size, B, T, opts.seed), no_stp(model), None)
        times = interleave(fns, opts.repeats, opts.warmup)
        for T in lengths:
            peak = peak_tensor_bytes(fns[T])
            B = shapes[T]
            res.rows.append({"name": f"{cfg.pattern} train", "family": fam, "T": T, "batch": B,
                             "tokens_per_s": B * T / median(times[T]), "peak_MB": peak / MB,
                             "peak_KB_per_token": peak / 1024 / (B * T)})
        # decoding: one token after a context of C tokens; the cache is not advanced between timed calls,
        # so every call sees exactly C tokens of context
        dec = {}
        with torch.no_grad():
            model.eval()
            for C in contexts:
                ctx = torch.randint(0, cfg.vocab_size, (1, C), generator=torch.Generator().manual_seed(C))
                cache = model(ctx, taps=False, cache=model.init_cache(1, C + 1)).cache
                nxt = ctx[:, -1:]

                def step(cache: list[Any] = cache, nxt: Tensor = nxt, model: HybridLM = model) -> None:
                    for _ in range(n_decode):
                        model(nxt, taps=False, cache=cache)

                dec[C] = step
            dtimes = interleave(dec, opts.repeats, 1)
            model.train()
        for C in contexts:
            res.rows.append({"name": f"{cfg.pattern} decode", "family": fam, "T": C, "batch": 1,
                             "ms_per_token": median(dtimes[C]) / n_decode * 1e3})
    res.notes.append(f"{depth}-layer single-family stacks at the {opts.preset} preset's dimensions; training rows: "
                     f"forward+backward at {tokens} tokens per batch (batch = {tokens} / T, at least 1); "
                     "decode rows: ms per generated token after T tokens of context (batch 1)")
    return res


def suite_flops(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("flops")
    cfg = ModelConfig.from_preset(opts.preset)
    model = build_model(cfg, opts.seed, opts.compile)
    opt = make_optimizer(model, OPTIMIZER_SETTINGS)
    B, T = opts.batch, opts.seq_len
    batch = make_batch(cfg.vocab_size, B, T, opts.seed)
    flops = training_flops(cfg, B, T)
    n = 256 if opts.quick else 2048
    g = torch.Generator().manual_seed(opts.seed)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    c = torch.empty(n, n)
    reps = max(1, int(2e10 // (2 * n**3))) if not opts.quick else 1  # ~20 GFLOP a call, like the step

    def matmul() -> None:
        for _ in range(reps):
            torch.mm(a, b, out=c)

    fns = {"step": train_step(model, batch, no_stp(model), opt), "matmul": matmul}
    work = {"step": flops["total"]}
    names = {"step": f"{opts.preset} train step"}
    # where the shortfall comes from: each family alone (forward+backward, single-family stacks at these dims)
    depth = 2 if opts.quick else 4
    for fam, fcfg in single_family_stacks(cfg, depth).items():
        fmodel = build_model(fcfg, opts.seed, opts.compile)
        fns[fam] = train_step(fmodel, batch, no_stp(fmodel), None)
        work[fam] = training_flops(fcfg, B, T)["total"]
        names[fam] = f"{fcfg.pattern} fwd+bwd"
    times = interleave(fns, opts.repeats, opts.warmup)
    mm_flops = 2.0 * n**3 * reps
    mm_rate = [mm_flops / t for t in times["matmul"]]
    for key, total in work.items():
        rate = [total / t for t in times[key]]
        res.rows.append({"name": names[key], "GFLOP": total / 1e9, "ms": median(times[key]) * 1e3,
                         "GFLOP_per_s": median(rate) / 1e9,
                         "fraction_of_matmul": median([r / m for r, m in zip(rate, mm_rate)])})
    res.rows.append({"name": f"fp32 matmul {n}^3", "GFLOP": mm_flops / 1e9, "ms": median(times["matmul"]) * 1e3,
                     "GFLOP_per_s": median(mm_rate) / 1e9, "fraction_of_matmul": 1.0})
    # the ceiling: the step's own GEMMs at their own shapes, with every other op taken as free
    prof = op_profile(fns["step"], calls=1 if opts.quick else 3)
    res.rows.append({"name": f"{opts.preset} step, its GEMM ops alone", "GFLOP": prof.gemm_flops / 1e9,
                     "ms": prof.gemm_s * 1e3, "GFLOP_per_s": prof.gemm_rate / 1e9,
                     "fraction_of_matmul": prof.gemm_rate / median(mm_rate)})
    res.notes.append(f"{opts.preset} step by operator (profiled): {prof.describe()}; the GEMM row is the fraction "
                     "the step would reach if every other op took no time")
    terms = ", ".join(f"{k} {v / flops['total']:.1%}" for k, v in flops.items() if k != "total")
    res.notes.append(f"batch {B}x{T}; step = forward + backward + clip + AdamW, no STP; FLOPs by term: {terms}")
    res.notes.append(f"target: fraction_of_matmul >= 0.60 for the {opts.preset} train step; the single-family rows "
                     "(no optimizer; embedding and LM head included) show which blocks hold it back")
    return res
