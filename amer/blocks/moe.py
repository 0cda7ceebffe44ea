"""E family: a sparse mixture of SwiGLU experts, the channel mixer of the hybrid stack.

Router: a bias-free linear map D -> E evaluated in fp32 with autocast off (ST-MoE, Zoph et al. 2022,
arXiv 2202.08906: low-precision router logits destabilise training), softmax over experts, top-k.
The k selected probabilities are renormalised to sum to one (Mixtral convention, Jiang et al. 2024,
arXiv 2401.04088) so a token's output scale does not depend on how peaked the router is. For
top_k == 1 that renormalisation would make every weight exactly 1 and cut the router off from
the task gradient, so k = 1 keeps the raw probability (Switch Transformer, Fedus et al. 2021,
arXiv 2101.03961).

Experts: stacked SwiGLU weights ``w_gate_up`` (E, D, 2F) and ``w_down`` (E, F, D), dispatched
``dropless`` (sorted grouped matmul, MegaBlocks) or ``capacity`` (static shapes, a causal per-row,
per-block queue; for torch.compile and XLA, chosen automatically on an XLA device), see
:mod:`amer.ops.moe` and :mod:`amer.ops.moe_capacity`. An optional shared expert (DeepSeekMoE,
Dai et al. 2024, arXiv 2401.06066) sees every token.

Auxiliary losses (already weighted, in ``MixerOutput.aux``):
  ``moe_lb``: aux_loss_coef * E * sum_e f_e P_e (Switch Transformer load balancing), f_e the
  fraction of routed token-slots sent to expert e, P_e the mean router probability of e; equals
  1 for a uniform router, and its gradient (through P only) pushes probability off busy experts.
  ``moe_z``: z_loss_coef * mean(logsumexp(logits)^2) (ST-MoE router z-loss): keeps logits small.

Dropless, the layer is stateless per token and keeps no decoding cache; capacity dispatch keeps the
current block's per-expert slot counts, so decoding drops exactly what the full forward drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import Mixer, MixerOutput, SwiGLU
from amer.blocks.doc_ids import DocIds
from amer.config import Dims
from amer.configio import check, opt
from amer.families import FamilySpec, register_family
from amer.ops.fused import cast
from amer.ops.moe import dispatch_dropless
from amer.ops.moe_capacity import CapacityCache, block_capacity, dispatch_causal_capacity
from amer.pattern import LayerSpec

__all__ = ["MoEConfig", "MoEMixer", "route"]


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of SwiGLU experts (the E family): top-k fp32 router, dropless or capacity dispatch."""

    n_experts: int = opt(8, "MoE experts per E block (1: a dense feed-forward, no router, no aux loss, top-k ignored)")
    top_k: int = opt(2, "MoE experts each token is routed to")
    d_ff: int | None = opt(None, "MoE expert hidden width (default 2 * d-model)")
    shared_expert: bool = opt(False, "add an always-on shared expert to every E block")
    d_ff_shared: int | None = opt(None, "shared expert hidden width (default d-ff)")
    dispatch: Literal["dropless", "capacity"] = opt(
        "dropless", "MoE dispatch: dropless (sort + grouped matmul) or capacity (static shapes, may drop)")
    capacity_factor: float = opt(1.25, "MoE capacity per expert as a multiple of the fair share (capacity dispatch)")
    capacity_block: int = opt(128, "MoE capacity dispatch: tokens of a row that share one capacity budget")
    aux_loss_coef: float = opt(0.01, "MoE load-balancing loss weight (Switch Transformer)")
    z_loss_coef: float = opt(0.001, "MoE router z-loss weight (ST-MoE)")
    activation: Literal["silu", "gelu_tanh", "relu2"] = opt(
        "silu", "expert activation: silu (SwiGLU), gelu_tanh (GeGLU, Gemma) or relu2 (squared ReLU, ungated, "
        "Nemotron-H); other than silu needs n-experts 1")
    bias: bool = opt(False, "biases on the dense feed-forward's projections (RecurrentGemma); needs n-experts 1")
    renormalize_top1: bool = opt(False, "top-1 routing weight renormalised to 1, as Mixtral's formula gives (default: "
                                 "the raw probability, Switch; top-k > 1 always renormalises)")

    def __post_init__(self) -> None:
        check(self.n_experts >= 1, f"moe.n_experts must be >= 1, got {self.n_experts}")
        check(self.n_experts == 1 or 1 <= self.top_k <= self.n_experts,
              f"moe.top_k ({self.top_k}) must be between 1 and moe.n_experts ({self.n_experts})")
        check(self.d_ff is None or self.d_ff >= 1, "moe.d_ff must be >= 1")
        check(self.d_ff_shared is None or self.d_ff_shared >= 1, "moe.d_ff_shared must be >= 1")
        check(self.dispatch in ("dropless", "capacity"),
              f"moe.dispatch must be 'dropless' or 'capacity', got {self.dispatch!r}")
        check(self.capacity_factor > 0, f"moe.capacity_factor must be > 0, got {self.capacity_factor}")
        check(self.capacity_block >= 1, f"moe.capacity_block must be >= 1, got {self.capacity_block}")
        check(self.aux_loss_coef >= 0 and self.z_loss_coef >= 0, "moe loss coefficients must be >= 0")
        check(self.activation in ACTIVATIONS,
              f"moe.activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        check(self.activation == "silu" or self.n_experts == 1,
              f"moe.activation {self.activation!r} is implemented for the dense feed-forward (moe.n_experts 1); "
              f"routed experts are SwiGLU (silu), got n_experts {self.n_experts}")
        check(not self.bias or self.n_experts == 1,
              f"moe.bias is implemented for the dense feed-forward (moe.n_experts 1), got n_experts {self.n_experts}")


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _relu2(x: Tensor) -> Tensor:
    return F.relu(x).square()


