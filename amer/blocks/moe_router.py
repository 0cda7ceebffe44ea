"""The E family's router: scores, the choice of experts, routing weights, balancing losses and statistics, and
the auxiliary-loss-free expert bias. Pure functions of fp32 router logits; the mixer (:mod:`amer.blocks.moe`)
owns the weights and buffers.

**Scores.** A softmax over the experts (Switch Transformer, Fedus et al. 2021, arXiv 2101.03961; Mixtral, Jiang
et al. 2024, arXiv 2401.04088; Qwen-MoE; OLMoE, Muennighoff et al. 2024, arXiv 2409.02060) or an independent
sigmoid per expert (DeepSeek-V3, DeepSeek-AI 2024, arXiv 2412.19437; LFM2-MoE; Nemotron-H).

**Choice.** The top-k of the scores, optionally plus a per-expert bias that only the choice sees (DeepSeek-V3's
``e_score_correction_bias``, LFM2-MoE's ``expert_bias``: auxiliary-loss-free load balancing, Wang et al. 2024,
arXiv 2408.15664), optionally restricted to the ``topk_groups`` of ``n_groups`` equal groups of experts whose two
best (biased) scores sum highest (DeepSeek-V3's group-limited routing, ``n_group`` / ``topk_group``).

**Weights.** The chosen experts' unbiased scores, renormalised to sum to one (Mixtral) unless ``renormalize`` is
off (Qwen2-MoE's and OLMoE's ``norm_topk_prob=False``, Jamba), with ``eps`` added to the denominator (LFM2-MoE
adds 1e-6), then multiplied by ``scale`` (DeepSeek-V3's ``routed_scaling_factor``). Top-1 keeps its raw score
unless ``renormalize_top1``: renormalising one weight makes it exactly 1 and cuts the router off from the task
gradient (Switch).

**Balancing.** ``moe_lb`` = E * sum_e f_e P_e (Switch): f_e the fraction of routed slots actually sent to e (bias
and group limits included), P_e the mean over tokens of the per-token routing distribution ``probs``. For a
softmax router that is the softmax. For a sigmoid router it is the sigmoid scores normalised to sum to one per
token, as DeepSeek-V3's complementary sequence-wise balance loss (its eqs. 17-20) and Megatron-Core's aux-loss
scores for sigmoid routers define it: the distribution the router ranks experts by. (transformers computes no
balancing loss for DeepSeek-V3, LFM2-MoE or Nemotron-H, and its shared ``load_balancing_loss_func`` takes a
softmax of the logits whatever the router, MiniMax-M2's sigmoid router included.) Either way a uniform router
gives 1. ``moe_z`` = mean(logsumexp(logits)^2) (ST-MoE, Zoph et al. 2022, arXiv 2202.08906) keeps the logits
small for both scores.

**Auxiliary-loss-free balancing** (``bias_update_rate`` u > 0). Training forwards (training mode, gradients on)
add each expert's slot count to a buffer; after each optimizer step (:meth:`amer.blocks.common.Mixer.after_step`,
which the optimizer calls) ``b_e += u * sign(mean_e(load) - load_e)`` (Wang et al. 2024; DeepSeek-V3 used
u = 0.001) and the counts restart. Updating once a step, not once a forward, keeps the choice of experts fixed
within a step, so a forward recomputed by activation checkpointing routes exactly as the original did (the
recomputation adds every count of the block a second time, which the sign ignores), and gradient accumulation
sees one bias. Under data parallelism the counts are the global ones (the balancing statistics' all-reduce), so
every rank applies the same update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["SCORES", "route", "balance", "update_bias"]

SCORES = ("softmax", "sigmoid")


def route(logits: Tensor, top_k: int, renormalize_top1: bool = False, *, score: str = "softmax",
          renormalize: bool = True, eps: float = 0.0, bias: Tensor | None = None, n_groups: int = 1,
          topk_groups: int = 1, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 logits (..., E) -> (probs (..., E), weights (..., k), expert_idx (..., k)).

    ``probs`` is the per-token routing distribution the balancing loss reads (see the module docstring); the
    options are those of the module docstring, their defaults the softmax top-k of Mixtral (raw top-1).
    """
    if score == "softmax" and bias is None and n_groups == 1:
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(top_k, dim=-1)
    else:
        scores = logits.softmax(dim=-1) if score == "softmax" else logits.sigmoid()
        choice = scores if bias is None else scores + bias.to(scores.dtype)
        if n_groups > 1:
            choice = _limit_groups(choice, n_groups, topk_groups)
        top_i = choice.topk(top_k, dim=-1).indices
        top_p = scores.gather(-1, top_i)
        probs = scores if score == "softmax" else scores / scores.sum(-1, keepdim=True).clamp(min=1e-30)
    if renormalize and (top_k > 1 or renormalize_top1):
        total = top_p.sum(dim=-1, keepdim=True)
        weights = top_p / (total + eps if eps else total)
    else:
        weights = top_p
    if scale != 1.0:
        weights = weights * scale
    return probs, weights, top_i


