"""The ``decode`` suite: greedy decoding tokens/s of amer (:func:`amer.generate.generate`, with its KV cache and
O(1) Mamba-2 state) against transformers' ``generate()`` with its caches, on the same weights.

The pairs are the exactly importable peers (Mixtral, Mamba2: :func:`amer.bench.peers.imported_twin`), so
both sides run one function; the greedy continuations are compared as well (``token_agreement``: the
fraction of generated tokens that are equal; with random weights near-ties in the argmax, decided by
float rounding, can make a row diverge after a while, more often the more rows). Each call
prefills a prompt and then produces a fixed number of tokens (no early stop), at batch 1 and 16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from amer.bench.harness import BenchOptions, SuiteResult, interleave, median, paired_ratio
from amer.bench.peers import _IMPORTED, imported_twin, peer_cases
from amer.bench.workloads import make_batch

__all__ = ["suite_decode"]


def _amer(model: Any, prompt: Tensor, n: int) -> Callable[[], Tensor]:
    return lambda: model.generate(prompt, n, temperature=0.0)


def _hf(model: Any, prompt: Tensor, n: int) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with torch.no_grad():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

    return run


def suite_decode(opts: BenchOptions) -> SuiteResult:
    res = SuiteResult("decode")
    try:
        import transformers
    except ImportError:
        res.notes.append("skipped: transformers is not installed (pip install 'amer[bench]')")
        return res
    transformers.logging.set_verbosity_error()
    prompt_len, n_new = (8, 4) if opts.quick else (32, 64)
    batches = (1, 2) if opts.quick else (1, 16)
    for case in peer_cases(opts.quick):
        if case.hf_class not in _IMPORTED:
            continue
        torch.manual_seed(opts.seed)
        hf = getattr(transformers, case.hf_class)(case.hf_config).eval()
        probe = make_batch(case.amer_cfg.vocab_size, 2, prompt_len, opts.seed)
        model, _ = imported_twin(hf, probe)
        model.eval()
        for B in batches:
            prompt = make_batch(case.amer_cfg.vocab_size, B, prompt_len, opts.seed + B)["tokens"]
            fns = {"amer": _amer(model, prompt, n_new), "hf": _hf(hf, prompt, n_new)}
            agree = float((fns["amer"]()[:, prompt_len:] == fns["hf"]()[:, prompt_len:]).float().mean())
            times = interleave(fns, opts.repeats, opts.warmup)
            res.rows.append({"name": case.name, "peer": case.hf_class, "batch": B,
                             "amer_tok_s": B * n_new / median(times["amer"]),
                             "hf_tok_s": B * n_new / median(times["hf"]),
                             "speedup": paired_ratio(times["hf"], times["amer"]), "token_agreement": agree})
        del hf, model
    res.notes.append(f"greedy decoding, prompt {prompt_len} tokens then {n_new} new tokens per row (prefill "
                     "included), both sides with their caches, the transformers model's own weights on the amer "
                     "side; speedup = median of per-round (transformers / amer); target >= 1.5 at batch 1")
    return res
