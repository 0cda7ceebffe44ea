"""Benchmarks: ``python -m amer.bench SUITE`` (or ``amer bench SUITE``).

Suites (``all`` runs every one):

``blocks``   forward+backward tokens/s of single-family stacks (``AAAA``, ``MMMM``, ``EEEE``, ``RRRR``) at the
             ``small`` preset's dimensions, and of the ``small`` preset itself, at batch 8 x 256 tokens.
``stp``      training-step time (forward, backward, clip, AdamW) of the ``small`` preset with STP on four taps
             (``A-1,M-1,E-1,R-1``) at ``n_spans`` 1, 4, 16, divided by the same step without STP.
``taps``     peak tensor memory and step time, taps recorded (``taps=True``) vs none (``taps=False``).
``scaling``  tokens/s and peak memory vs sequence length 256..4096 per family, and decoding latency per token
             vs context length (constant for M, R and E; growing for A, whose KV cache grows).
``flops``    achieved FLOP/s of the ``small`` preset's training step (analytic matmul FLOP count, see
             :func:`training_flops`) divided by a large fp32 matmul's FLOP/s measured in the same run.
``peers``    amer vs Hugging Face transformers (``JambaForCausalLM`` with ``use_mambapy=True``,
             ``Mamba2ForCausalLM``, ``MixtralForCausalLM``) at matched configurations, parameter counts side
             by side; skipped with a message when transformers is not installed (``pip install amer[bench]``).

How figures are taken (so that a noisy, shared machine still gives usable numbers):

* every figure is a median over ``--repeats`` timed runs after warm-up runs;
* every comparison runs its variants in the same process, interleaved round by round (``A B B A A B ...``:
  the order flips each round so neither side always runs "second"), and a ratio is the median of the
  per-round ratios, so a slow spell of the machine hits both sides of a pair alike;
* peak memory is the high-water mark of live tensor bytes during one step, read from the CPU allocator's
  allocation and free events recorded by ``torch.profiler`` (``profile_memory=True``). That counts exactly
  the tensors the step holds (activations, gradients, temporaries) and nothing else: process RSS
  (``resource.getrusage``) would add the interpreter, the libraries and whatever the C allocator keeps
  cached, is a lifetime maximum (one subprocess per variant), and tracemalloc does not see torch's
  allocations at all. Parameters and optimizer state that exist before the step are not counted.

Options: ``--repeats N`` (timed rounds, default 10), ``--warmup N``, ``--quick`` (tiny sizes: a smoke test),
``--threads N`` (torch intra-op threads), ``--malloc tuned|system`` (default tuned, as training runs; see
:func:`amer.runtime.tune_malloc`), ``--out FILE``.

On a machine shared with other busy processes, use ``--threads 1``: with one OpenMP thread per core
and the cores oversubscribed, every parallel op waits for a descheduled sibling thread and a training
step measured 2-20x slower and erratic, while a single thread stays steady and ratios stay sound. The
header prints the load average and warns when it exceeds the core count.

Output: one table per suite on stdout, and the same rows as JSON with ``--out FILE``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from amer.config import ModelConfig, STPConfig, from_dict, to_dict
from amer.model import HybridLM
from amer.objective import STPPolicy
from amer.runtime import tune_malloc

__all__ = [
    "SUITES",
    "BenchOptions",
    "SuiteResult",
    "interleave",
    "paired_ratio",
    "peak_tensor_bytes",
    "training_flops",
    "run_suite",
    "format_table",
    "main",
]

SUITES = ("blocks", "stp", "taps", "scaling", "flops", "peers")
FAMILIES = ("A", "M", "E", "R")
STP_TAPS = "A-1,M-1,E-1,R-1"
STP_SPANS = (1, 4, 16)
MB = 1024.0 * 1024.0


@dataclass
class BenchOptions:
    """What every suite reads: sizes come from ``quick`` (tiny, for the smoke test) or the real settings."""

    repeats: int = 10
    warmup: int = 2
    quick: bool = False
    threads: int | None = None
    seed: int = 0

    @property
    def preset(self) -> str:
        return "tiny" if self.quick else "small"

    @property
    def batch(self) -> int:
        return 2 if self.quick else 8

    @property
    def seq_len(self) -> int:
        return 32 if self.quick else 256


@dataclass
class SuiteResult:
    """Rows of one suite (flat dicts of str/float/int) plus free-text notes (skips, formulas)."""

    suite: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "notes": self.notes}


# ----------------------------------------------------------------------------------------------
# measurement primitives


def interleave(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions interleaved round by round.

    ``warmup`` untimed rounds first (allocator, lazily built optimizer state, first-call dispatch), then
    ``repeats`` timed rounds; the order of the functions is reversed every other round, so over a run
    each one is as often first as last. Returns ``{name: [seconds per round]}`` (rounds aligned, which is
    what :func:`paired_ratio` needs).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of ``num[r] / den[r]``: machine noise that hits a whole round cancels."""
    return statistics.median(n / d for n, d in zip(num, den))


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """High-water mark of live CPU tensor bytes allocated while ``fn`` runs (relative to its start).

    Reads the allocator's ``[memory]`` events from ``torch.profiler`` (``profile_memory=True``): every
    allocation and free with its size, in time order. See the module docstring for why this and not RSS.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# ----------------------------------------------------------------------------------------------
# workloads


@dataclass
class Batch:
    tokens: Tensor  # (B, T)
    targets: Tensor  # (B, T)
    doc_ids: Tensor  # (B, T) packed-document ids, as the training loop feeds the STP mask


def make_batch(vocab: int, batch: int, seq_len: int, seed: int = 0, mean_doc: int = 96) -> Batch:
    """Random tokens packed into documents of random length (mean ``mean_doc``), like the training loader's."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    starts = torch.rand(batch, seq_len, generator=g) < 1.0 / mean_doc
    starts[:, 0] = True
    return Batch(seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), starts.long().cumsum(1) - 1)


