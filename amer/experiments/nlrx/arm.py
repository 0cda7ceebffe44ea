"""One arm: train a model from scratch through the shared training step, then evaluate it with the shared
held-out evaluation (CE, STP on both selections, final states for the effective rank) and greedy decoding."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from amer.config import STPConfig, TrainConfig
from amer.data import ByteTokenizer, model_vocab_size
from amer.experiments.nlrx.data import TEST_FILE, TRAIN_FILE, ExampleSet, LengthBucketedBatches, load_examples
from amer.experiments.nlrx.grid import NTP, Arm, Settings, family_selector, model_config, subset_rows
from amer.experiments.nlrx.heldout import evaluate_heldout, predict
from amer.experiments.runs import fit
from amer.model import HybridLM
from amer.stp import STPPolicy
from amer.training import TrainStep, lr_at, make_optimizer

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
    model.train()
    run = fit(step_fn, batches, s.steps, lambda step: lr_at(step, tcfg), name=arm.id, log_every=log_every)
    return model, {
        "train_ce": run["ce"],
        "train_stp": run["stp"] if policy.enabled else None,
        "train_rows": len(subset),
        "epochs": s.steps * s.batch_size / len(subset),
        "train_s": run["wall_s"],
        "train_cpu_s": run["cpu_s"],
        "params": model.num_params(),
        "stp_selector": policy.selector if policy.enabled else None,
        "skipped_steps": run["skipped"],
    }


def evaluate_arm(model: HybridLM, test: ExampleSet, s: Settings, *, decode: bool = True) -> dict[str, Any]:
    """Held-out CE (target tokens), held-out STP per selection, effective rank, greedy exact match."""
    selections = {"final": "final", "family": family_selector(model.cfg)}
    # both selections on every arm, NTP included: held-out STP is then comparable across the grid
    pols = {k: STPPolicy(STPConfig(enabled=True, weight=1.0, layers=v, n_spans=s.eval_spans), model.pattern)
            for k, v in selections.items()}
    ev = evaluate_heldout(model, test, s, pols, taps=True, decode=decode)
    stp = ev.pop("stp")
    return {"heldout_ce": ev.pop("heldout_ce"), "heldout_stp_final": stp["final"],
            "heldout_stp_family": stp["family"], "family_selector": selections["family"], **ev}


def run_arm(arm: Arm, s: Settings, data: Data) -> dict[str, Any]:
    model, tr = train_arm(arm, s, data)
    ev = evaluate_arm(model, data.test, s)
    return {"arm": asdict(arm), "id": arm.id, "settings": s.fingerprint(), **tr, **ev}
