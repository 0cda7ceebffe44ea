"""One fine-tuning arm: start from the pretrained weights (or a seeded random initialisation for the
from-scratch control), fine-tune through the shared training step with the released code's regime (AdamW,
linear decay without warm-up, a fixed number of epochs, lambda constant from step 0, STP on the final
post-norm state, nothing detached), then evaluate with the shared held-out evaluation and greedy decoding."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch

from amer.config import STPConfig, TrainConfig
from amer.data import ByteTokenizer
from amer.experiments.nlrx.data import LengthBucketedBatches, load_examples
from amer.experiments.nlrx.encode import ChatFormat
from amer.experiments.nlrx.grid import model_config, subset_rows
from amer.experiments.nlrx.heldout import evaluate_heldout
from amer.experiments.nlrx_finetune.data import ChatSet
from amer.experiments.nlrx_finetune.grid import NTP, Arm, Settings
from amer.experiments.nlrx_finetune.init import chat_format, describe, fit_vocab, load_model
from amer.experiments.runs import fit
from amer.model import HybridLM
from amer.stp import STPPolicy
from amer.training import TrainStep, lr_at, make_optimizer

__all__ = ["Data", "load_data", "pretrained_path", "base_model", "policy_for", "train_arm", "evaluate_model",
           "run_arm"]

TAP = "final"  # the released code's default: the last hidden state, after the final norm


class Data(NamedTuple):
    train: ChatSet
    test: ChatSet  # answer-only targets: held-out CE is the task's


def load_data(s: Settings) -> Data:
    """The chat data laid out for the model's tokenizer: ``--init``'s (and its chat template), else bytes."""
    fmt = chat_format(s.init, s.chat_template) if s.init is not None else ChatFormat(ByteTokenizer())
    train = ChatSet(load_examples(s.train_file, limit=s.train_rows), fmt.tok, system=s.system_prompt,
                    ntp=s.ntp_targets, name="train", fmt=fmt)
    test = ChatSet(load_examples(s.test_file, limit=s.test_rows), fmt.tok, system=s.system_prompt, ntp="assistant",
                   name="test", fmt=fmt)
    if s.init is not None:
        fit_vocab([train, test], describe(s.init).cfg.vocab_size, s.init)
    return Data(train, test)


def pretrained_path(s: Settings, model: str) -> Path:
    """The weights the ``pretrained`` arms of ``model`` start from: ``--init``, else this run's pretraining."""
    return Path(s.init) if s.init is not None else Path(s.out) / "pretrain" / model / "final"


def base_model(arm: Arm, s: Settings) -> HybridLM:
    """Pretrained weights, or (``scratch``) the same config initialised from the arm's seed."""
    if arm.init == "scratch":
        cfg = describe(s.init).cfg if s.init is not None else model_config(arm.pattern, s.d_model)
        torch.manual_seed(arm.seed)
        return HybridLM(cfg).to(s.device).train()
    return load_model(str(pretrained_path(s, arm.model)), s.device)


def policy_for(model: HybridLM, form: str, lam: float, s: Settings, *, n_spans: int | None = None) -> STPPolicy:
    if form == NTP or lam == 0:
        return STPPolicy(STPConfig(enabled=False), model.pattern)
    spans = n_spans or (s.n_spans if form == "span" else s.triple_spans)
    return STPPolicy(STPConfig(enabled=True, weight=lam, layers=TAP, form=form, n_spans=spans),  # type: ignore[arg-type]
                     model.pattern)


def train_arm(arm: Arm, s: Settings, data: Data) -> tuple[HybridLM, dict[str, Any]]:
    """Fine-tune one arm for ``s.epochs`` epochs of its subset; returns the model and training figures."""
    model = base_model(arm, s)
    policy = policy_for(model, arm.form, arm.lam, s)
    subset = data.train.subset(subset_rows(len(data.train), arm.fraction, arm.seed))
    steps = max(1, math.ceil(s.epochs * len(subset) / s.batch_size))
    tcfg = TrainConfig(steps=steps, batch_size=s.batch_size, lr=arm.lr, warmup_steps=0, weight_decay=s.weight_decay,
                       seq_len=model.cfg.max_seq_len, seed=arm.seed, model=model.cfg, stp=policy.cfg, progress=False,
                       tensorboard=False)
    batches = LengthBucketedBatches(subset, s.batch_size, arm.seed)
    step_fn = TrainStep(model, make_optimizer(model, tcfg), policy, grad_clip=1.0, dtype=s.dtype,
                        stp_generator=torch.Generator().manual_seed(arm.seed + 1),
                        taps=policy.selector if policy.enabled else False)
    run = fit(step_fn, batches, steps, lambda step: lr_at(step, tcfg, schedule="linear"), name=arm.id)
    return model, {
        "train_ce": run["ce"], "train_stp": run["stp"] if policy.enabled else None,
        "train_rows": len(subset), "steps": steps, "epochs": steps * s.batch_size / len(subset),
        "train_s": run["wall_s"], "train_cpu_s": run["cpu_s"], "params": model.num_params(),
        "skipped_steps": run["skipped"],
    }


def evaluate_model(model: HybridLM, test: ChatSet, s: Settings, *, decode: bool = True) -> dict[str, Any]:
    """Held-out CE on the answer, held-out STP of the final state in both forms (fixed spans), effective rank of
    the final states, and (``decode``) greedy exact match."""
    pols = {form: policy_for(model, form, 1.0, s, n_spans=s.eval_spans) for form in ("span", "triple")}
    ev = evaluate_heldout(model, test, s, pols, taps=TAP, decode=decode)
    stp = ev.pop("stp")
    return {"heldout_ce": ev.pop("heldout_ce"), "heldout_stp_span": stp["span"], "heldout_stp_triple": stp["triple"],
            **ev}


def run_arm(arm: Arm, s: Settings, data: Data) -> dict[str, Any]:
    model, tr = train_arm(arm, s, data)
    ev = evaluate_model(model, data.test, s)
    return {"arm": asdict(arm), "id": arm.id, "settings": s.fingerprint(), "device": _device_name(s.device), **tr,
            **ev}


def _device_name(device: str) -> str:
    """Where an arm ran (its timings are that machine's): the GPU's name on CUDA."""
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
