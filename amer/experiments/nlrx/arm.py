"""One arm: train a model from scratch through the shared training step, then evaluate it with the shared
held-out evaluation (CE, STP on both selections, final states for the effective rank) and greedy decoding."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

import amer.generate
from amer.analysis.stats import effective_rank
from amer.config import STPConfig, TrainConfig
from amer.data import ByteTokenizer, model_vocab_size
from amer.errors import TrainingError
from amer.experiments.nlrx.data import (
    TEST_FILE,
    TRAIN_FILE,
    ExampleSet,
    LengthBucketedBatches,
    exact_match,
    load_examples,
)
from amer.experiments.nlrx.grid import NTP, Arm, Settings, family_selector, model_config, subset_rows
from amer.model import HybridLM
from amer.objective import STPPolicy
from amer.training import TrainStep, evaluate, lr_at, make_optimizer

__all__ = ["Data", "load_data", "train_arm", "evaluate_arm", "predict", "run_arm"]


class Data(NamedTuple):
    train: ExampleSet
    test: ExampleSet


def load_data(s: Settings, tokenizer: Any = None) -> Data:
    """Train and test examples encoded with ``tokenizer`` (any of :mod:`amer.data`; default bytes)."""
    d = Path(s.data_dir)
    tok = tokenizer or ByteTokenizer()
    train = ExampleSet(load_examples(d / TRAIN_FILE, limit=s.train_rows), tok, system=s.system_prompt, name="train")
    test = ExampleSet(load_examples(d / TEST_FILE, limit=s.test_rows), tok, system=s.system_prompt, name="test")
    return Data(train, test)


def _policy(model: HybridLM, lam: float, taps: str, n_spans: int) -> STPPolicy:
    if lam == 0 or taps == NTP:
        return STPPolicy(STPConfig(enabled=False), model.pattern)
    sel = "final" if taps == "final" else family_selector(model.cfg)
    return STPPolicy(STPConfig(enabled=True, weight=lam, layers=sel, n_spans=n_spans), model.pattern)


def train_arm(arm: Arm, s: Settings, data: Data, *, log_every: int = 0) -> tuple[HybridLM, dict[str, Any]]:
    """Train one arm from scratch; returns the model and training figures (last-10% means).

    A step the shared step skips (non-finite loss or gradient) applies nothing and is counted in
    ``skipped_steps``; the tail means are over applied steps only.
    """
    torch.manual_seed(arm.seed)
    mcfg = model_config(arm.pattern, s.d_model)
    if not isinstance(data.train.tok, ByteTokenizer):  # the embedding follows the tokenizer
        mcfg = replace(mcfg, vocab_size=model_vocab_size(data.train.tok))
    model = HybridLM(mcfg)
    policy = _policy(model, arm.lam, arm.taps, s.n_spans)
    tcfg = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps,
                       weight_decay=s.weight_decay, seq_len=mcfg.max_seq_len, seed=arm.seed, model=mcfg,
                       stp=policy.cfg, progress=False, tensorboard=False)
    subset = data.train.subset(subset_rows(len(data.train), arm.fraction, arm.seed))
    batches = LengthBucketedBatches(subset, s.batch_size, arm.seed)
    # NTP arms record no taps at all: the forward is then the plain next-token model's
    step_fn = TrainStep(model, make_optimizer(model, tcfg), policy, grad_clip=1.0,
                        stp_generator=torch.Generator().manual_seed(arm.seed + 1),
                        taps=policy.selector if policy.enabled else False)
    tail = max(1, s.steps // 10)
    ce_tail, stp_tail, skipped = [], [], 0
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(s.steps):
        res = step_fn((next(batches),), step, lr=lr_at(step, tcfg))
        parts = res.loss
        if not res.applied:
            skipped += 1
        elif step >= s.steps - tail:
            ce_tail.append(float(parts.ce.detach()))
            stp_tail.append(float(parts.stp.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"    step {step + 1}/{s.steps} ce {float(parts.ce):.4f} stp {float(parts.stp):.4f}", flush=True)
    if not ce_tail:
        raise TrainingError(f"arm {arm.id}: every one of the last {tail} steps was non-finite and skipped "
                            f"({skipped} of {s.steps} in all); lower --lr")
    return model, {
        "train_ce": sum(ce_tail) / len(ce_tail),
        "train_stp": sum(stp_tail) / len(stp_tail) if policy.enabled else None,
        "train_rows": len(subset),
        "epochs": s.steps * s.batch_size / len(subset),
        "train_s": time.perf_counter() - t0,
        "train_cpu_s": time.process_time() - c0,  # = dedicated-core seconds with 1 thread, even on a busy machine
        "params": model.num_params(),
        "stp_selector": policy.selector if policy.enabled else None,
        "skipped_steps": skipped,
    }


def predict(model: HybridLM, test: ExampleSet, s: Settings) -> list[str]:
    """Greedy continuation of every test prompt up to EOS (EOS left out), as text."""
    tok = test.tok
    n = len(test)
    order = sorted(range(n), key=lambda i: test.starts[i])  # similar lengths share a batch: few wasted steps
    preds: list[str] = [""] * n
    for c in range(0, n, s.decode_batch):
        idx = order[c : c + s.decode_batch]
        prompts = [test.seqs[i][: test.starts[i]] for i in idx]
        max_new = min(s.max_new_tokens, model.cfg.max_seq_len - max(len(p) for p in prompts))
        for i, gen in zip(idx, amer.generate.decode(model, prompts, max_new, eos_id=tok.eos_id)):
            preds[i] = tok.decode(gen[:-1] if gen and gen[-1] == tok.eos_id else gen)
    return preds


def evaluate_arm(model: HybridLM, test: ExampleSet, s: Settings, *, decode: bool = True) -> dict[str, Any]:
    """Held-out CE (target tokens), held-out STP per selection, effective rank, greedy exact match."""
    t0, c0 = time.perf_counter(), time.process_time()
    selections = {"final": "final", "family": family_selector(model.cfg)}
    # both selections on every arm, NTP included: held-out STP is then comparable across the grid
    pols = {k: STPPolicy(STPConfig(enabled=True, weight=1.0, layers=v, n_spans=s.eval_spans), model.pattern)
            for k, v in selections.items()}
    finals: list[Tensor] = []

    def keep_final_states(out: Any, batch: dict[str, Tensor]) -> None:
        have = sum(h.shape[0] for h in finals)
        if have < s.erank_tokens:
            finals.append(out.taps.final.hidden[batch["doc_ids"] >= 0][: s.erank_tokens - have])  # real tokens only

    n = len(test)
    batches = (test.batch(range(i, min(n, i + s.eval_batch))) for i in range(0, n, s.eval_batch))
    ev = evaluate(model, batches, stp=pols, visit=keep_final_states, taps=True)
    res: dict[str, Any] = {
        "heldout_ce": ev["loss"],
        "heldout_stp_final": ev["stp/final"],
        "heldout_stp_family": ev["stp/family"],
        "family_selector": selections["family"],
        "erank": effective_rank(torch.cat(finals)),
        "erank_tokens": sum(h.shape[0] for h in finals),
    }
    if decode:
        preds = predict(model, test, s)
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
    return res


def run_arm(arm: Arm, s: Settings, data: Data) -> dict[str, Any]:
    model, tr = train_arm(arm, s, data)
    ev = evaluate_arm(model, data.test, s)
    return {"arm": asdict(arm), "id": arm.id, "settings": s.fingerprint(), **tr, **ev}
