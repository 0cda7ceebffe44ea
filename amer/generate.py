"""Decoding with the per-block caches: KV cache for attention, O(1) state for Mamba-2 and RG-LRU.

One loop serves every caller (``amer sample``, :meth:`HybridLM.generate`, the experiments' greedy
evaluation). Prompts may differ in length: the caches keep one position for the whole batch, so after
the shared shortest prefix is prefilled every row advances one position per step, rows still inside
their prompt being fed their next prompt token (teacher-forced) while the others are fed what they
sampled. That is identical to decoding each row alone (prefill equals token-by-token decoding for
every block), without bucketing prompts by exact length into many tiny batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["decode", "generate", "sample_next"]


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token per row from (B, V) logits: greedy at temperature 0, else softmax sampling with top-k."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:  # a host generator (XLA): draw on the host
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
           top_k: int | None = None, generator: torch.Generator | None = None,
           eos_id: int | None = None) -> list[list[int]]:
    """The continuation of each prompt (prompts of any lengths in one batch), at most ``max_new_tokens``
    tokens each; a row stops after it produces ``eos_id``, which is included. Greedy at temperature 0."""
    if not prompts or any(len(p) < 1 for p in prompts):
        raise ValueError("decode needs at least one prompt, each of at least one token")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    L0, Lmax = int(lens.min()), int(lens.max())
    steps = Lmax - L0 + max_new_tokens
    fill = 0 if eos_id is None else eos_id
    buf = torch.full((B, Lmax + max_new_tokens), fill, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = torch.as_tensor(list(p), device=device)
    was_training = model.training
    model.eval()
    cache = model.init_cache(B, Lmax + max_new_tokens)
    out = model(buf[:, :L0], taps=False, cache=cache)
    cache, logits = out.cache, out.logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    # every row the same length and no stop token: every row produces at every step, with no masks to keep
    uniform = L0 == Lmax and eos_id is None
    for k in range(steps):
        pos = L0 + k  # the position being filled
        nxt = sample_next(logits, temperature, top_k, generator)  # (B,)
        if uniform:
            buf[:, pos] = nxt
            n_new += 1
            if k == steps - 1:
                break
            out = model(nxt[:, None], taps=False, cache=cache)
            cache, logits = out.cache, out.logits[:, -1]
            continue
        generating = pos >= lens
        produced = generating & ~done
        buf[rows[produced], pos] = nxt[produced]
        n_new += produced.long()
        finished = pos + 1 >= lens + max_new_tokens
        if eos_id is not None:
            finished = finished | (nxt == eos_id)
        done |= produced & finished
        if bool(done.all()) or k == steps - 1:
            break
        feed = torch.where(generating, torch.where(done, torch.full_like(nxt, fill), nxt), buf[:, pos])
        out = model(feed[:, None], taps=False, cache=cache)
        cache, logits = out.cache, out.logits[:, -1]
    model.train(was_training)
    return [buf[i, int(lens[i]): int(lens[i]) + int(n_new[i])].tolist() for i in range(B)]


@torch.no_grad()
def generate(model: Any, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, eos_id: int | None = None) -> Tensor:
    """Sample ``max_new_tokens`` after ``prompt`` (B, T0). ``temperature=0`` is greedy. Returns
    (B, T0 + n) tokens, n the longest continuation; rows that stopped at ``eos_id`` are filled with it."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (B, T) with T >= 1, got {tuple(prompt.shape)}")
    conts = decode(model, prompt.tolist(), max_new_tokens, temperature=temperature, top_k=top_k,
                   generator=generator, eos_id=eos_id)
    n = max(len(c) for c in conts)
    fill = 0 if eos_id is None else eos_id
    new = torch.full((prompt.shape[0], n), fill, dtype=prompt.dtype, device=prompt.device)
    for i, c in enumerate(conts):
        new[i, : len(c)] = torch.as_tensor(c, dtype=prompt.dtype)
    return torch.cat([prompt, new], dim=1)
