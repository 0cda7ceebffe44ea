"""Memory suites: the fused LM head + cross-entropy (``lmhead``) and activation checkpointing (``checkpointing``).

Both time the full training step (forward, backward, clip, AdamW) with the variants interleaved round by
round, and read each variant's peak from the allocator's events (:func:`amer.bench.harness.peak_tensor_bytes`:
live tensor bytes during one step, after warm-up, so the optimizer state already exists and is not counted).
"""

from __future__ import annotations

from amer.bench.harness import MB, BenchOptions, SuiteResult, interleave, median, paired_ratio, peak_tensor_bytes
from amer.bench.workloads import OPTIMIZER_SETTINGS, build_model, family_config, make_batch, no_stp, train_step
from amer.config import ModelConfig
from amer.training.checkpointing import MODES, apply_activation_checkpointing
from amer.training.optim import make_optimizer

__all__ = ["suite_lmhead", "suite_checkpointing"]


def suite_lmhead(opts: BenchOptions) -> SuiteResult:
    """Plain LM head + cross-entropy (the (B, T, V) logits, their fp32 log-softmax and gradient) vs the fused,
    chunked one, at vocabulary 32,768 and sequence 2,048 on the preset's blocks."""
    res = SuiteResult("lmhead")
    V, B, T = (2048, 2, 64) if opts.quick else (32768, 1, 2048)
    base = ModelConfig.from_preset(opts.preset)
    cfg = family_config(base, base.pattern, vocab_size=V, max_seq_len=max(base.max_seq_len, T))
    model = build_model(cfg, opts.seed, opts.compile)
    opt = make_optimizer(model, OPTIMIZER_SETTINGS)
    batch = make_batch(V, B, T, opts.seed)
    fns = {"plain": train_step(model, batch, no_stp(model), opt, fused_ce=False),
           "fused": train_step(model, batch, no_stp(model), opt, fused_ce=True)}
    times = interleave(fns, opts.repeats, opts.warmup)
    peaks = {name: peak_tensor_bytes(fn) for name, fn in fns.items()}
    logits = B * T * V * 4
    for name in fns:
        res.rows.append({"name": name, "ms": median(times[name]) * 1e3,
                         "time_ratio": paired_ratio(times[name], times["plain"]), "peak_MB": peaks[name] / MB,
                         "saved_MB": (peaks["plain"] - peaks[name]) / MB,
                         "saved_in_logits": (peaks["plain"] - peaks[name]) / logits})
    res.notes.append(f"{opts.preset} preset blocks, vocabulary {V}, batch {B}x{T}, full step (forward + backward + "
                     f"clip + AdamW, no STP); one fp32 copy of the logits is {logits / MB:.0f} MB; time_ratio = "
                     "median of per-round (variant / plain); target: saved_in_logits >= 1 at time_ratio <= 1.05")
    return res


def suite_checkpointing(opts: BenchOptions) -> SuiteResult:
    """Peak memory and step time per ``--activation-checkpointing`` setting at sequence 4,096."""
    res = SuiteResult("checkpointing")
    B, T = (2, 64) if opts.quick else (1, 4096)
    base = ModelConfig.from_preset(opts.preset)
    cfg = family_config(base, base.pattern, max_seq_len=max(base.max_seq_len, T))
    batch = make_batch(cfg.vocab_size, B, T, opts.seed, mean_doc=3560)
    fns = {}
    for mode in MODES:
        model = build_model(cfg, opts.seed, opts.compile)
        apply_activation_checkpointing(model, mode)
        fns[mode] = train_step(model, batch, no_stp(model), make_optimizer(model, OPTIMIZER_SETTINGS))
    times = interleave(fns, opts.repeats, opts.warmup)
    peaks = {name: peak_tensor_bytes(fn) for name, fn in fns.items()}
    for mode in MODES:
        res.rows.append({"name": mode, "ms": median(times[mode]) * 1e3,
                         "time_ratio": paired_ratio(times[mode], times["none"]), "peak_MB": peaks[mode] / MB,
                         "peak_ratio": peaks[mode] / peaks["none"]})
    res.notes.append(f"{opts.preset} preset, batch {B}x{T}, documents packed (mean 3,560 tokens), full step "
                     "(forward + backward + clip + AdamW, no STP, fused LM head + cross-entropy); 'blocks' "
                     "recomputes each block in backward, 'selective' every other block")
    return res
