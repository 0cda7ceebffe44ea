"""The STP paper's headline experiment on NL-RX-SYNTH, from scratch, at CPU scale.

Claim under test (Huang, LeCun, Balestriero, arXiv 2602.22617): on NL-RX-SYNTH (natural language
to regular expression) Semantic Tube Prediction lets a model match the next-token baseline's
exact-match accuracy with 16x less training data, and held-out STP loss falls steadily as lambda
grows while cross-entropy stays flat (its Figure 4b). The paper fine-tunes pretrained 1-8B models;
here small hybrid models are trained from scratch, so the result may differ either way, and the
report says which from the numbers.

Task framing (one example = one sequence, never packed with another)::

    [BOS] "<|user|>\\n" description "\\n<|assistant|>\\n" regex [EOS] [PAD ...]

The prompt is the chat template of :func:`amer.data.render_chat_with_spans` with the generation
prompt; the constant system turn is left out by default (``--system-prompt`` keeps it) because a
model trained from scratch learns nothing from it and it would cost a third of the compute.
Next-token loss on the regex bytes and the EOS only (targets are -100 elsewhere). The STP mask is
a document id per position: the example's index for every real token (template, description,
regex, EOS), -1 for padding, so STP triples never leave their example or touch padding.

Grid: models x lambda x STP taps x data fraction x seed. Every arm of one seed shares the
initialisation, the training subset (nested: 1/16 is inside 1/4 is inside 1) and the batch order,
so STP vs NTP differences are paired. All arms run the same optimizer steps and batch size, so a
smaller fraction is seen for proportionally more epochs (equal compute).

Evaluation on the test rows: greedy decoding with the decoding caches and exact string match
(surrounding whitespace stripped, see :func:`exact_match`), held-out cross-entropy on the target
tokens, held-out STP loss on both tap selections (fixed spans, identical for every arm), and the
effective rank of the final hidden states (a representation-collapse check).

Resumable: each finished arm is written to ``OUT/arms/<arm-id>.json`` and skipped when present;
the report (``results.json``, ``results.md``, ``results.png``) is rebuilt from those files.

Default grid (sized for at most 90 minutes on 2 cores): ``dense=(AE)*2`` (239k parameters) and
``hybrid=AMER`` (173k) at d_model 64; 1000 steps x batch 16 per arm (16k examples: 2 epochs of the full
set, 8 of 1/4, 32 of 1/16), lr 3e-3 with 5% warm-up and cosine decay; three seeds. The full lambda sweep
{0, .005, .01, .02, .04, .08} x taps {final, family} runs at fraction 1; fractions 1/4 and 1/16 run NTP
and lambda 0.02 (the paper's best on SYNTH) with both taps: 102 arms. ``--lambdas-small all`` runs the
full 198-arm cross instead. Measured on 2 cores (AMD EPYC, 2026-12-01), one thread per worker, two
workers: ~44 s (dense) / ~48 s (hybrid) of training and ~7-8 s of evaluation per arm; the default grid
~47 min, the full cross 90 min. NTP reaches ~31% (dense) and ~41% (hybrid) exact match at fraction 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

from amer.config import (AttentionConfig, ConfigError, MambaConfig, ModelConfig, MoEConfig, RecurrentConfig, STPConfig,
                         TrainConfig)
from amer.data import ByteTokenizer, DataError, char_spans_to_byte_spans, iter_jsonl, render_chat_with_spans
from amer.model import HybridLM
from amer.objective import STPPolicy, cross_entropy
from amer.pattern import PatternError
from amer.runtime import tune_malloc
from amer.tap import SelectorError

__all__ = [
    "ExperimentError",
    "Example",
    "load_examples",
    "encode_example",
    "ExampleSet",
    "exact_match",
    "normalize_regex",
    "greedy_decode",
    "betainc",
    "t_two_sided_p",
    "paired_ttest",
    "spearman",
    "effective_rank",
    "family_selector",
    "model_config",
    "Settings",
    "Arm",
    "build_grid",
    "run_grid",
    "summarize",
    "main",
]

TRAIN_FILE = "synth_train.jsonl"
TEST_FILE = "synth_test.jsonl"
ENV_DIR = "AMER_NLRX_DIR"
IGNORE = -100
TAPS = ("final", "family")
NTP = "ntp"  # the taps label of lambda-0 arms: no STP term, so no selection
PROTOCOL = 1  # bump when a code change alters what an arm measures: stale arm files are then refused


class ExperimentError(ValueError):
    """Bad experiment input (flags, data directory, stale results); the message says what is accepted."""


# ----------------------------------------------------------------------------------------------
# data


class Example(NamedTuple):
    prompt: str  # the user turn: a description in English
    target: str  # the assistant turn: the reference regex
    system: str | None = None  # the system turn, if the row has one


def _parse_row(rec: Any, where: str) -> Example:
    if not isinstance(rec, dict) or "messages" not in rec:
        got = sorted(rec)[:5] if isinstance(rec, dict) else type(rec).__name__
        raise DataError(f'{where}: expected a chat record {{"messages": [...]}}, got {got}')
    msgs = rec["messages"]
    render_chat_with_spans(msgs, where=where)  # the one place message shapes are validated
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles:
        raise DataError(f"{where}: no assistant turn (the reference regex); roles were {roles}")
    a = len(roles) - 1 - roles[::-1].index("assistant")
    users = [i for i in range(a) if roles[i] == "user"]
    if not users:
        raise DataError(f"{where}: no user turn before the assistant turn; roles were {roles}")
    systems = [m["content"] for m in msgs[: users[-1]] if m["role"] == "system"]
    return Example(msgs[users[-1]]["content"], msgs[a]["content"], systems[-1] if systems else None)


def load_examples(path: str | os.PathLike[str], *, limit: int | None = None) -> list[Example]:
    """(prompt, target) pairs of a chat JSONL file: prompt = the last user turn before the last
    assistant turn, target = that assistant turn. ``limit`` keeps the first rows only."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"NL-RX file not found: {p}")
    out: list[Example] = []
    accepts = 'each line must be a chat record {"messages": [{"role", "content"}, ...]}'
    for where, rec in iter_jsonl(p, accepts):
        if limit is not None and len(out) >= limit:
            break
        out.append(_parse_row(rec, where))
    if not out:
        raise DataError(f"{p}: no examples")
    return out


def encode_example(ex: Example, tok: ByteTokenizer, *, system: bool = False) -> tuple[list[int], int]:
    """``([BOS] prompt-render target [EOS], target_start)``; ``ids[:target_start]`` is the generation prompt.

    The render is :func:`render_chat_with_spans` of the (system,) user and assistant turns; its
    assistant span, converted to byte offsets, locates the target, whose closing template newline
    is replaced by EOS (what the model emits to stop).
    """
    msgs = ([{"role": "system", "content": ex.system}] if system and ex.system is not None else [])
    msgs += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.target}]
    text, spans = render_chat_with_spans(msgs)
    (start, end), = char_spans_to_byte_spans(text, spans[-1:])
    body = tok.encode(text)
    ids = [tok.bos_id, *body[:start], *body[start : end - 1], tok.eos_id]  # end-1: drop the turn's "\n"
    return ids, 1 + start