# activation -> (function, gated): gated feed-forwards multiply act(gate) by a second projection (GLU, Shazeer 2020)
ACTIVATIONS: dict[str, tuple[Any, bool]] = {"silu": (F.silu, True), "gelu_tanh": (_gelu_tanh, True),
                                             "relu2": (_relu2, False)}


def route(logits: Tensor, top_k: int, renormalize_top1: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 logits (..., E) -> (probs (..., E), weights (..., k), expert_idx (..., k)).

    Renormalised top-k weights for k > 1 (Mixtral), the raw top-1 probability for k = 1 (Switch) unless
    ``renormalize_top1`` (a weight of exactly 1, as Mixtral's formula gives for k = 1).
    """
    probs = logits.softmax(dim=-1)
    top_p, top_i = probs.topk(top_k, dim=-1)
    weights = top_p / top_p.sum(dim=-1, keepdim=True) if top_k > 1 or renormalize_top1 else top_p
    return probs, weights, top_i


class MoEMixer(Mixer):
    """Top-k routed mixture of SwiGLU experts with optional shared expert and router aux losses."""

    aux_losses = {"moe_lb": "--model.moe.aux-loss-coef", "moe_z": "--model.moe.z-loss-coef"}
    expert_params = ("w_gate_up", "w_down")  # stacked per expert along dim 0: what expert parallelism splits

    def __init__(self, cfg: MoEConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        D = dims.d_model
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.d_ff = cfg.d_ff or 2 * D
        self.dispatch = cfg.dispatch
        self.renormalize_top1 = cfg.renormalize_top1
        self.capacity_factor, self.capacity_block = cfg.capacity_factor, cfg.capacity_block
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        # one expert is a dense feed-forward: no router, no dispatch, no auxiliary loss
        self.router = nn.Linear(D, cfg.n_experts, bias=False) if cfg.n_experts > 1 else None
        self.act, gated = ACTIVATIONS[cfg.activation]
        self.w_gate_up = nn.Parameter(torch.empty(cfg.n_experts, D, (2 if gated else 1) * self.d_ff))
        self.w_down = nn.Parameter(torch.empty(cfg.n_experts, self.d_ff, D))
        self.b_gate_up = nn.Parameter(torch.empty(1, self.w_gate_up.shape[-1])) if cfg.bias else None
        self.b_down = nn.Parameter(torch.empty(1, D)) if cfg.bias else None
        self.shared = (SwiGLU(D, cfg.d_ff_shared or self.d_ff, std=dims.init_std, out_std=dims.out_std)
                       if cfg.shared_expert else None)
        # Data parallel sets this to its process group (from outside the model): the expert load f_e and the
        # token count are then summed over the ranks, so each rank's balancing loss is its share of the
        # global batch's, exactly as one process computing the whole batch would have it.
        self.stats_group: Any = None
        # Expert parallelism sets this from outside the model (amer.training.expert_parallel): an object whose
        # dropless(...) and padded(...) run the experts of this block on the ranks that hold them.
        self.expert_dispatch: Any = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) everywhere; the projections that write into the residual stream (every
        expert's ``w_down`` and the shared expert's ``down``) additionally by 1/sqrt(2 * n_layers)
        (GPT-2 residual scaling)."""
        std, out_std = self.dims.init_std, self.dims.out_std
        if self.router is not None:
            nn.init.normal_(self.router.weight, 0.0, std)
        nn.init.normal_(self.w_gate_up, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, out_std)
        for b in (self.b_gate_up, self.b_down):
            if b is not None:
                nn.init.zeros_(b)
        if self.shared is not None:
            self.shared.reset_parameters()

    def flops(self, seq_len: int) -> dict[str, float]:
        """The router counts fully; each token visits ``top_k`` experts (3 D F multiply-adds each) and the
        shared expert."""
        T, D = seq_len, self.dims.d_model
        per_token = self.w_gate_up[0].numel() + self.w_down[0].numel()
        if self.router is None:
            out = {"experts": float(T * per_token)}
        else:
            out = {"router": float(T * D * self.n_experts), "experts": float(T * self.top_k * per_token)}
        if self.shared is not None:
            out["shared"] = float(T * sum(p.numel() for p in self.shared.parameters()))
        return out

    def fullgraph_blocker(self) -> str | None:
        if self.router is not None and self.dispatch == "dropless":
            return "dropless MoE dispatch has data-dependent shapes (use --model.moe.dispatch capacity to compile it)"
        return None

    def device_note(self, device_type: str) -> str | None:
        if device_type == "xla" and self.router is not None and self.dispatch != "capacity":
            return (f"on XLA the MoE layers use the static causal capacity dispatch instead of dropless (capacity "
                    f"factor {self.capacity_factor}, blocks of {self.capacity_block} tokens; drops are logged as "
                    "moe/drop_frac)")
        return None

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> CapacityCache | None:
        """Capacity dispatch (or an XLA device): the block's per-expert slot counts; dropless: none."""
        if self.router is None or (self.dispatch != "capacity" and torch.device(device or "cpu").type != "xla"):
            return None
        return CapacityCache(torch.zeros(batch_size, self.n_experts, dtype=torch.long, device=device), 0)

    def forward(self, x: Tensor, cache: CapacityCache | None = None,
                doc_ids: DocIds | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y (B, T, D), cache, aux, stats). Capacity dispatch (configured, on an
        XLA device, or with a :class:`CapacityCache`) keeps ``cache`` up to date; dropless ignores it.

        Every token is routed alike; with ``doc_ids``, the load-balancing and z losses and the load
        statistics count real tokens only (padding, negative ids, is routed but not counted).
        """
        if self.router is None:
            return self._dense(x)
        B, T, D = x.shape
        E, k = self.n_experts, self.top_k
        valid = None if doc_ids is None else doc_ids.valid.reshape(-1, 1).float()  # (B T, 1)
        n_tokens = B * T if valid is None else valid.sum().clamp(min=1.0)
        rdt = torch.promote_types(x.dtype, torch.float32)  # at least fp32 (fp64 stays fp64 for tests)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(cast(x, rdt), cast(self.router.weight, rdt))  # (B, T, E)
        probs, weights, idx = route(logits, k, self.renormalize_top1)  # (B, T, E), (B, T, k), (B, T, k)

        ep = self.expert_dispatch
        if not torch.is_grad_enabled() and cache is None and self.dispatch != "capacity" and ep is None \
                and x.device.type == "cpu" and B * T * k <= FEW_SLOTS:
            # decoding-sized inference: no dispatch, and no losses or training figures (nothing reads them)
            y = _few_tokens(x, idx, weights, self.w_gate_up, self.w_down, self.act)
            return MixerOutput(cast(y if self.shared is None else y + self.shared(x), x.dtype), None, {}, {})
        if self.dispatch == "capacity" or x.device.type == "xla" or cache is not None:
            y, n_dropped, block_counts = dispatch_causal_capacity(
                x, idx, weights, self.w_gate_up, self.w_down, block=self.capacity_block,
                capacity=block_capacity(self.capacity_block, k, E, self.capacity_factor),
                start=0 if cache is None else cache.pos, counts=None if cache is None else cache.counts,
                **({} if ep is None else {"experts": ep.padded}))
            if cache is not None:
                cache = CapacityCache(block_counts, cache.pos + T)
        else:
            y = (dispatch_dropless if ep is None else ep.dropless)(x, idx, weights, self.w_gate_up, self.w_down)
            n_dropped = None
        if self.shared is not None:
            y = y + self.shared(x)

        # slot counts per expert via scatter_add (not bincount): static shape, compiles fullgraph
        flat_idx = idx.reshape(-1)
        ones = torch.ones(B * T, k, device=x.device) if valid is None else valid.expand(B * T, k)
        counts = torch.zeros(E, device=x.device, dtype=torch.float32).scatter_add_(
            0, flat_idx, ones.reshape(-1))  # (E,)
        n_mean = n_tokens  # denominator of this rank's token means
        if self.stats_group is not None:
            counts, n_tokens, share = _global_counts(counts, n_tokens, self.stats_group)
            n_mean = n_tokens * share  # this rank's share of the global count: the mean over ranks is global
        n_slots = n_tokens * k
        frac = counts / n_slots  # f_e, no gradient (argmax-like)
        z_tok = torch.logsumexp(logits, dim=-1).square()  # (B, T)
        if valid is None and self.stats_group is None:
            mean_prob = probs.mean(dim=(0, 1))  # P_e, carries the gradient
            z = z_tok.mean()
        else:
            w = torch.ones(B * T, 1, device=x.device) if valid is None else valid
            mean_prob = (probs.reshape(-1, E) * w).sum(0).to(probs.dtype) / n_mean
            z = (z_tok.reshape(-1, 1) * w).sum() / n_mean
        lb = E * (frac * mean_prob).sum()
        aux = {"moe_lb": self.aux_loss_coef * lb, "moe_z": self.z_loss_coef * z}

        with torch.no_grad():
            stats = {
                "moe/load_max": counts.max() / (n_slots / E),
                "moe/drop_frac": (n_dropped.float() / (B * T * k)) if n_dropped is not None
                else torch.zeros((), device=x.device),
                # -xlogy(p, p) is entr(p); XLA compiles xlogy (entr falls back to the host)
                "moe/router_entropy": (-torch.xlogy(probs, probs).sum(-1).mean() if valid is None else
                                       (-torch.xlogy(probs, probs).sum(-1).reshape(-1, 1) * valid).sum() / n_mean),
            }
        return MixerOutput(y.to(x.dtype), cache, aux, stats)


    def _dense(self, x: Tensor) -> MixerOutput:
        """The one-expert case: a plain (gated) feed-forward, ``down(act(gate) * up)`` or ``down(act(up))``."""
        h = torch.matmul(x, self.w_gate_up[0].to(x.dtype))  # (B, T, 2F) or (B, T, F)
        if self.b_gate_up is not None:
            h = h + self.b_gate_up[0].to(x.dtype)
        if h.shape[-1] == 2 * self.d_ff:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        y = torch.matmul(h, self.w_down[0].to(x.dtype))
        if self.b_down is not None:
            y = y + self.b_down[0].to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x)
        return MixerOutput(y, None, {}, {})


FEW_SLOTS = 16  # up to this many (token, expert) slots, e.g. decoding one row, run them one matmul pair each


def _few_tokens(x: Tensor, idx: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor, act: Any) -> Tensor:
    """Dropless routing for a handful of tokens without dispatch: per token, its ``top_k`` gate/up products
    stacked into one (k, 2F) activation, weighted, and the down products summed by ``addmm``. Decoding one
    token runs ``top_k`` slots per E block, where sorting and grouping tokens by expert costs more than the
    matmuls (measured 170 vs 320 us for top-2 of 8 experts at width 192; this layout 180 vs 230 us for the
    one-matmul-pair-per-slot loop it replaced). The host reads ``idx``: a decoding loop is host-driven anyway."""
    dt = torch.promote_types(x.dtype, w_down.dtype)
    xs = cast(x.reshape(-1, x.shape[-1]), dt)
    w_slots = cast(weights.reshape(xs.shape[0], -1), dt)
    rows = []
    for n, experts in enumerate(idx.reshape(xs.shape[0], -1).tolist()):
        xn = xs[n:n + 1]
        h = torch.cat([torch.mm(xn, cast(w_gate_up[e], dt)) for e in experts])  # (k, 2F)
        gate, up = h.chunk(2, dim=-1)
        a = act(gate).mul_(up).mul_(w_slots[n].unsqueeze(1))  # (k, F), each slot's routing weight applied
        y = torch.mm(a[:1], cast(w_down[experts[0]], dt))
        for j in range(1, len(experts)):
            y = torch.addmm(y, a[j:j + 1], cast(w_down[experts[j]], dt))
        rows.append(y)
    return torch.cat(rows).reshape(x.shape)


def _global_counts(counts: Tensor, n_tokens: Any, group: Any) -> tuple[Tensor, Tensor, float]:
    """Expert slot counts and the token count summed over ``group``, and 1 / its size."""
    import torch.distributed as dist

    both = torch.cat([counts, torch.as_tensor(n_tokens, dtype=counts.dtype, device=counts.device).reshape(1)])
    dist.all_reduce(both, group=group)
    return both[:-1], both[-1], 1.0 / dist.get_world_size(group)


register_family(FamilySpec(letter="E", name="expert", colour="#d62728", config_key="moe",
                           config=MoEConfig, mixer=MoEMixer,
                           summary="top-k mixture of SwiGLU experts (dropless or capacity dispatch)"))
