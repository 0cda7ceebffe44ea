"""The held-out evaluation every chat-task experiment runs on a trained arm: CE on the answer tokens, STP under
any number of named policies, the effective rank of the final hidden states, and greedy exact match."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import amer.generate
from amer.analysis.stats import effective_rank
from amer.experiments.nlrx.data import ExampleSet, exact_match
from amer.experiments.runs import GridSettings
from amer.model import HybridLM
from amer.runtime import autocast
from amer.stp import STPPolicy
from amer.training import evaluate

__all__ = ["predict", "evaluate_heldout"]


def predict(model: HybridLM, test: ExampleSet, s: GridSettings) -> list[str]:
    """Greedy continuation of every test prompt up to the set's stop token (left out), as text; under the
    settings' autocast (``dtype``), on the model's device."""
    tok, stop = test.tok, test.stop_id
    device = next(model.parameters()).device
    n = len(test)
    order = sorted(range(n), key=lambda i: test.starts[i])  # similar lengths share a batch: few wasted steps
    preds: list[str] = [""] * n
    for c in range(0, n, s.decode_batch):
        idx = order[c : c + s.decode_batch]
        prompts = [test.seqs[i][: test.starts[i]] for i in idx]
        max_new = min(s.max_new_tokens, model.cfg.max_seq_len - max(len(p) for p in prompts))
        with autocast(s.dtype, device):
            gens = amer.generate.decode(model, prompts, max_new, eos_id=stop)
        for i, gen in zip(idx, gens):
            preds[i] = tok.decode(gen[:-1] if gen and gen[-1] == stop else gen)
    return preds


def evaluate_heldout(model: HybridLM, test: ExampleSet, s: GridSettings, stp: Mapping[str, STPPolicy], *,
                     taps: Any, decode: bool = True) -> dict[str, Any]:
    """``heldout_ce``, ``stp`` (per policy name), ``erank`` and ``erank_tokens`` of the final states (real tokens
    only, at most ``s.erank_tokens``), with ``decode`` ``accuracy``, ``n_correct``, ``n_test`` and five
    ``samples``; ``eval_s`` and ``eval_cpu_s`` time it all. ``taps`` is what the forward records (it must
    include ``final`` and every policy's selection)."""
    t0, c0 = time.perf_counter(), time.process_time()
    finals: list[Tensor] = []

    def keep_final_states(out: Any, batch: dict[str, Tensor]) -> None:
        have = sum(h.shape[0] for h in finals)
        if have < s.erank_tokens:
            finals.append(out.taps.final.hidden[batch["doc_ids"] >= 0][: s.erank_tokens - have].float().cpu())

    n = len(test)
    batches = (test.batch(range(i, min(n, i + s.eval_batch))) for i in range(0, n, s.eval_batch))
    ev = evaluate(model, batches, stp=dict(stp), visit=keep_final_states, taps=taps,
                  dtype=s.dtype)
    res: dict[str, Any] = {"heldout_ce": ev["loss"], "stp": {k: ev[f"stp/{k}"] for k in stp},
                           "erank": effective_rank(torch.cat(finals)),
                           "erank_tokens": sum(h.shape[0] for h in finals)}
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
