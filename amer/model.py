"""HybridLM: embeddings -> pattern of A/M/E/R blocks -> final RMSNorm -> LM head.

The layer loop records every block's output as a typed :class:`~amer.tap.Tap` unconditionally;
taps are references to tensors autograd keeps anyway, so recording costs no memory on the
training path. Model code holds no training code: the objective (cross-entropy, MoE auxiliary
losses, STP) is assembled by :mod:`amer.objective` from a :class:`ModelOutput`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks import Block, RMSNorm
from amer.config import ModelConfig
from amer.tap import Tap, TapSet, resolve_selector

__all__ = ["HybridLM", "ModelOutput"]


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    taps: TapSet | None  # None when called with taps=False
    aux_losses: dict[str, Tensor]  # weighted auxiliary losses summed over blocks ("moe_lb", "moe_z")
    stats: dict[str, Tensor]  # detached figures: "moe/drop_frac" (mean over E blocks), "moe/drop_frac/E0"...
    cache: list[Any] | None = None  # per-block decoding caches when called with a cache


class HybridLM(nn.Module):
    """A language model whose block stack is given by ``cfg.pattern``.

    ``model(tokens)`` -> :class:`ModelOutput`. ``taps=True`` (default) records all taps,
    ``taps=False`` none, a selector string only those it names (inference memory stays flat).
    Decoding: ``cache = model.init_cache(B, max_len)``, then ``model(tokens, cache=cache)`` repeatedly;
    attention keeps a KV cache, Mamba and recurrent blocks an O(1) state.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pattern = cfg.parsed
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in self.pattern.layers)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std) for linears/embeddings, residual outputs scaled by 1/sqrt(2L)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * max(1, len(self.blocks)))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, out_std if name.endswith("out_proj") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)

    def num_params(self, *, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> list[Any]:
        """Fresh decoding caches for every block (None for stateless MoE blocks)."""
        device = device if device is not None else self.embed.weight.device
        dtype = dtype if dtype is not None else self.embed.weight.dtype
        return [blk.init_cache(batch_size, max_len, device=device, dtype=dtype) for blk in self.blocks]

    def forward(self, tokens: Tensor, *, taps: bool | str = True, cache: list[Any] | None = None) -> ModelOutput:
        B, T = tokens.shape
        L = len(self.blocks)
        if taps is True:
            keep = None  # every position
        elif taps is False:
            keep = set()
        else:
            keep = set(resolve_selector(taps, self.pattern))
        recorded: list[Tap] = []
        positions: list[int] = []

        def record(pos: int, tap: Tap) -> None:
            if keep is None or pos in keep:
                recorded.append(tap)
                positions.append(pos)

        x = self.embed(tokens)  # (B, T, D)
        record(0, Tap(-1, None, 0, x, "embed"))
        aux: dict[str, Tensor] = {}
        stats: dict[str, list[Tensor]] = {}
        new_cache: list[Any] | None = [] if cache is not None else None
        for i, blk in enumerate(self.blocks):
            x, out = blk(x, None if cache is None else cache[i])  # (B, T, D)
            spec = blk.layer
            record(i + 1, Tap(spec.index, spec.family, spec.family_index, x))
            for k, v in out.aux.items():
                aux[k] = aux[k] + v if k in aux else v
            for k, v in out.stats.items():
                stats.setdefault(k, []).append(v)
            if new_cache is not None:
                new_cache.append(out.cache)
        h = self.norm(x)  # (B, T, D)
        record(L + 1, Tap(L, None, 0, h, "final"))
        logits = self.lm_head(h)  # (B, T, V)
        flat_stats: dict[str, Tensor] = {}
        for k, vs in stats.items():
            flat_stats[k] = torch.stack([v.float() for v in vs]).mean()
        e_blocks = [b.layer.name for b in self.blocks if b.layer.family.value == "E"]
        for k, vs in stats.items():
            if len(vs) == len(e_blocks):
                for name, v in zip(e_blocks, vs):
                    flat_stats[f"{k}/{name}"] = v
        tapset = None if taps is False else TapSet(recorded, self.pattern, positions)
        return ModelOutput(logits, tapset, aux, flat_stats, new_cache)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, eos_id: int | None = None) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (B, T0) with the decoding caches (O(1)/token for M, R).

        ``temperature=0`` is greedy. Returns (B, T0 + n) tokens; rows stop growing after ``eos_id``
        (later positions are filled with ``eos_id``).
        """
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be (B, T) with T >= 1, got {tuple(prompt.shape)}")
        B, T0 = prompt.shape
        max_len = T0 + max_new_tokens
        cache = self.init_cache(B, max_len)
        out = self(prompt, taps=False, cache=cache)
        cache, logits = out.cache, out.logits[:, -1]
        tokens = [prompt]
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            tokens.append(nxt[:, None])
            if eos_id is not None and bool(done.all()):
                break
            out = self(nxt[:, None], taps=False, cache=cache)
            cache, logits = out.cache, out.logits[:, -1]
        return torch.cat(tokens, dim=1)


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
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