def _limit_groups(choice: Tensor, n_groups: int, topk_groups: int) -> Tensor:
    """``choice`` (..., E) with every expert outside the token's ``topk_groups`` best groups set to -inf; a group
    ranks by the sum of its two best scores (one, for groups of one expert)."""
    shape = choice.shape
    g = choice.reshape(*shape[:-1], n_groups, shape[-1] // n_groups)  # (..., G, E/G)
    best = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1)  # (..., G)
    keep = torch.zeros_like(best, dtype=torch.bool).scatter_(-1, best.topk(topk_groups, dim=-1).indices, True)
    return g.masked_fill(~keep.unsqueeze(-1), float("-inf")).reshape(shape)


def balance(logits: Tensor, probs: Tensor, idx: Tensor, *, valid: Tensor | None, stats_group: Any,
            aux_coef: float, z_coef: float, n_dropped: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor],
                                                                                Tensor]:
    """The weighted balancing losses, the load statistics and the slot count per expert (global under data
    parallelism), from logits and probs (B, T, E), idx (B, T, k) and ``valid`` (B T, 1) (None: every token
    counts)."""
    B, T, E = probs.shape
    k = idx.shape[-1]
    n_tokens = B * T if valid is None else valid.sum().clamp(min=1.0)
    # slot counts per expert via scatter_add (not bincount): static shape, compiles fullgraph
    flat_idx = idx.reshape(-1)
    ones = torch.ones(B * T, k, device=probs.device) if valid is None else valid.expand(B * T, k)
    counts = torch.zeros(E, device=probs.device, dtype=torch.float32).scatter_add_(
        0, flat_idx, ones.reshape(-1))  # (E,)
    n_mean = n_tokens  # denominator of this rank's token means
    if stats_group is not None:
        counts, n_tokens, share = _global_counts(counts, n_tokens, stats_group)
        n_mean = n_tokens * share  # this rank's share of the global count: the mean over ranks is global
    n_slots = n_tokens * k
    frac = counts / n_slots  # f_e, no gradient (argmax-like)
    z_tok = torch.logsumexp(logits, dim=-1).square()  # (B, T)
    if valid is None and stats_group is None:
        mean_prob = probs.mean(dim=(0, 1))  # P_e, carries the gradient
        z = z_tok.mean()
    else:
        w = torch.ones(B * T, 1, device=probs.device) if valid is None else valid
        mean_prob = (probs.reshape(-1, E) * w).sum(0).to(probs.dtype) / n_mean
        z = (z_tok.reshape(-1, 1) * w).sum() / n_mean
    lb = E * (frac * mean_prob).sum()
    aux = {"moe_lb": aux_coef * lb, "moe_z": z_coef * z}

    with torch.no_grad():
        stats = {
            "moe/load_max": counts.max() / (n_slots / E),
            "moe/drop_frac": (n_dropped.float() / (B * T * k)) if n_dropped is not None
            else torch.zeros((), device=probs.device),
            # -xlogy(p, p) is entr(p); XLA compiles xlogy (entr falls back to the host)
            "moe/router_entropy": (-torch.xlogy(probs, probs).sum(-1).mean() if valid is None else
                                   (-torch.xlogy(probs, probs).sum(-1).reshape(-1, 1) * valid).sum() / n_mean),
        }
    return aux, stats, counts


@torch.no_grad()
def update_bias(bias: Tensor, load: Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (Wang et al. 2024): ``bias += rate * sign(mean(load) - load)`` in place, the
    load counts restart. No load counted (no training forward since the last update): no change."""
    bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=rate)
    load.zero_()


def _global_counts(counts: Tensor, n_tokens: Any, group: Any) -> tuple[Tensor, Tensor, float]:
    """Expert slot counts and the token count summed over ``group``, and 1 / its size."""
    import torch.distributed as dist

    both = torch.cat([counts, torch.as_tensor(n_tokens, dtype=counts.dtype, device=counts.device).reshape(1)])
    dist.all_reduce(both, group=group)
    return both[:-1], both[-1], 1.0 / dist.get_world_size(group)