class ExampleSet:
    """Encoded examples, batched one example per row, padded to the batch's longest sequence.

    ``batch(rows)`` gives ``tokens`` (inputs, PAD-padded), ``targets`` (next token on target and EOS
    positions, -100 elsewhere) and ``doc_ids`` (the example's index for real tokens, -1 for
    padding): the STP mask. Works with :class:`amer.data.BatchIterator` (``__len__``, ``batch``, ``name``).
    """

    def __init__(self, examples: Sequence[Example], tok: ByteTokenizer, *, system: bool = False,
                 indices: Sequence[int] | None = None, name: str = "nlrx") -> None:
        self.examples = list(examples)
        self.tok = tok
        self.name = name
        self.indices = list(range(len(self.examples))) if indices is None else list(indices)
        encoded = [encode_example(ex, tok, system=system) for ex in self.examples]
        self.seqs = [e[0] for e in encoded]
        self.starts = [e[1] for e in encoded]

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, rows: Sequence[int]) -> ExampleSet:
        new = object.__new__(ExampleSet)
        new.examples = [self.examples[r] for r in rows]
        new.tok, new.name = self.tok, self.name
        new.indices = [self.indices[r] for r in rows]
        new.seqs = [self.seqs[r] for r in rows]
        new.starts = [self.starts[r] for r in rows]
        return new

    @property
    def max_len(self) -> int:
        return max(len(s) for s in self.seqs)

    def batch(self, rows: Tensor | Sequence[int]) -> dict[str, Tensor]:
        rows = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        T = max(len(self.seqs[r]) for r in rows) - 1
        B = len(rows)
        tokens = torch.full((B, T), self.tok.pad_id, dtype=torch.long)
        targets = torch.full((B, T), IGNORE, dtype=torch.long)
        doc_ids = torch.full((B, T), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            seq, start = self.seqs[r], self.starts[r]
            n = len(seq) - 1
            tokens[b, :n] = torch.tensor(seq[:-1])
            # input position i predicts seq[i+1]; the first target token is predicted at start-1
            targets[b, start - 1 : n] = torch.tensor(seq[start:])
            doc_ids[b, :n] = self.indices[r]
        return {"tokens": tokens, "targets": targets, "doc_ids": doc_ids}


# ----------------------------------------------------------------------------------------------
# scoring and decoding


def normalize_regex(text: str) -> str:
    """Surrounding whitespace removed; everything inside kept (a space inside a regex matches a space)."""
    return text.strip()


def exact_match(prediction: str, reference: str) -> bool:
    """The paper's metric: string equality after :func:`normalize_regex` on both sides.

    Only leading/trailing whitespace is forgiven (a model may emit the template's newline before
    EOS). Case, inner spaces and escapes all count; regexes that are equivalent but spelled
    differently are wrong, as in the paper (no semantic equivalence check).
    """
    return normalize_regex(prediction) == normalize_regex(reference)


@torch.no_grad()
def greedy_decode(model: HybridLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy continuation of each prompt (until EOS, EOS excluded), prompts of any lengths in one batch.

    :meth:`HybridLM.generate` needs equal-length prompts (the caches keep one position for the
    whole batch), and bucketing 2000 prompts by exact length gives ~100 tiny batches. Instead
    every row advances one position per step through the same caches: the shared shortest prefix is
    prefilled, then rows still inside their prompt are fed their next prompt token (teacher-forced)
    while the others are fed their own argmax. Identical to per-row greedy decoding (prefill equals
    token-by-token decoding for every block); sort prompts by length so batches waste few steps.
    """
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    L0, Lmax = int(lens.min()), int(lens.max())
    steps = Lmax - L0 + max_new_tokens
    buf = torch.full((B, Lmax + max_new_tokens), eos_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.tensor(list(p))
    cache = model.init_cache(B, Lmax + max_new_tokens)
    out = model(buf[:, :L0], taps=False, cache=cache)
    cache, logits = out.cache, out.logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool)
    rows = torch.arange(B)
    for k in range(steps):
        pos = L0 + k  # the position being filled
        nxt = logits.argmax(-1)
        generating = pos >= lens
        produced = generating & (pos < lens + max_new_tokens) & ~done
        buf[rows[produced], pos] = nxt[produced]
        done |= (produced & (nxt == eos_id)) | (pos + 1 >= lens + max_new_tokens)
        if bool(done.all()) or k == steps - 1:
            break
        feed = torch.where(generating, torch.where(done, torch.full_like(nxt, eos_id), nxt), buf[:, pos])
        out = model(feed[:, None], taps=False, cache=cache)
        cache, logits = out.cache, out.logits[:, -1]
    result = []
    for i in range(B):
        gen = buf[i, int(lens[i]) : int(lens[i]) + max_new_tokens].tolist()
        result.append(gen[: gen.index(eos_id)] if eos_id in gen else gen)
    return result


# ----------------------------------------------------------------------------------------------
# statistics (no scipy: the regularized incomplete beta by Lentz's continued fraction)


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` (Numerical Recipes 6.4), accurate to ~1e-13."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry otherwise
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t: ``P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2)``."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return min(1.0, betainc(df / 2.0, 0.5, df / (df + t * t)))


def paired_ttest(x: Sequence[float], y: Sequence[float]) -> tuple[float | None, float | None]:
    """``(t, two-sided p)`` of the paired t-test of ``x - y``; ``(None, None)`` with fewer than 2 pairs.

    Identical pairs give ``(0, 1)``; a constant non-zero difference gives ``(+-inf, 0)``.
    """
    if len(x) != len(y):
        raise ValueError(f"paired samples must have equal length, got {len(x)} and {len(y)}")
    n = len(x)
    if n < 2:
        return None, None
    d = [a - b for a, b in zip(x, y)]
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    if sd <= 1e-15 * max(1.0, abs(mean)):
        return (0.0, 1.0) if abs(mean) <= 1e-15 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return t, t_two_sided_p(t, n - 1)


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties averaged); None when either side is constant or n < 2."""
    if len(x) != len(y) or len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _mean_std(v: Sequence[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def effective_rank(h: Tensor) -> float:
    """``exp(entropy(s / sum(s)))`` of the singular values of ``h`` (N, D) (Roy & Vetterli 2007; RankMe).

    1 for a rank-one (collapsed) set of states, D for singular values all equal. Uncentred, as in RankMe.
    """
    s = torch.linalg.svdvals(h.double())
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


# ----------------------------------------------------------------------------------------------
# models


def model_config(pattern: str, d_model: int, max_seq_len: int = 384) -> ModelConfig:
    """A small model for this task: 4 attention heads, Mamba-2 with 16-dim heads and state, 4 experts top-2."""
    if d_model % 16:
        raise ExperimentError(f"--d-model must be a multiple of 16 (attention and Mamba heads are 16 wide), got {d_model}")
    return ModelConfig(
        pattern=pattern, d_model=d_model, max_seq_len=max_seq_len,
        attention=AttentionConfig(n_heads=max(2, d_model // 16), n_kv_heads=max(1, d_model // 32)),
        mamba=MambaConfig(d_state=16, head_dim=16, expand=2, chunk_size=64),
        moe=MoEConfig(n_experts=4, top_k=2, d_ff=2 * d_model),
        recurrent=RecurrentConfig(n_heads=2),
    )


def family_selector(cfg: ModelConfig) -> str:
    """The last block of each family present, in depth order of first appearance: ``"A-1,M-1,E-1,R-1"``."""
    fams: list[str] = []
    for layer in cfg.parsed.layers:
        if layer.family.value not in fams:
            fams.append(layer.family.value)
    return ",".join(f"{f}-1" for f in fams)


# ----------------------------------------------------------------------------------------------
# grid


@dataclass
class Settings:
    """Everything one invocation needs. Fields in :meth:`fingerprint` change results; the rest only pick arms."""

    data_dir: str
    out: str
    models: list[tuple[str, str]]  # (name, pattern)
    lambdas: list[float]  # the sweep, run at the largest fraction
    taps: list[str]
    fractions: list[str]  # "1", "1/4", "1/16"
    seeds: list[int]
    lambdas_small: list[float] | None = None  # lambdas at the smaller fractions; None = the whole sweep
    d_model: int = 64
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    n_spans: int = 4
    eval_spans: int = 16
    train_rows: int | None = None
    test_rows: int | None = None
    system_prompt: bool = False
    max_new_tokens: int = 64
    decode_batch: int = 256
    eval_batch: int = 128
    erank_tokens: int = 8192
    threads: int | None = None
    workers: int = 1
    data_sha: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        keys = ("d_model", "steps", "batch_size", "lr", "warmup_steps", "weight_decay", "n_spans", "eval_spans",
                "train_rows", "test_rows", "system_prompt", "max_new_tokens", "erank_tokens", "data_sha")
        return {"protocol": PROTOCOL, **{k: getattr(self, k) for k in keys}}


@dataclass(frozen=True)
class Arm:
    model: str
    pattern: str
    lam: float
    taps: str  # "final" | "family" | "ntp" (lambda 0)
    fraction: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.model}_lam{self.lam:g}_{self.taps}_f{self.fraction.replace('/', '-')}_s{self.seed}"

    @property
    def group(self) -> tuple[str, float, str, str]:
        """The arm without its seed: what means and stds are taken over."""
        return self.model, self.lam, self.taps, self.fraction


def build_grid(s: Settings) -> list[Arm]:
    """Every arm, seed-major so an interrupted grid already has complete seeds: per seed, per model,
    per fraction, NTP first then each (lambda, taps). Lambda 0 is one arm (taps are irrelevant).

    The whole lambda sweep runs at the largest fraction (what the Figure-4b check reads); the smaller
    fractions run ``lambdas_small`` (the data-efficiency check needs NTP and the candidate lambda),
    which keeps the default grid inside its time budget.
    """
    arms: list[Arm] = []
    top = max(s.fractions, key=Fraction)
    for seed in s.seeds:
        for name, pattern in s.models:
            for frac in s.fractions:
                lams = s.lambdas if frac == top or s.lambdas_small is None else s.lambdas_small
                for lam in lams:
                    for taps in ([NTP] if lam == 0 else s.taps):
                        arms.append(Arm(name, pattern, lam, taps, frac, seed))
    return arms


class LengthBucketedBatches:
    """Endless seeded batches of an :class:`ExampleSet` with little padding (fairseq-style buckets).

    The row stream is one seeded permutation per epoch, concatenated; each pool of ``pool * batch_size``
    consecutive rows is sorted by length, cut into batches, and those batches are shuffled. Random
    batches of 32 are ~74% real tokens on NL-RX-SYNTH; pools of 16 batches are ~97%, which cuts
    training compute by about a quarter at no cost in what each epoch visits.
    """

    def __init__(self, dataset: ExampleSet, batch_size: int, seed: int, pool: int = 16) -> None:
        self.dataset, self.batch_size, self.pool = dataset, batch_size, pool
        self.gen = torch.Generator().manual_seed(seed)
        self.stream: list[int] = []
        self.ready: list[list[int]] = []
        self.epochs = 0

    def __iter__(self) -> LengthBucketedBatches:
        return self

    def __next__(self) -> dict[str, Tensor]:
        if not self.ready:
            need = self.pool * self.batch_size
            while len(self.stream) < need:
                self.stream += torch.randperm(len(self.dataset), generator=self.gen).tolist()
                self.epochs += 1
            rows, self.stream = self.stream[:need], self.stream[need:]
            rows.sort(key=lambda r: len(self.dataset.seqs[r]))
            chunks = [rows[i : i + self.batch_size] for i in range(0, need, self.batch_size)]
            order = torch.randperm(len(chunks), generator=self.gen).tolist()
            self.ready = [chunks[i] for i in order]
        return self.dataset.batch(self.ready.pop())


def _subset_rows(n_total: int, fraction: str, seed: int) -> list[int]:
    """The first ``fraction`` of a per-seed permutation: nested subsets, shared by every arm of the seed."""
    n = max(1, round(Fraction(fraction) * n_total))
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(10_000 + seed))
    return sorted(perm[:n].tolist())


# ----------------------------------------------------------------------------------------------
# one arm


class Data(NamedTuple):
    train: ExampleSet
    test: ExampleSet


def load_data(s: Settings) -> Data:
    d = Path(s.data_dir)
    tok = ByteTokenizer()
    train = ExampleSet(load_examples(d / TRAIN_FILE, limit=s.train_rows), tok, system=s.system_prompt, name="train")
    test = ExampleSet(load_examples(d / TEST_FILE, limit=s.test_rows), tok, system=s.system_prompt, name="test")
    return Data(train, test)


def _policy(cfg: ModelConfig, lam: float, taps: str, n_spans: int, model: HybridLM) -> STPPolicy:
    if lam == 0 or taps == NTP:
        return STPPolicy(STPConfig(enabled=False), model.pattern)
    sel = "final" if taps == "final" else family_selector(cfg)
    return STPPolicy(STPConfig(enabled=True, weight=lam, layers=sel, n_spans=n_spans), model.pattern)


def train_arm(arm: Arm, s: Settings, data: Data, *, log_every: int = 0) -> tuple[HybridLM, dict[str, Any]]:
    """Train one arm from scratch; returns the model and training figures (last-10% means)."""
    from amer.train import lr_at, make_optimizer

    torch.manual_seed(arm.seed)
    mcfg = model_config(arm.pattern, s.d_model)
    model = HybridLM(mcfg)
    policy = _policy(mcfg, arm.lam, arm.taps, s.n_spans, model)
    tcfg = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps,
                       weight_decay=s.weight_decay, seq_len=mcfg.max_seq_len, seed=arm.seed, model=mcfg,
                       stp=policy.cfg, progress=False, tensorboard=False)
    opt = make_optimizer(model, tcfg)
    subset = data.train.subset(_subset_rows(len(data.train), arm.fraction, arm.seed))
    batches = LengthBucketedBatches(subset, s.batch_size, arm.seed)
    gen = torch.Generator().manual_seed(arm.seed + 1)
    tail = max(1, s.steps // 10)
    ce_tail, stp_tail = [], []
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tcfg)
        b = next(batches)
        out = model(b["tokens"], taps=policy.selector if policy.enabled else False)
        parts = policy.loss(out, b["targets"], step, mask=b["doc_ids"], generator=gen)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= s.steps - tail:
            ce_tail.append(float(parts.ce.detach()))
            stp_tail.append(float(parts.stp.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"    step {step + 1}/{s.steps} ce {float(parts.ce):.4f} stp {float(parts.stp):.4f}", flush=True)
    return model, {
        "train_ce": sum(ce_tail) / len(ce_tail),
        "train_stp": sum(stp_tail) / len(stp_tail) if policy.enabled else None,
        "train_rows": len(subset),
        "epochs": s.steps * s.batch_size / len(subset),
        "train_s": time.perf_counter() - t0,
        "train_cpu_s": time.process_time() - c0,  # = dedicated-core seconds with 1 thread, even on a busy machine
        "params": model.num_params(),
        "stp_selector": policy.selector if policy.enabled else None,
    }


@torch.no_grad()
def evaluate(model: HybridLM, test: ExampleSet, s: Settings, *, decode: bool = True) -> dict[str, Any]:
    """Held-out CE (target tokens), held-out STP per selection, effective rank, greedy exact match."""
    model.eval()
    cfg = model.cfg
    t0, c0 = time.perf_counter(), time.process_time()
    selections = {"final": "final", "family": family_selector(cfg)}
    pols = {k: STPPolicy(STPConfig(enabled=True, weight=1.0, layers=v, n_spans=s.eval_spans), model.pattern)
            for k, v in selections.items()}
    gens = {k: torch.Generator().manual_seed(1234) for k in selections}  # same spans for every arm
    ce_sum, n_tok = 0.0, 0
    stp_sum = {k: 0.0 for k in selections}
    finals: list[Tensor] = []
    n_final = 0
    n = len(test)
    for start in range(0, n, s.eval_batch):
        rows = list(range(start, min(n, start + s.eval_batch)))
        b = test.batch(rows)
        out = model(b["tokens"], taps=True)
        k = int((b["targets"] != IGNORE).sum())
        ce_sum += float(cross_entropy(out.logits, b["targets"])) * k
        n_tok += k
        for name, pol in pols.items():
            stp_sum[name] += float(pol.stp_loss(out.taps, mask=b["doc_ids"], generator=gens[name])[0]) * len(rows)
        if n_final < s.erank_tokens:
            h = out.taps.final.hidden[b["doc_ids"] >= 0]  # (N, D) real tokens only
            finals.append(h[: s.erank_tokens - n_final])
            n_final += finals[-1].shape[0]
    res: dict[str, Any] = {
        "heldout_ce": ce_sum / max(n_tok, 1),
        "heldout_stp_final": stp_sum["final"] / n,
        "heldout_stp_family": stp_sum["family"] / n,
        "family_selector": selections["family"],
        "erank": effective_rank(torch.cat(finals)),
        "erank_tokens": n_final,
    }
    if decode:
        tok = test.tok
        order = sorted(range(n), key=lambda i: test.starts[i])  # similar lengths share a batch
        preds: dict[int, str] = {}
        for c in range(0, n, s.decode_batch):
            idx = order[c : c + s.decode_batch]
            prompts = [test.seqs[i][: test.starts[i]] for i in idx]
            max_new = min(s.max_new_tokens, cfg.max_seq_len - max(len(p) for p in prompts))
            for i, gen in zip(idx, greedy_decode(model, prompts, max_new, tok.eos_id)):
                preds[i] = tok.decode(gen)
        correct = [exact_match(preds[i], test.examples[i].target) for i in range(n)]
        res.update({
            "accuracy": sum(correct) / n,
            "n_correct": sum(correct),
            "n_test": n,
            "samples": [{"prompt": test.examples[i].prompt, "reference": test.examples[i].target,
                         "prediction": preds[i], "correct": correct[i]} for i in range(min(n, 5))],
        })
    res["eval_s"] = time.perf_counter() - t0
    res["eval_cpu_s"] = time.process_time() - c0
    model.train()
    return res


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # atomic: an interrupted write never leaves a half arm behind


def run_arm(arm: Arm, s: Settings, data: Data) -> dict[str, Any]:
    model, tr = train_arm(arm, s, data)
    ev = evaluate(model, data.test, s)
    return {"arm": asdict(arm), "id": arm.id, "settings": s.fingerprint(), **tr, **ev}


def _check_stale(path: Path, s: Settings) -> dict[str, Any]:
    rec = json.loads(path.read_text())
    old = rec.get("settings", {})
    new = json.loads(json.dumps(s.fingerprint()))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ExperimentError(
            f"{path} was produced with different settings ({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)}); "
            "use another --out, or delete that directory to start over")
    return rec


_WORKER_DATA: Data | None = None


def _worker_init(s: Settings) -> None:
    global _WORKER_DATA
    tune_malloc()
    torch.set_num_threads(s.threads or 1)
    _WORKER_DATA = load_data(s)


def _worker_run(job: tuple[Arm, Settings]) -> dict[str, Any]:
    arm, s = job
    assert _WORKER_DATA is not None
    rec = run_arm(arm, s, _WORKER_DATA)
    _write_json(Path(s.out) / "arms" / f"{arm.id}.json", rec)  # written here: a crash elsewhere keeps it
    return rec


def _say(*args: Any) -> None:
    print(*args, flush=True)


def run_grid(s: Settings, *, say=_say) -> list[dict[str, Any]]:
    """Run (or skip, when already written) every arm of the grid; returns all arm records.

    With ``s.workers > 1`` arms run in that many processes of ``s.threads or 1`` torch threads each:
    these models are too small for intra-op threads to pay, so two single-threaded arms at once on
    two cores nearly double the throughput of one two-threaded arm.
    """
    out = Path(s.out)
    arms_dir = out / "arms"
    arms_dir.mkdir(parents=True, exist_ok=True)
    grid = build_grid(s)
    have = {a.id: _check_stale(arms_dir / f"{a.id}.json", s) for a in grid if (arms_dir / f"{a.id}.json").is_file()}
    todo = [a for a in grid if a.id not in have]
    say(f"nlrx: {len(grid)} arms ({len(have)} already done, {len(todo)} to run) -> {out}")
    if todo:
        data = load_data(s)
        say(f"data: {len(data.train)} train / {len(data.test)} test examples from {s.data_dir}; "
            f"{s.steps} steps x batch {s.batch_size} per arm")
    t_start = time.perf_counter()
    workers = min(s.workers, len(todo))
    if workers > 1:
        import multiprocessing

        # spawn, not fork: a forked child of a process that has run OpenMP regions can deadlock
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(s,))
        results: Iterable[dict[str, Any]] = pool.imap_unordered(_worker_run, [(a, s) for a in todo])
    else:
        pool = None
        results = (_worker_run_local(a, s, data) for a in todo)
    try:
        for k, rec in enumerate(results, 1):
            have[rec["id"]] = rec
            _report_arm(k, len(todo), rec, time.perf_counter() - t_start, say)
    finally:
        if pool is not None:
            pool.terminate()
    return [have[a.id] for a in grid]


def _worker_run_local(arm: Arm, s: Settings, data: Data) -> dict[str, Any]:
    rec = run_arm(arm, s, data)
    _write_json(Path(s.out) / "arms" / f"{arm.id}.json", rec)
    return rec


def _report_arm(k: int, n: int, rec: dict[str, Any], elapsed: float, say) -> None:
    say(f"[{k}/{n}] {rec['id']}: acc {rec['accuracy']:.3f} ce {rec['heldout_ce']:.4f} "
        f"stp final/family {rec['heldout_stp_final']:.4f}/{rec['heldout_stp_family']:.4f} erank {rec['erank']:.1f} "
        f"({rec['train_s']:.0f}+{rec['eval_s']:.0f} s, cpu {rec['train_cpu_s']:.0f}+{rec['eval_cpu_s']:.0f} s; eta {elapsed / k * (n - k) / 60:.1f} min)")


# ----------------------------------------------------------------------------------------------
# report


def _frac_value(f: str) -> float:
    return float(Fraction(f))


def summarize(records: Sequence[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """Mean +- std per arm group, paired tests of each STP arm vs NTP, and the plain-language verdicts."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        a = r["arm"]
        groups[(a["model"], a["lam"], a["taps"], a["fraction"])].append(r)
    rows = []
    for (model, lam, taps, frac), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["arm"]["seed"])
        row: dict[str, Any] = {"model": model, "pattern": rs[0]["arm"]["pattern"], "lam": lam, "taps": taps,
                               "fraction": frac, "seeds": [r["arm"]["seed"] for r in rs], "n": len(rs)}
        for key in ("accuracy", "heldout_ce", "heldout_stp_final", "heldout_stp_family", "erank", "train_ce"):
            m, sd = _mean_std([r[key] for r in rs])
            row[key] = {"mean": m, "std": sd, "values": [r[key] for r in rs]}
        own = "heldout_stp_family" if taps == "family" else "heldout_stp_final"
        row["heldout_stp_own"] = row[own]
        ntp = groups.get((model, 0.0, NTP, frac))
        row["p_vs_ntp"] = row["diff_vs_ntp"] = None
        if ntp is not None and lam != 0:
            by_seed = {r["arm"]["seed"]: r["accuracy"] for r in ntp}
            pairs = [(r["accuracy"], by_seed[r["arm"]["seed"]]) for r in rs if r["arm"]["seed"] in by_seed]
            if pairs:
                row["diff_vs_ntp"] = sum(a - b for a, b in pairs) / len(pairs)
                row["t_vs_ntp"], row["p_vs_ntp"] = paired_ttest([a for a, _ in pairs], [b for _, b in pairs])
                row["n_pairs"] = len(pairs)
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], -_frac_value(r["fraction"]), r["lam"], r["taps"]))
    verdicts = {m: _verdicts(m, [r for r in rows if r["model"] == m]) for m in dict.fromkeys(r["model"] for r in rows)}
    return {"settings": {**asdict(s), "fingerprint": s.fingerprint()}, "rows": rows, "verdicts": verdicts,
            "statement": _statement(verdicts)}


def _verdicts(model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Decide, from the numbers only, whether each of the paper's two claims reproduced for one model."""
    fracs = sorted({r["fraction"] for r in rows}, key=_frac_value)
    ntp = {r["fraction"]: r for r in rows if r["taps"] == NTP}
    stp = [r for r in rows if r["taps"] != NTP]
    out: dict[str, Any] = {}
    # -- data efficiency: STP at the smallest fraction vs NTP at the largest
    lo, hi = fracs[0], fracs[-1]
    if hi not in ntp or lo == hi or not [r for r in stp if r["fraction"] == lo]:
        out["data_efficiency"] = {"status": "untested", "text": "needs NTP at the largest fraction and STP arms "
                                  "at a smaller one"}
    else:
        full = ntp[hi]["accuracy"]["mean"]
        small_ntp = ntp[lo]["accuracy"]["mean"] if lo in ntp else None
        candidates = [r for r in stp if r["fraction"] == lo]
        best = max(candidates, key=lambda r: r["accuracy"]["mean"])
        b = best["accuracy"]["mean"]
        ratio = _frac_value(hi) / _frac_value(lo)
        arm = f"lambda {best['lam']:g} / {best['taps']}, the best of {len(candidates)} STP arms there"
        p = best["p_vs_ntp"]
        # the claim itself compares STP on less data with NTP on all of it: pair those by seed too
        full_by_seed = dict(zip(ntp[hi]["seeds"], ntp[hi]["accuracy"]["values"]))
        pairs = [(v, full_by_seed[sd]) for sd, v in zip(best["seeds"], best["accuracy"]["values"]) if sd in full_by_seed]
        _, p_full = paired_ttest([x for x, _ in pairs], [y for _, y in pairs]) if len(pairs) >= 2 else (None, None)
        ptxt = (f"paired p = {p:.3g} vs NTP at {lo}" if p is not None else "no paired test (fewer than 2 seeds)")
        if p_full is not None:
            ptxt += f", {p_full:.3g} vs NTP at {hi}"
        if full < 0.02:
            status = "inconclusive"
            text = (f"NTP reaches only {full:.1%} exact match with all the data, too little to measure a data "
                    "saving; train longer or larger")
        elif small_ntp is not None and small_ntp >= full - 0.01:
            status = "inconclusive"
            text = (f"NTP with {lo} of the data ({small_ntp:.1%}) already matches NTP with {hi} ({full:.1%}), so "
                    "there is no data gap for STP to close at this scale")
        elif b >= full:
            status = "reproduced"
            text = (f"STP ({arm}) with {ratio:g}x less data reaches {b:.1%} vs NTP's {full:.1%} with all of it "
                    f"({ptxt})")
        else:
            gap = full - (small_ntp if small_ntp is not None else 0.0)
            closed = (b - (small_ntp if small_ntp is not None else 0.0)) / gap if gap > 0 else 0.0
            status = "not reproduced"
            text = (f"the best STP arm at {lo} of the data ({arm}) reaches {b:.1%} vs NTP's {full:.1%} with all of it"
                    f"{'' if small_ntp is None else f' and {small_ntp:.1%} with {lo}'}; it closes {closed:.0%} of "
                    f"that gap ({ptxt})")
        out["data_efficiency"] = {"status": status, "text": text, "best_arm": {"lam": best["lam"], "taps": best["taps"]},
                                  "p_vs_ntp_full": p_full}
    sig = [r for r in stp if r["p_vs_ntp"] is not None and r["p_vs_ntp"] < 0.05]
    out["significant"] = [{"lam": r["lam"], "taps": r["taps"], "fraction": r["fraction"],
                           "diff": r["diff_vs_ntp"], "p": r["p_vs_ntp"]} for r in sig]
    out["n_tests"] = sum(1 for r in stp if r["p_vs_ntp"] is not None)
    # -- Figure 4b: held-out STP falls with lambda while CE stays flat (largest fraction)
    fig: dict[str, Any] = {}
    for taps in TAPS:
        pts = [r for r in rows if r["fraction"] == hi and (r["taps"] == taps or r["taps"] == NTP)]
        pts.sort(key=lambda r: r["lam"])
        if len(pts) < 3 or pts[0]["lam"] != 0:
            continue
        key = "heldout_stp_family" if taps == "family" else "heldout_stp_final"
        lams = [r["lam"] for r in pts]
        stps = [r[key]["mean"] for r in pts]
        ces = [r["heldout_ce"]["mean"] for r in pts]
        rho = spearman(lams, stps)
        ce_change = max(abs(c - ces[0]) / ces[0] for c in ces[1:])
        falls = rho is not None and rho <= -0.8 and stps[-1] < stps[0]
        flat = ce_change <= 0.05
        flat_up_to = 0.0  # the largest lambda up to which every held-out CE stays within 5% of NTP's
        for lam, c in zip(lams[1:], ces[1:]):
            if abs(c - ces[0]) / ces[0] > 0.05:
                break
            flat_up_to = lam
        fig[taps] = {"lambdas": lams, "stp": stps, "ce": ces, "spearman": rho, "max_ce_change": ce_change,
                     "ce_flat_up_to": flat_up_to, "stp_falls": falls, "ce_flat": flat, "reproduced": falls and flat}
    if fig:
        good = [t for t, v in fig.items() if v["reproduced"]]
        parts = [f"{t} taps: held-out STP {v['stp'][0]:.3f} -> {v['stp'][-1]:.3f} (Spearman rho "
                 f"{v['spearman'] if v['spearman'] is None else round(v['spearman'], 2)}), CE changes by at most "
                 f"{v['max_ce_change']:.1%} (within 5% of NTP's up to lambda {v['ce_flat_up_to']:g})"
                 for t, v in fig.items()]
        out["figure_4b"] = {"status": "reproduced" if len(good) == len(fig) else "partly reproduced" if good
                            else "not reproduced", "text": "; ".join(parts), "by_taps": fig}
    else:
        out["figure_4b"] = {"status": "untested", "text": "needs lambda 0 and at least two STP lambdas", "by_taps": {}}
    return out


def _statement(verdicts: dict[str, dict[str, Any]]) -> str:
    lines = []
    for model, v in verdicts.items():
        de, fb = v["data_efficiency"], v["figure_4b"]
        sig = v["significant"]
        better = [x for x in sig if x["diff"] > 0]
        worse = [x for x in sig if x["diff"] < 0]
        lines.append(
            f"{model}: data-efficiency effect: {de['status'].upper()} ({de['text']}). "
            f"Figure-4b mechanism: {fb['status'].upper()} ({fb['text']}). "
            f"{len(better)} of {v['n_tests']} STP-vs-NTP paired tests favour STP at p < 0.05 and {len(worse)} favour NTP "
            "(uncorrected for multiple comparisons).")
    return "\n".join(lines)


def _pm(x: dict[str, Any], pct: bool = False, digits: int = 4) -> str:
    """``mean +- std`` (sample std over seeds); the mean alone for a single seed."""
    scale, d = (100.0, 1) if pct else (1.0, digits)
    text = f"{scale * x['mean']:.{d}f}"
    return text if len(x.get("values", [])) < 2 else f"{text} +- {scale * x['std']:.{d}f}"


def write_report(summary: dict[str, Any], out: Path, *, command: str = "") -> list[Path]:
    """``results.json``, ``results.md`` and (matplotlib permitting) ``results.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "results.json", summary)
    st = summary["settings"]
    lines = ["# NL-RX-SYNTH: STP vs next-token prediction, from scratch", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Models: {', '.join(f'{n} `{p}`' for n, p in st['models'])}, d_model {st['d_model']}; "
        f"{st['steps']} steps x batch {st['batch_size']} per arm (equal compute at every data fraction); "
        f"lr {st['lr']}, STP n_spans {st['n_spans']}; lambdas {st['lambdas']} at the largest fraction, "
        f"{st['lambdas'] if st['lambdas_small'] is None else st['lambdas_small']} below it; "
        f"train rows {st['train_rows'] or 'all'}, "
        f"test rows {st['test_rows'] or 'all'}; seeds {st['seeds']}.",
        "",
        "Accuracy: greedy exact match (%) on the test rows. p: paired t-test vs NTP (lambda 0) at the same "
        "fraction and seeds, two-sided. held-out STP: on the arm's own taps (NTP: `final` / per-family).",
        "",
        "| model | fraction | lambda | taps | accuracy % | p vs NTP | held-out CE | held-out STP | eff. rank | n |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        stp = (f"{_pm(r['heldout_stp_final'])} / {_pm(r['heldout_stp_family'])}" if r["taps"] == NTP
               else _pm(r["heldout_stp_own"]))
        p = "-" if r["p_vs_ntp"] is None else f"{r['p_vs_ntp']:.3g}"
        lines.append(f"| {r['model']} | {r['fraction']} | {r['lam']:g} | {r['taps']} | {_pm(r['accuracy'], True)} | "
                     f"{p} | {_pm(r['heldout_ce'])} | {stp} | {r['erank']['mean']:.1f} | {r['n']} |")
    lines += ["", "## Verdict", "", *[f"- {x}" for x in summary["statement"].splitlines()], ""]
    (out / "results.md").write_text("\n".join(lines))
    written = [out / "results.json", out / "results.md"]
    png = _plot(summary, out / "results.png")
    if png is not None:
        written.append(png)
    return written


def _plot(summary: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report is complete without the figure
        return None
    rows = summary["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    lams = sorted({r["lam"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for i, m in enumerate(models):
        ax = axes[i][0]
        mr = [r for r in rows if r["model"] == m]
        for key in dict.fromkeys((r["lam"], r["taps"]) for r in mr):
            pts = sorted((r for r in mr if (r["lam"], r["taps"]) == key), key=lambda r: _frac_value(r["fraction"]))
            x = [_frac_value(r["fraction"]) for r in pts]
            y = [100 * r["accuracy"]["mean"] for r in pts]
            e = [100 * r["accuracy"]["std"] for r in pts]
            lam, taps = key
            color = "black" if lam == 0 else cmap(lams.index(lam) / max(1, len(lams) - 1))
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=color, ls="-" if taps in (NTP, "final") else "--",
                        label="NTP" if lam == 0 else f"STP {lam:g} {taps}", lw=2 if lam == 0 else 1)
        ax.set_xscale("log", base=2)
        fr = sorted({r["fraction"] for r in mr}, key=_frac_value)
        ax.set_xticks([_frac_value(f) for f in fr], fr)
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("training data fraction")
        ax.set_ylabel("exact match (%)")
        ax.set_title(f"{m} `{mr[0]['pattern']}`: accuracy vs data (equal compute)")
        ax.legend(fontsize=7, ncol=2)
        ax = axes[i][1]
        hi = max((r["fraction"] for r in mr), key=_frac_value)
        ce_ax = ax.twinx()
        for taps, ls in (("final", "-"), ("family", "--")):
            pts = sorted((r for r in mr if r["fraction"] == hi and r["taps"] in (taps, NTP)), key=lambda r: r["lam"])
            if len(pts) < 2:
                continue
            key = "heldout_stp_family" if taps == "family" else "heldout_stp_final"
            xs = list(range(len(pts)))
            ax.errorbar(xs, [r[key]["mean"] for r in pts], yerr=[r[key]["std"] for r in pts], marker="o", ls=ls,
                        color="tab:blue", capsize=3, label=f"held-out STP ({taps} taps)")
            ce_ax.errorbar(xs, [r["heldout_ce"]["mean"] for r in pts], yerr=[r["heldout_ce"]["std"] for r in pts],
                           marker="s", ls=ls, color="tab:red", capsize=3, label=f"held-out CE ({taps} arms)")
            ax.set_xticks(xs, [f"{r['lam']:g}" for r in pts])
        # both axes from 0: a flat CE must look flat, not be magnified by an auto-zoomed twin axis
        ax.set_ylim(bottom=0)
        ce_ax.set_ylim(bottom=0)
        ax.set_xlabel(f"lambda (fraction {hi})")
        ax.set_ylabel("held-out STP loss", color="tab:blue")
        ce_ax.set_ylabel("held-out CE (target tokens)", color="tab:red")
        ax.set_title(f"{m}: Figure-4b check")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ce_ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# command line

FULL_DEFAULTS: dict[str, Any] = {
    "models": "dense=(AE)*2,hybrid=AMER", "lambdas": "0,0.005,0.01,0.02,0.04,0.08", "lambdas_small": "0,0.02",
    "taps": "final,family", "fractions": "1,1/4,1/16", "seeds": "3", "out": "checkpoints/nlrx", "steps": 1000,
    "train_rows": None, "test_rows": None,
}
QUICK_DEFAULTS: dict[str, Any] = {
    "models": "hybrid=AMER", "lambdas": "0,0.02", "lambdas_small": "all", "taps": "family", "fractions": "1",
    "seeds": "1", "out": "checkpoints/nlrx-quick", "steps": 600, "train_rows": 2000, "test_rows": 200,
}


def default_data_dir() -> Path | None:
    """``$AMER_NLRX_DIR``, else the shared copy ``../shared/data/nl-rx-synth`` next to the repository."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    p = repo.parent / "shared" / "data" / "nl-rx-synth"
    return p if p.is_dir() else None


def build_parser() -> argparse.ArgumentParser:
    from amer.cli import OneLineParser  # bad flags: one line, no usage dump

    p = OneLineParser(
        prog="amer experiment nlrx",
        description="Train small dense and hybrid models from scratch on NL-RX-SYNTH with and without STP, "
                    "evaluate greedy exact match, and report whether the STP paper's claims reproduce.")
    a = p.add_argument
    a("--data-dir", help=f"folder with {TRAIN_FILE} and {TEST_FILE} (llm-jepa's datasets/); default ${ENV_DIR}, "
                         "else ../shared/data/nl-rx-synth next to the repository")
    a("--out", help="results directory (arms/<arm-id>.json, results.*); default checkpoints/nlrx")
    a("--quick", action="store_true", help="one seed of NTP and one STP arm on a slice of the data (minutes)")
    a("--models", help="NAME=PATTERN list; default 'dense=(AE)*2,hybrid=AMER'")
    a("--lambdas", help="STP weights swept at the largest fraction; 0 is the NTP baseline; "
                        "default 0,0.005,0.01,0.02,0.04,0.08")
    a("--lambdas-small", help="STP weights run at the smaller fractions (default 0,0.02: NTP and the paper's best "
                              "SYNTH lambda); 'all' runs --lambdas at every fraction")
    a("--taps", help="STP tap selections: final (post-final-norm state), family (last block of each family)")
    a("--fractions", help="training-data fractions, e.g. 1,1/4,1/16 (equal compute: same steps for each)")
    a("--seeds", help="a count N (seeds 0..N-1) or a list like 0,1,2")
    a("--d-model", type=int, default=64, help="model width (default 64)")
    a("--steps", type=int, help="optimizer steps per arm, the same at every fraction (default 1000; --quick 600)")
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=3e-3)
    a("--warmup-steps", type=int, default=None, help="default 5%% of --steps")
    a("--n-spans", type=int, default=4, help="STP triples per example in training")
    a("--train-rows", type=int, help="use only the first N training rows (default all 8000; --quick 2000)")
    a("--test-rows", type=int, help="evaluate on the first N test rows (default all 2000; --quick 200)")
    a("--system-prompt", action="store_true", help="keep the constant system turn in every example")
    a("--max-new-tokens", type=int, default=64, help="greedy decoding budget (the longest reference is 54 bytes)")
    a("--decode-batch", type=int, default=256)
    a("--workers", type=int, help="arms run in parallel, one process each (default: the CPU cores available)")
    a("--threads", type=int, help="torch threads per worker (default 1 with several workers, else torch's choice)")
    a("--dry-run", action="store_true", help="list the arms and how many are done, run nothing")
    a("--estimate", action="store_true", help="time a few steps and one evaluation per model; print the grid's duration")
    a("--report-only", action="store_true", help="rebuild results.* from the finished arms, run nothing")
    return p


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExperimentError(f"{flag} {text!r}: expected comma-separated numbers like 0,0.02") from None
    if not vals or any(v < 0 or not math.isfinite(v) for v in vals):
        raise ExperimentError(f"{flag} {text!r}: expected one or more finite numbers >= 0")
    return sorted(dict.fromkeys(vals))


def _fractions(text: str) -> list[str]:
    out = []
    for x in text.split(","):
        x = x.strip()
        try:
            f = Fraction(x)
        except (ValueError, ZeroDivisionError):
            raise ExperimentError(f"--fractions: {x!r} is not a fraction; expected e.g. 1,1/4,1/16") from None
        if not 0 < f <= 1:
            raise ExperimentError(f"--fractions: {x!r} must be in (0, 1]")
        out.append(str(f))
    if not out:
        raise ExperimentError("--fractions: expected e.g. 1,1/4,1/16")
    return sorted(dict.fromkeys(out), key=lambda f: -Fraction(f))


def _seeds(text: str) -> list[int]:
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ExperimentError(f"--seeds {text!r}: expected a count like 3 or a list like 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ExperimentError(f"--seeds {text!r}: expected non-negative seeds")
    return sorted(dict.fromkeys(seeds))


def _models(text: str, d_model: int) -> list[tuple[str, str]]:
    out = []
    for item in text.split(","):
        name, sep, pattern = item.partition("=")
        name, pattern = name.strip(), pattern.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9-]+", name) or not pattern:
            raise ExperimentError(f"--models item {item!r}: expected NAME=PATTERN with NAME of letters, digits, '-' "
                                  "(e.g. hybrid=AMER)")
        model_config(pattern, d_model)  # a bad pattern or width fails here, before any training
        out.append((name, pattern))
    if len({n for n, _ in out}) != len(out):
        raise ExperimentError(f"--models {text!r}: model names must be distinct")
    return out


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def settings_from_args(args: argparse.Namespace) -> Settings:
    d = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else d[name]  # noqa: E731
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    if data_dir is None:
        raise ExperimentError(f"no NL-RX-SYNTH data: pass --data-dir DIR (a folder with {TRAIN_FILE} and {TEST_FILE}, "
                              f"e.g. llm-jepa's datasets/) or set ${ENV_DIR}")
    missing = [f for f in (TRAIN_FILE, TEST_FILE) if not (data_dir / f).is_file()]
    if missing:
        raise ExperimentError(f"data directory {data_dir} lacks {', '.join(missing)}; pass --data-dir DIR with "
                              f"{TRAIN_FILE} and {TEST_FILE} (llm-jepa's datasets/ folder)")
    small = pick("lambdas_small")
    lambdas_small = None if small.strip() == "all" else _floats(small, "--lambdas-small")
    workers = args.workers if args.workers is not None else _cores()
    if workers < 1:
        raise ExperimentError(f"--workers must be >= 1, got {workers}")
    taps = [t.strip() for t in pick("taps").split(",") if t.strip()]
    bad = [t for t in taps if t not in TAPS]
    if bad or not taps:
        raise ExperimentError(f"--taps {pick('taps')!r}: accepted selections are {', '.join(TAPS)}")
    steps = pick("steps")
    for name, v, lo in (("--steps", steps, 1), ("--batch-size", args.batch_size, 1), ("--d-model", args.d_model, 16),
                        ("--n-spans", args.n_spans, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                        ("--decode-batch", args.decode_batch, 1), ("--train-rows", pick("train_rows") or 1, 1),
                        ("--test-rows", pick("test_rows") or 1, 1), ("--threads", args.threads or 1, 1)):
        if v < lo:
            raise ExperimentError(f"{name} must be >= {lo}, got {v}")
    if not args.lr > 0:
        raise ExperimentError(f"--lr must be > 0, got {args.lr}")
    warm = args.warmup_steps if args.warmup_steps is not None else max(1, steps // 20)
    if warm < 0:
        raise ExperimentError(f"--warmup-steps must be >= 0, got {warm}")
    return Settings(
        data_dir=str(data_dir), out=pick("out"), models=_models(pick("models"), args.d_model),
        lambdas=_floats(pick("lambdas"), "--lambdas"), lambdas_small=lambdas_small, taps=taps, fractions=_fractions(pick("fractions")),
        seeds=_seeds(pick("seeds")), d_model=args.d_model, steps=steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=warm, n_spans=args.n_spans, train_rows=pick("train_rows"), test_rows=pick("test_rows"),
        system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens, decode_batch=args.decode_batch,
        threads=args.threads, workers=workers, data_sha={f: _sha(data_dir / f) for f in (TRAIN_FILE, TEST_FILE)},
    )


def estimate(s: Settings, *, timed_steps: int = 20, say=_say) -> float:
    """Wall-clock seconds the grid's unfinished arms should take, printed with its parts.

    Per model: the mean time of ``timed_steps`` training steps of a per-family STP arm (the dearest
    arm) times ``steps``, plus one evaluation of the test rows by the barely trained model (it never
    emits EOS, so decoding runs its whole budget: an upper bound). Arms are spread over
    ``min(workers, cores)`` processes, each with the thread count a worker would use. Both wall and
    process CPU time are measured: on a machine busy with other work the CPU figure (with one thread
    per worker) is what the grid would take with the cores to itself.
    """
    torch.set_num_threads(s.threads or (1 if s.workers > 1 else torch.get_num_threads()))
    data = load_data(s)
    grid = build_grid(s)
    done = {p.stem for p in (Path(s.out) / "arms").glob("*.json")}
    per_model: dict[str, dict[str, float]] = {}
    for name, pattern in s.models:
        arm = Arm(name, pattern, max(s.lambdas) or 0.02, "family", s.fractions[0], 0)
        probe = Settings(**{**asdict(s), "steps": timed_steps})
        model, tr = train_arm(arm, probe, data)
        ev = evaluate(model, data.test, s)
        m = {"step": tr["train_s"] / timed_steps, "step_cpu": tr["train_cpu_s"] / timed_steps,
             "eval": ev["eval_s"], "eval_cpu": ev["eval_cpu_s"]}
        per_model[name] = m
        say(f"estimate {name} `{pattern}`: {m['step'] * 1000:.0f} ms/step wall, {m['step_cpu'] * 1000:.0f} ms CPU "
            f"(batch {s.batch_size}); evaluation of {len(data.test)} test rows {m['eval']:.1f} s wall, "
            f"{m['eval_cpu']:.1f} s CPU; {tr['params']:,} parameters, {torch.get_num_threads()} torch thread(s)")
    todo = [a for a in grid if a.id not in done]
    par = max(1, min(s.workers, _cores(), len(todo) or 1))
    wall = sum(per_model[a.model]["step"] * s.steps + per_model[a.model]["eval"] for a in todo) / par
    cpu = sum(per_model[a.model]["step_cpu"] * s.steps + per_model[a.model]["eval_cpu"] for a in todo) / par
    say(f"grid: {len(grid)} arms, {len(todo)} to run, {s.steps} steps each, {par} worker(s): about {wall / 60:.0f} min "
        f"at this machine's current speed, {cpu / 60:.0f} min with {par} core(s) to itself")
    return wall


def main(argv: list[str] | None = None) -> int:
    """``amer experiment nlrx``; bad input prints one line and exits 2."""
    try:
        args = build_parser().parse_args(argv)
        s = settings_from_args(args)
        tune_malloc()
        if s.threads:
            torch.set_num_threads(s.threads)
        if args.dry_run:
            grid = build_grid(s)
            done = {p.stem for p in (Path(s.out) / "arms").glob("*.json")}
            for a in grid:
                print(f"{'done' if a.id in done else 'todo'}  {a.id}")
            print(f"{len(grid)} arms, {sum(a.id in done for a in grid)} done")
            return 0
        if args.estimate:
            estimate(s)
            return 0
        out = Path(s.out)
        if args.report_only:
            grid = build_grid(s)
            paths = [out / "arms" / f"{a.id}.json" for a in grid]
            records = [_check_stale(p, s) for p in paths if p.is_file()]
            if not records:
                raise ExperimentError(f"no finished arms of this grid under {out / 'arms'}")
        else:
            records = run_grid(s)
        summary = summarize(records, s)
        # the command that produces these results (a --report-only rebuild reports what the run did)
        command = "amer experiment nlrx " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                     if a != "--report-only")
        for p in write_report(summary, out, command=command.strip()):
            print(f"wrote {p}")
        print(summary["statement"])
    except (ExperimentError, DataError, ConfigError, PatternError, SelectorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished arms are kept; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
