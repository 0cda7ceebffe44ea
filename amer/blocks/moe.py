"""E family: a sparse mixture of SwiGLU experts, the channel mixer of the hybrid stack.

Router: a bias-free linear map D -> E evaluated in fp32 with autocast off (ST-MoE, Zoph et al. 2022,
arXiv 2202.08906: low-precision router logits destabilise training), softmax over experts, top-k.
The k selected probabilities are renormalised to sum to one (Mixtral convention, Jiang et al. 2024,
arXiv 2401.04088) so a token's output scale does not depend on how peaked the router is. For
top_k == 1 that renormalisation would make every weight exactly 1 and cut the router off from
the task gradient, so k = 1 keeps the raw probability (Switch Transformer, Fedus et al. 2021,
arXiv 2101.03961).

Experts: stacked SwiGLU weights ``w_gate_up`` (E, D, 2F) and ``w_down`` (E, F, D), dispatched
``dropless`` (sorted grouped matmul, MegaBlocks) or ``capacity`` (static shapes, GShard/Switch;
for torch.compile and XLA), see :mod:`amer.ops.moe`. An optional shared expert (DeepSeekMoE,
Dai et al. 2024, arXiv 2401.06066) sees every token.

Auxiliary losses (already weighted, in ``MixerOutput.aux``):
  ``moe_lb``: aux_loss_coef * E * sum_e f_e P_e (Switch Transformer load balancing), f_e the
  fraction of routed token-slots sent to expert e, P_e the mean router probability of e; equals
  1 for a uniform router, and its gradient (through P only) pushes probability off busy experts.
  ``moe_z``: z_loss_coef * mean(logsumexp(logits)^2) (ST-MoE router z-loss): keeps logits small.

The layer is stateless per token, so it keeps no decoding cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import MixerOutput, SwiGLU, register_mixer
from amer.config import ModelConfig
from amer.ops.moe import dispatch_capacity, dispatch_dropless, expert_capacity
from amer.pattern import Family, LayerSpec

__all__ = ["MoEMixer", "route"]


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 logits (..., E) -> (probs (..., E), weights (..., k), expert_idx (..., k)).

    Renormalised top-k weights for k > 1 (Mixtral), the raw top-1 probability for k = 1 (Switch).
    """
    probs = logits.softmax(dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    weights = top_p / top_p.sum(dim=-1, keepdim=True) if top_k > 1 else top_p
    return probs, weights, top_i


@register_mixer(Family.EXPERT)
class MoEMixer(nn.Module):
    """Top-k routed mixture of SwiGLU experts with optional shared expert and router aux losses."""

    def __init__(self, cfg: ModelConfig, layer: LayerSpec) -> None:
        super().__init__()
        m = cfg.moe
        D = cfg.d_model
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.d_ff = m.d_ff or 2 * D
        self.dispatch = m.dispatch
        self.capacity_factor = m.capacity_factor
        self.aux_loss_coef, self.z_loss_coef = m.aux_loss_coef, m.z_loss_coef
        self.init_std = cfg.init_std
        self.n_layers = cfg.n_layers
        self.router = nn.Linear(D, m.n_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(m.n_experts, D, 2 * self.d_ff))
        self.w_down = nn.Parameter(torch.empty(m.n_experts, self.d_ff, D))
        self.shared = SwiGLU(D, m.d_ff_shared or self.d_ff) if m.shared_expert else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) everywhere; w_down additionally by 1/sqrt(2 * n_layers) (GPT-2 residual
        scaling, which the model applies to ``out_proj`` Linears but cannot see in stacked weights)."""
        std = self.init_std
        nn.init.normal_(self.router.weight, 0.0, std)
        nn.init.normal_(self.w_gate_up, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, std / math.sqrt(2 * self.n_layers))

    def forward(self, x: Tensor, cache: None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y (B, T, D), None, aux, stats). ``cache`` is ignored (stateless)."""
        B, T, D = x.shape
        E, k = self.n_experts, self.top_k
        n_slots = B * T * k
        rdt = torch.promote_types(x.dtype, torch.float32)  # at least fp32 (fp64 stays fp64 for tests)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(rdt), self.router.weight.to(rdt))  # (B, T, E)
        probs, weights, idx = route(logits, k)  # (B, T, E), (B, T, k), (B, T, k)

        if self.dispatch == "capacity":
            C = expert_capacity(B * T, k, E, self.capacity_factor)
            y, n_dropped = dispatch_capacity(x, idx, weights, self.w_gate_up, self.w_down, C)
        else:
            y = dispatch_dropless(x, idx, weights, self.w_gate_up, self.w_down)
            n_dropped = None
        if self.shared is not None:
            y = y + self.shared(x)

        # slot counts per expert via scatter_add (not bincount): static shape, compiles fullgraph
        flat_idx = idx.reshape(-1)
        counts = torch.zeros(E, device=x.device, dtype=torch.float32).scatter_add_(
            0, flat_idx, torch.ones_like(flat_idx, dtype=torch.float32))  # (E,)
        frac = counts / n_slots  # f_e, no gradient (argmax-like)
        mean_prob = probs.mean(dim=(0, 1))  # P_e, carries the gradient
        lb = E * (frac * mean_prob).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        aux = {"moe_lb": self.aux_loss_coef * lb, "moe_z": self.z_loss_coef * z}

        with torch.no_grad():
            stats = {
                "moe/load_max": counts.max() / (n_slots / E),
                "moe/drop_frac": (n_dropped.float() / n_slots) if n_dropped is not None
                else torch.zeros((), device=x.device),
                "moe/router_entropy": torch.special.entr(probs).sum(-1).mean(),
            }
        return MixerOutput(y.to(x.dtype), None, aux, stats)

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> None:
        """No state: every token is routed and transformed independently."""
        return None