def build_model(cfg: ModelConfig, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(cfg).train()


def make_optimizer(model: HybridLM) -> torch.optim.Optimizer:
    """The training loop's own optimizer (:func:`amer.train.make_optimizer`), so the step is the real one."""
    from amer.config import TrainConfig
    from amer.train import make_optimizer as train_optimizer

    return train_optimizer(model, TrainConfig(lr=1e-4))


def no_stp(model: HybridLM) -> STPPolicy:
    return STPPolicy(STPConfig(enabled=False), model.pattern)


def with_stp(model: HybridLM, n_spans: int, layers: str = STP_TAPS) -> STPPolicy:
    return STPPolicy(STPConfig(enabled=True, weight=0.02, n_spans=n_spans, layers=layers), model.pattern)


def train_step(model: HybridLM, batch: Batch, policy: STPPolicy, opt: torch.optim.Optimizer | None, *,
               taps: bool = True, clip: float = 1.0, release: bool = True) -> Callable[[], None]:
    """One training step as :mod:`amer.train` runs it: forward (every tap recorded unless ``taps=False``),
    ``ce + moe_aux (+ coeff * stp)`` with the document-id mask, backward, then (with ``opt``) gradient
    clipping and AdamW. Without ``opt`` it is forward+backward only. The STP coefficient is in force
    (a step far past ``start_step``). The model output (and so the taps) is dropped before backward, as the
    training loop does; ``release=False`` holds it through backward instead."""
    gen = torch.Generator().manual_seed(1234)

    def run() -> None:
        out = model(batch.tokens, taps=taps)
        parts = policy.loss(out, batch.targets, 10**9, mask=batch.doc_ids, generator=gen)
        loss = parts.total
        if release:
            del out, parts
        loss.backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return run


def family_config(base: ModelConfig, pattern: str, **overrides: Any) -> ModelConfig:
    """``base``'s dimensions with another pattern (and overrides such as ``max_seq_len``)."""
    data = to_dict(base)
    data.update(pattern=pattern, **overrides)
    return from_dict(ModelConfig, data)


# ----------------------------------------------------------------------------------------------
# analytic FLOP count


def training_flops(cfg: ModelConfig, batch: int, seq_len: int) -> dict[str, float]:
    """Matmul FLOPs of one training step (forward + backward) of ``cfg`` at ``batch x seq_len``, by term.

    Counting rules (the usual MFU convention: useful matmul work only; elementwise ops, norms,
    softmax, the depthwise convs, the scans' decay algebra and the optimizer are not counted):

    * every weight used as a matmul operand costs 2 FLOPs per multiply-add forward and twice that
      backward (gradient wrt input and wrt weight), i.e. ``6 * n_params_used`` per token; MoE experts
      count only the ``top_k`` experts a token visits (plus the shared expert), the router counts
      fully, the tied LM head counts once, the embedding lookup not at all;
    * attention: ``QK^T`` and ``AV`` over the causal half only, ``2 * 2 * H * hd * (T + 1) / 2`` per
      token forward, times 3 for training (flash-attention's backward recomputation is not counted);
    * Mamba-2 SSD (the chunked algorithm as executed, chunk ``L``, ``c`` chunks, ``P`` head dim, ``N``
      state): per chunk ``C B^T`` (``L x L x N`` per group), the masked ``(L x L) @ (L x P)`` per
      head, the chunk-state ``(P x L) @ (L x N)`` and state-output ``(L x N) @ (N x P)`` per head,
      plus the inter-chunk ``(c+1) x c`` state recurrence; times 2 FLOPs, times 3 for training;
    * RG-LRU: the block-diagonal gate projection (``W x 2 bw`` per token) counts as a matmul, the
      scan itself does not.
    """
    from amer.pattern import Family

    T, D = seq_len, cfg.d_model
    macs: dict[str, float] = {}  # forward multiply-adds per sequence, by term

    def add(key: str, value: float) -> None:
        macs[key] = macs.get(key, 0.0) + value

    for layer in cfg.parsed.layers:
        fam = layer.family
        if fam is Family.ATTENTION:
            a = cfg.attention
            hd = a.head_dim or D // a.n_heads
            add("A/proj", T * (D * (a.n_heads + 2 * a.n_kv_heads) * hd + a.n_heads * hd * D))
            add("A/attention", 2 * a.n_heads * hd * T * (T + 1) / 2)
        elif fam is Family.MAMBA:
            m = cfg.mamba
            d_inner = m.expand * D
            H, P, N, G = d_inner // m.head_dim, m.head_dim, m.d_state, m.n_groups
            conv_dim = d_inner + 2 * G * N
            add("M/proj", T * (D * (d_inner + conv_dim + H) + d_inner * D))
            L = min(m.chunk_size, T)
            c = math.ceil(T / L)
            Tp = c * L
            add("M/ssd", Tp * (G * L * N + H * L * P + 2 * H * P * N) + H * c * c * P * N)
        elif fam is Family.EXPERT:
            e = cfg.moe
            f = e.d_ff or 2 * D
            add("E/router", T * D * e.n_experts)
            add("E/experts", T * e.top_k * 3 * D * f)
            if e.shared_expert:
                add("E/shared", T * 3 * D * (e.d_ff_shared or f))
        else:
            r = cfg.recurrent
            W = r.lru_width or D
            bw = W // r.n_heads
            add("R/proj", T * (D * 2 * W + W * D))
            add("R/gates", T * W * 2 * bw)
    add("lm_head", T * D * cfg.vocab_size)
    flops = {k: 2.0 * 3.0 * v * batch for k, v in macs.items()}
    flops["total"] = sum(flops.values())
    return flops


# ----------------------------------------------------------------------------------------------
# suites


def suite_blocks(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("blocks")
    base = ModelConfig.from_preset(opts.preset)
    B, T = opts.batch, opts.seq_len
    batch = make_batch(base.vocab_size, B, T, opts.seed)
    depth = 2 if opts.quick else 4
    variants: dict[str, tuple[str, HybridLM]] = {}
    for fam in FAMILIES:
        pat = fam * depth
        variants[fam] = (pat, build_model(family_config(base, pat), opts.seed))
    variants[opts.preset] = (base.pattern, build_model(base, opts.seed))
    fns = {name: train_step(model, batch, no_stp(model), None) for name, (_, model) in variants.items()}
    times = interleave(fns, opts.repeats, opts.warmup)
    for name, (pat, model) in variants.items():
        t = median(times[name])
        res.rows.append({"name": name, "pattern": pat, "params_M": model.num_params() / 1e6,
                         "batch": f"{B}x{T}", "ms": t * 1e3, "tokens_per_s": B * T / t})
    res.notes.append("forward+backward (cross-entropy + MoE aux, every tap recorded), no optimizer step; "
                     f"single-family stacks at the {opts.preset} preset's dimensions")
    return res


def suite_stp(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("stp")
    cfg = ModelConfig.from_preset(opts.preset)
    model = build_model(cfg, opts.seed)
    opt = make_optimizer(model)
    batch = make_batch(cfg.vocab_size, opts.batch, opts.seq_len, opts.seed)
    fns = {"off": train_step(model, batch, no_stp(model), opt)}
    for n in STP_SPANS:
        fns[f"n_spans={n}"] = train_step(model, batch, with_stp(model, n), opt)
    times = interleave(fns, opts.repeats, opts.warmup)
    base = median(times["off"])
    res.rows.append({"name": "off", "ms": base * 1e3, "ratio": 1.0})
    for n in STP_SPANS:
        key = f"n_spans={n}"
        res.rows.append({"name": key, "ms": median(times[key]) * 1e3, "ratio": paired_ratio(times[key], times["off"])})
    res.notes.append(f"{opts.preset} preset, batch {opts.batch}x{opts.seq_len}, STP on {STP_TAPS} with the "
                     "document-id mask; step = forward + backward + clip + AdamW; ratio = median of per-round "
                     "(STP step / plain step); target <= 1.02 at n_spans=4, flat in n_spans")
    return res


def suite_taps(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("taps")
    cfg = ModelConfig.from_preset(opts.preset)
    model = build_model(cfg, opts.seed)
    opt = make_optimizer(model)
    batch = make_batch(cfg.vocab_size, opts.batch, opts.seq_len, opts.seed)
    policy = no_stp(model)
    fns = {"taps=True": train_step(model, batch, policy, opt, taps=True),
           "taps=False": train_step(model, batch, policy, opt, taps=False),
           "taps=True, held": train_step(model, batch, policy, opt, taps=True, release=False)}
    times = interleave(fns, opts.repeats, opts.warmup)
    peaks = {name: peak_tensor_bytes(fn) for name, fn in fns.items()}
    for name in fns:
        res.rows.append({"name": name, "ms": median(times[name]) * 1e3,
                         "time_ratio": paired_ratio(times[name], times["taps=False"]),
                         "peak_MB": peaks[name] / MB, "extra_MB": (peaks[name] - peaks["taps=False"]) / MB})
    n_taps = len(model.pattern.layers) + 2
    one = opts.batch * opts.seq_len * cfg.d_model * 4
    res.notes.append(f"training step without STP; peak = live tensor bytes during the step (profiler allocator "
                     f"events); for scale, one tap is {one / MB:.2f} MB and the model records {n_taps}. "
                     "the step drops the model output before backward, as the training loop does; 'held' keeps "
                     "it through backward, which pins every tapped state until the step ends")
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
    for fam in FAMILIES:
        cfg = family_config(base, fam * depth, max_seq_len=max_len)
        model = build_model(cfg, opts.seed)
        fns, shapes = {}, {}
        for T in lengths:
            B = max(1, tokens // T)
            shapes[T] = B
            fns[T] = train_step(model, make_batch(cfg.vocab_size, B, T, opts.seed), no_stp(model), None)
        times = interleave(fns, opts.repeats, opts.warmup)
        for T in lengths:
            peak = peak_tensor_bytes(fns[T])
            B = shapes[T]
            res.rows.append({"name": f"{fam * depth} train", "family": fam, "T": T, "batch": B,
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

                def step(cache: list[Any] = cache, nxt: Tensor = nxt) -> None:
                    for _ in range(n_decode):
                        model(nxt, taps=False, cache=cache)

                dec[C] = step
            dtimes = interleave(dec, opts.repeats, 1)
            model.train()
        for C in contexts:
            res.rows.append({"name": f"{fam * depth} decode", "family": fam, "T": C, "batch": 1,
                             "ms_per_token": median(dtimes[C]) / n_decode * 1e3})
    res.notes.append(f"{depth}-layer single-family stacks at the {opts.preset} preset's dimensions; training rows: "
                     f"forward+backward at {tokens} tokens per batch (batch = {tokens} / T, at least 1); "
                     "decode rows: ms per generated token after T tokens of context (batch 1)")
    return res


def suite_flops(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("flops")
    cfg = ModelConfig.from_preset(opts.preset)
    model = build_model(cfg, opts.seed)
    opt = make_optimizer(model)
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
    # where the shortfall comes from: each family alone (forward+backward, 4-layer stacks at these dims)
    depth = 2 if opts.quick else 4
    for fam in FAMILIES:
        fcfg = family_config(cfg, fam * depth)
        fmodel = build_model(fcfg, opts.seed)
        fns[fam] = train_step(fmodel, batch, no_stp(fmodel), None)
        work[fam] = training_flops(fcfg, B, T)["total"]
    times = interleave(fns, opts.repeats, opts.warmup)
    mm_flops = 2.0 * n**3 * reps
    mm_rate = [mm_flops / t for t in times["matmul"]]
    for key in work:
        rate = [work[key] / t for t in times[key]]
        name = f"{opts.preset} train step" if key == "step" else f"{key * depth} fwd+bwd"
        res.rows.append({"name": name, "GFLOP": work[key] / 1e9, "ms": median(times[key]) * 1e3,
                         "GFLOP_per_s": median(rate) / 1e9,
                         "fraction_of_matmul": statistics.median(r / m for r, m in zip(rate, mm_rate))})
    res.rows.append({"name": f"fp32 matmul {n}^3", "GFLOP": mm_flops / 1e9, "ms": median(times["matmul"]) * 1e3,
                     "GFLOP_per_s": median(mm_rate) / 1e9, "fraction_of_matmul": 1.0})
    terms = ", ".join(f"{k} {v / flops['total']:.1%}" for k, v in flops.items() if k != "total")
    res.notes.append(f"batch {B}x{T}; step = forward + backward + clip + AdamW, no STP; FLOPs by term: {terms}")
    res.notes.append(f"target: fraction_of_matmul >= 0.60 for the {opts.preset} train step; the single-family rows "
                     "(no optimizer; embedding and LM head included) show which blocks hold it back")
    return res


@dataclass
class PeerCase:
    """One side-by-side comparison: an amer model config and a transformers model built to match it."""

    name: str
    hf_class: str
    amer_cfg: ModelConfig
    hf_config: Any
    matched: str


def peer_cases(quick: bool) -> list[PeerCase]:
    """The three matched pairs of issue 6, at the ``small`` preset's dimensions (tiny ones with ``quick``).

    Matching rules: same width, vocabulary, heads / kv heads, state size, expert count, top-k and expert
    width; embeddings tied on both sides; no dropout. A transformers *layer* is a mixer plus its
    feed-forward, an amer *letter* is one of them, so ``n`` Jamba / Mixtral layers are ``2n`` letters.
    Jamba's Mamba is Mamba-1 (selective scan, ``dt_rank = ceil(D / 16)``), amer's M is Mamba-2, so that
    pair matches dimensions, not the exact mixer; every feed-forward is the MoE
    (``expert_layer_period = 1``) because amer's E config is shared by all E letters.
    """
    from transformers import JambaConfig, Mamba2Config, MixtralConfig

    base = ModelConfig.from_preset("tiny" if quick else "small")
    D, V = base.d_model, base.vocab_size
    att, mam, moe = base.attention, base.mamba, base.moe
    f = moe.d_ff or 2 * D
    n_jamba = 2 if quick else 8  # Jamba layers; attention in every 4th (offset 2) or, quick, the 2nd
    period, offset = (2, 1) if quick else (4, 2)
    jamba_pat = "".join(("A" if i % period == offset else "M") + "E" for i in range(n_jamba))
    n_mix = 2 if quick else 4
    n_m = 2 if quick else 8
    common = dict(vocab_size=V, hidden_size=D, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    jamba = JambaConfig(**common, num_hidden_layers=n_jamba, num_attention_heads=att.n_heads,
                        num_key_value_heads=att.n_kv_heads, intermediate_size=f, num_experts=moe.n_experts,
                        num_experts_per_tok=moe.top_k, expert_layer_period=1, expert_layer_offset=0,
                        attn_layer_period=period, attn_layer_offset=offset, mamba_d_state=16,
                        mamba_d_conv=mam.d_conv, mamba_expand=mam.expand, mamba_dt_rank=math.ceil(D / 16),
                        use_mamba_kernels=False, use_mambapy=True, max_position_embeddings=base.max_seq_len,
                        use_cache=False)
    mamba2 = Mamba2Config(**common, num_hidden_layers=n_m, state_size=mam.d_state, head_dim=mam.head_dim,
                          num_heads=mam.expand * D // mam.head_dim, expand=mam.expand, n_groups=mam.n_groups,
                          chunk_size=mam.chunk_size, conv_kernel=mam.d_conv, use_cache=False)
    mixtral = MixtralConfig(**common, num_hidden_layers=n_mix, num_attention_heads=att.n_heads,
                            num_key_value_heads=att.n_kv_heads, intermediate_size=f,
                            num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
                            max_position_embeddings=base.max_seq_len, use_cache=False)
    jamba_mamba = from_dict(type(mam), {**to_dict(mam), "d_state": 16})
    return [
        PeerCase("jamba-like", "JambaForCausalLM", family_config(base, jamba_pat, mamba=to_dict(jamba_mamba)), jamba,
                 f"{n_jamba} Jamba layers (attention where i % {period} == {offset}, MoE FFN in all), d_state 16; "
                 "HF Mamba-1 scan via mambapy (use_mambapy=True)"),
        PeerCase("all-M", "Mamba2ForCausalLM", family_config(base, "M" * n_m), mamba2,
                 f"{n_m} Mamba-2 layers, d_state {mam.d_state}, head_dim {mam.head_dim}, chunk {mam.chunk_size}; "
                 "HF torch_forward (no CUDA kernels)"),
        PeerCase("A+E", "MixtralForCausalLM", family_config(base, "AE" * n_mix), mixtral,
                 f"{n_mix} Mixtral layers (GQA {att.n_heads}/{att.n_kv_heads} + {moe.n_experts} experts top-{moe.top_k})"),
    ]


def _hf_step(model: Any, opt: torch.optim.Optimizer, batch: Batch) -> Callable[[], None]:
    def run() -> None:  # HF shifts the labels by one itself: T - 1 predictions instead of T, same work
        out = model(input_ids=batch.tokens, labels=batch.tokens, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def _amer_peer_step(model: HybridLM, opt: torch.optim.Optimizer, batch: Batch) -> Callable[[], None]:
    def run() -> None:
        out = model(batch.tokens, taps=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten())
        loss = loss + sum(out.aux_losses.values(), torch.zeros(()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def suite_peers(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("peers")
    try:
        import transformers
    except ImportError:
        res.notes.append("skipped: transformers is not installed (pip install 'amer[bench]' for transformers "
                         "and mambapy)")
        return res
    transformers.logging.set_verbosity_error()
    try:
        import mambapy  # noqa: F401
    except ImportError:
        res.notes.append("mambapy is not installed: JambaForCausalLM falls back to its sequential scan "
                         "(far slower than its fastest CPU path)")
    cls = {name: getattr(transformers, name) for name in ("JambaForCausalLM", "Mamba2ForCausalLM", "MixtralForCausalLM")}
    B, T = opts.batch, opts.seq_len
    for case in peer_cases(opts.quick):
        torch.manual_seed(opts.seed)
        hf = cls[case.hf_class](case.hf_config).train()
        amer_model = build_model(case.amer_cfg, opts.seed)
        batch = make_batch(case.amer_cfg.vocab_size, B, T, opts.seed)
        # the same optimizer on both sides (the training loop's own adds clipping and param groups)
        fns = {"amer": _amer_peer_step(amer_model, torch.optim.AdamW(amer_model.parameters(), lr=1e-4), batch),
               "hf": _hf_step(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), batch)}
        times = interleave(fns, opts.repeats, opts.warmup)
        res.rows.append({
            "name": case.name, "peer": case.hf_class, "pattern": case.amer_cfg.pattern,
            "amer_params": amer_model.num_params(), "hf_params": sum(p.numel() for p in hf.parameters()),
            "amer_tok_s": B * T / median(times["amer"]), "hf_tok_s": B * T / median(times["hf"]),
            "speedup": paired_ratio(times["hf"], times["amer"]),
        })
        res.notes.append(f"{case.name}: {case.matched}")
        del hf, amer_model
    res.notes.append(f"training step (forward, backward, AdamW) at batch {B}x{T}; speedup = median of per-round "
                     "(transformers step / amer step); targets: jamba-like >= 5, all-M and A+E >= 1")
    return res


_SUITE_FNS: dict[str, Callable[[BenchOptions], SuiteResult]] = {
    "blocks": suite_blocks,
    "stp": suite_stp,
    "taps": suite_taps,
    "scaling": suite_scaling,
    "flops": suite_flops,
    "peers": suite_peers,
}


def run_suite(name: str, opts: BenchOptions) -> SuiteResult:
    """Run one suite by name (one of :data:`SUITES`)."""
    if name not in _SUITE_FNS:
        raise ValueError(f"unknown benchmark suite {name!r}; accepted: {', '.join(SUITES)}, all")
    return _SUITE_FNS[name](opts)


# ----------------------------------------------------------------------------------------------
# output


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or math.isnan(v) or math.isinf(v):
            return f"{v:g}"
        mag = abs(v)
        if mag >= 1000:
            return f"{v:,.0f}"
        if mag >= 10:
            return f"{v:.1f}"
        if mag >= 1:
            return f"{v:.3f}"
        return f"{v:.4f}"
    return str(v)


def format_table(result: SuiteResult) -> str:
    """A plain-text table of one suite's rows (columns: the union of the rows' keys, in first-seen order)."""
    cols: list[str] = []
    for row in result.rows:
        cols += [k for k in row if k not in cols]
    cells = [[_fmt(row.get(c, "")) for c in cols] for row in result.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    lines = [f"== {result.suite} =="]
    if cols:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))))
        for r in cells:
            lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_avg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="amer bench", description="Benchmarks of amer (tables on stdout, JSON with --out).")
    p.add_argument("suite", nargs="+", help=f"one or more of: {', '.join(SUITES)}, all")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per figure (median reported; default 10, "
                   "3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test): checks that everything runs")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=("system", "tuned"), default="tuned",
                   help="'tuned' (default, as `amer train` and `amer experiment` run) keeps freed large blocks "
                   "mapped (glibc mallopt; see amer.runtime.tune_malloc); 'system' leaves glibc's defaults")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    """``amer bench SUITE... [--repeats N] [--quick] [--threads N] [--out FILE]``; bad input exits 2."""
    p = build_parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line error
        return int(e.code or 0)
    names: list[str] = []
    for s in args.suite:
        for part in s.split(","):
            part = part.strip()
            if part == "all":
                names += [n for n in SUITES if n not in names]
            elif part in SUITES:
                names += [part] if part not in names else []
            else:
                import difflib

                close = difflib.get_close_matches(part, list(SUITES) + ["all"], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                print(f"error: unknown benchmark suite {part!r}{hint} (accepted: {', '.join(SUITES)}, all)",
                      file=sys.stderr)
                return 2
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeats < 1:
        print(f"error: --repeats must be >= 1, got {repeats}", file=sys.stderr)
        return 2
    if warmup < 0:
        print(f"error: --warmup must be >= 0, got {warmup}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    if args.out is not None:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            print(f"error: --out {args.out}: directory {out_dir} does not exist", file=sys.stderr)
            return 2
    if args.malloc == "tuned" and not tune_malloc():
        print("note: --malloc tuned needs glibc (mallopt); running with the system allocator", file=sys.stderr)
        args.malloc = "system"
    opts = BenchOptions(repeats=repeats, warmup=warmup, quick=args.quick, threads=args.threads, seed=args.seed)
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(names, opts, args.out, args.malloc)
    finally:  # main() is also called in-process (tests, amer.cli): leave the thread count as found
        torch.set_num_threads(threads_before)


def _run(names: list[str], opts: BenchOptions, out: str | None, malloc: str) -> int:
    repeats, warmup = opts.repeats, opts.warmup
    info = machine_info()
    print(f"amer bench on {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads), "
          f"torch {info['torch']}, {info['date']}; median of {repeats} after {warmup} warm-up; "
          f"malloc {malloc}; load average {info['load_avg']}"
          + (" [quick]" if opts.quick else ""), flush=True)
    load = info["load_avg"]
    if load is not None and info["cores"] and load > info["cores"] - 0.5 and torch.get_num_threads() > 1:
        print(f"warning: the machine is busy (load average {load} on {info['cores']} cores); with "
              f"{torch.get_num_threads()} threads per op, timings stall on threads that are not scheduled. "
              "--threads 1 measures robustly on a shared machine", flush=True)
    results: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        res = run_suite(name, opts)
        print(format_table(res), flush=True)
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
        results[name] = res.as_dict()
    if out is not None:
        payload = {"machine": info, "options": {"repeats": repeats, "warmup": warmup, "quick": opts.quick,
                                                "threads": opts.threads, "seed": opts.seed, "malloc": malloc},
                   "suites": results}
        try:
            with open(out, "w") as f:
                json.dump(payload, f, indent=2)
        except OSError as e:
            print(f"error: --out {out}: {e.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
