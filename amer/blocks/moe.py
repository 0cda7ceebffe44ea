"""E family: a sparse mixture of feed-forward experts, the channel mixer of the hybrid stack.

Router (:mod:`amer.blocks.moe_router`): a bias-free linear map D -> E evaluated in fp32 with autocast off (ST-MoE,
Zoph et al. 2022, arXiv 2202.08906: low-precision router logits destabilise training), then by default a softmax
over experts and top-k, the k selected probabilities renormalised to sum to one (Mixtral convention, Jiang et
al. 2024, arXiv 2401.04088) so a token's output scale does not depend on how peaked the router is. For
top_k == 1 that renormalisation would make every weight exactly 1 and cut the router off from the task
gradient, so k = 1 keeps the raw probability (Switch Transformer, Fedus et al. 2021, arXiv 2101.03961).
The routers of current models are options: raw top-k weights (Qwen-MoE, Yang et al. 2024, arXiv 2407.10671;
OLMoE, Muennighoff et al. 2024, arXiv 2409.02060; Jamba), sigmoid scores with a selection-only expert bias and
its auxiliary-loss-free update, group-limited top-k and a routed scaling factor (DeepSeek-V3, DeepSeek-AI 2024,
arXiv 2412.19437; Wang et al. 2024, arXiv 2408.15664), see ``docs/moe.md`` for the mapping of each
transformers class onto them.

Experts: stacked weights ``w_gate_up`` (E, D, 2F) and ``w_down`` (E, F, D), SwiGLU by default, or GeGLU, or
ungated squared ReLU (Nemotron-H) or GELU (``w_gate_up`` then (E, D, F)); optionally in a latent width that the
input is projected down to and the experts' sum back up from (Nemotron-H). Dispatched ``dropless`` (sorted
grouped matmul, MegaBlocks) or ``capacity`` (static shapes, a causal budget per document and row; for
torch.compile and XLA, chosen automatically on an XLA device), see :mod:`amer.ops.moe` and
:mod:`amer.ops.moe_capacity`. Optional shared experts (DeepSeekMoE, Dai et al. 2024, arXiv 2401.06066) see every
token, fused into one feed-forward of ``n_shared_experts * d_ff_shared`` hidden units, optionally scaled by a
per-token sigmoid gate (Qwen2-MoE, Qwen3-Next).

Auxiliary losses (already weighted, in ``MixerOutput.aux``):
  ``moe_lb``: aux_loss_coef * E * sum_e f_e P_e (Switch Transformer load balancing), f_e the
  fraction of routed token-slots sent to expert e, P_e the mean routing probability of e (a sigmoid router's
  scores normalised per token, as DeepSeek-V3 defines it); equals 1 for a uniform router, and its gradient
  (through P only) pushes probability off busy experts.
  ``moe_z``: z_loss_coef * mean(logsumexp(logits)^2) (ST-MoE router z-loss): keeps logits small.

Dropless, the layer is stateless per token and keeps no decoding cache; capacity dispatch keeps the
document's per-expert kept-slot counts, so decoding drops exactly what the full forward drops, and budgets
each packed document from its own first token, so a packed document drops what it drops alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import FeedForward, Mixer, MixerOutput
from amer.blocks.doc_ids import DocIds
from amer.blocks.moe_router import SCORES, balance, route, update_bias
from amer.config import Dims
from amer.configio import check, opt
from amer.families import FamilySpec, register_family
from amer.ops import kernels
from amer.ops.activation import ACTIVATIONS, Activation, activation
from amer.ops.fused import cast
from amer.ops.moe import dispatch_dropless, dispatch_padded
from amer.ops.moe_capacity import CapacityCache, block_capacity, dispatch_causal_capacity
from amer.pattern import LayerSpec

__all__ = ["MoEConfig", "MoEMixer", "ROUTER_OPTIONS", "route"]

# options that change the routing of a Mixtral-style block (softmax top-k, renormalised): what an exporter to a
# class without them must find at their defaults
ROUTER_OPTIONS = ("score", "renormalize", "renormalize_eps", "routed_scale", "expert_bias", "n_groups", "topk_groups",
                  "d_latent")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of feed-forward experts (the E family): fp32 router, dropless or capacity dispatch."""

    n_experts: int = opt(8, "MoE experts per E block (1: a dense feed-forward, no router, no aux loss, top-k ignored)")
    top_k: int = opt(2, "MoE experts each token is routed to")
    d_ff: int | None = opt(None, "MoE expert hidden width (default 2 * d-model)")
    shared_expert: bool = opt(False, "add always-on shared experts to every E block")
    d_ff_shared: int | None = opt(None, "hidden width of each shared expert (default d-ff)")
    dispatch: Literal["dropless", "capacity"] = opt(
        "dropless", "MoE dispatch: dropless (sort + grouped matmul) or capacity (static shapes, may drop)")
    capacity_factor: float = opt(1.25, "MoE capacity per expert as a multiple of the fair share (capacity dispatch)")
    capacity_block: int = opt(128, "MoE capacity dispatch: an expert earns its capacity per this many tokens "
                              "of a document")
    aux_loss_coef: float = opt(0.01, "MoE load-balancing loss weight (Switch Transformer)")
    z_loss_coef: float = opt(0.001, "MoE router z-loss weight (ST-MoE)")
    activation: Literal["silu", "gelu_tanh", "relu2", "gelu"] = opt(
        "silu", "expert activation (routed, shared and dense): silu (SwiGLU), gelu_tanh (GeGLU, Gemma), relu2 "
        "(squared ReLU, ungated, Nemotron-H) or gelu (exact GELU, ungated)")
    bias: bool = opt(False, "biases on the dense feed-forward's projections (RecurrentGemma); needs n-experts 1")
    renormalize_top1: bool = opt(False, "top-1 routing weight renormalised to 1, as Mixtral's formula gives (default: "
                                 "the raw probability, Switch; top-k > 1 renormalises unless renormalize is off)")
    score: Literal["softmax", "sigmoid"] = opt(
        "softmax", "router scores: softmax over the experts (Mixtral, Qwen-MoE, OLMoE) or a sigmoid per expert "
        "(DeepSeek-V3, LFM2-MoE, Nemotron-H)")
    renormalize: bool = opt(True, "routing weights: the chosen experts' scores renormalised to sum to 1 (Mixtral); "
                            "false keeps them raw (norm_topk_prob false: Qwen2-MoE, OLMoE, Jamba)")
    renormalize_eps: float = opt(0.0, "added to the renormalisation's denominator (LFM2-MoE: 1e-6)")
    routed_scale: float = opt(1.0, "routing weights multiplied by this (DeepSeek-V3's routed_scaling_factor)")
    expert_bias: bool = opt(False, "a per-expert bias added to the scores for the choice of experts only "
                            "(DeepSeek-V3's e_score_correction_bias, LFM2-MoE's expert_bias); a buffer, never trained "
                            "by gradients")
    bias_update_rate: float = opt(0.0, "auxiliary-loss-free balancing: after each optimizer step the expert bias moves "
                                  "this much towards balance (DeepSeek-V3: 0.001; 0: off); needs expert-bias")
    n_groups: int = opt(1, "group-limited routing: the experts form this many equal groups (DeepSeek-V3's n_group)")
    topk_groups: int = opt(1, "group-limited routing: a token's experts come from this many groups, those whose two "
                           "best scores sum highest (DeepSeek-V3's topk_group)")
    n_shared_experts: int = opt(1, "shared experts (with shared-expert), fused into one feed-forward of "
                                "n * d-ff-shared hidden units (DeepSeek-V3's n_shared_experts)")
    shared_expert_gate: bool = opt(False, "the shared experts' output scaled by a per-token gate sigmoid(x . w) "
                                   "(Qwen2-MoE, Qwen3-Next); needs shared-expert")
    d_latent: int | None = opt(None, "routed experts work at this width: the input projected down to it and their "
                               "sum back up (Nemotron-H's moe_latent_size); router and shared experts see d-model")

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
        check(not self.bias or self.n_experts == 1,
              f"moe.bias is implemented for the dense feed-forward (moe.n_experts 1), got n_experts {self.n_experts}")
        check(self.score in SCORES, f"moe.score must be one of {list(SCORES)}, got {self.score!r}")
        check(self.renormalize or not self.renormalize_top1,
              "moe.renormalize_top1 needs moe.renormalize (the top-1 weight cannot be renormalised alone)")
        check(self.renormalize_eps >= 0, f"moe.renormalize_eps must be >= 0, got {self.renormalize_eps}")
        check(self.routed_scale > 0, f"moe.routed_scale must be > 0, got {self.routed_scale}")
        check(self.bias_update_rate >= 0, f"moe.bias_update_rate must be >= 0, got {self.bias_update_rate}")
        check(self.bias_update_rate == 0 or self.expert_bias,
              "moe.bias_update_rate needs moe.expert_bias (the bias it updates)")
        check(self.n_groups >= 1 and self.n_experts % self.n_groups == 0,
              f"moe.n_groups ({self.n_groups}) must divide moe.n_experts ({self.n_experts})")
        check(1 <= self.topk_groups <= self.n_groups,
              f"moe.topk_groups ({self.topk_groups}) must be between 1 and moe.n_groups ({self.n_groups})")
        check(self.n_experts == 1 or self.top_k <= self.topk_groups * (self.n_experts // self.n_groups),
              f"moe.top_k ({self.top_k}) exceeds the experts of moe.topk_groups ({self.topk_groups}) groups of "
              f"{self.n_experts // self.n_groups}")
        check(self.n_shared_experts >= 1, f"moe.n_shared_experts must be >= 1, got {self.n_shared_experts}")
        check(not self.shared_expert_gate or self.shared_expert, "moe.shared_expert_gate needs moe.shared_expert")
        check(self.d_latent is None or self.d_latent >= 1, "moe.d_latent must be >= 1")
        check(self.d_latent is None or self.n_experts > 1,
              "moe.d_latent applies to routed experts (moe.n_experts > 1), got n_experts 1")


class MoEMixer(Mixer):
    """Top-k routed mixture of feed-forward experts with optional shared experts and router aux losses."""

    aux_losses = {"moe_lb": "--model.moe.aux-loss-coef", "moe_z": "--model.moe.z-loss-coef"}
    expert_params = ("w_gate_up", "w_down")  # stacked per expert along dim 0: what expert parallelism splits

    def __init__(self, cfg: MoEConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        D = dims.d_model
        E = cfg.n_experts
        self.n_experts, self.top_k = E, cfg.top_k
        self.d_ff = cfg.d_ff or 2 * D
        self.dispatch = cfg.dispatch
        self.renormalize_top1 = cfg.renormalize_top1
        self.route_options = {"score": cfg.score, "renormalize": cfg.renormalize, "eps": cfg.renormalize_eps,
                              "n_groups": cfg.n_groups, "topk_groups": cfg.topk_groups, "scale": cfg.routed_scale}
        self.capacity_factor, self.capacity_block = cfg.capacity_factor, cfg.capacity_block
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        # one expert is a dense feed-forward: no router, no dispatch, no auxiliary loss
        self.router = nn.Linear(D, E, bias=False) if E > 1 else None
        routed = self.router is not None
        self.activation = cfg.activation
        self.act: Activation = activation(cfg.activation)
        d_in = cfg.d_latent if routed and cfg.d_latent else D  # the experts' input and output width
        self.w_gate_up = nn.Parameter(torch.empty(E, d_in, (2 if self.act.gated else 1) * self.d_ff))
        self.w_down = nn.Parameter(torch.empty(E, self.d_ff, d_in))
        self.b_gate_up = nn.Parameter(torch.empty(1, self.w_gate_up.shape[-1])) if cfg.bias else None
        self.b_down = nn.Parameter(torch.empty(1, D)) if cfg.bias else None
        std, out_std = dims.init_std, dims.out_std
        self.shared = (FeedForward(D, cfg.n_shared_experts * (cfg.d_ff_shared or self.d_ff), cfg.activation,
                                   std=std, out_std=out_std) if cfg.shared_expert else None)
        self.shared_gate = nn.Linear(D, 1, bias=False) if cfg.shared_expert_gate else None
        self.to_latent = nn.Linear(D, d_in, bias=False) if d_in != D else None
        self.from_latent = nn.Linear(d_in, D, bias=False) if d_in != D else None
        # selection-only bias (saved with the weights) and, for its update, the load counted since the last step
        self.register_buffer("expert_bias", torch.zeros(E) if routed and cfg.expert_bias else None)
        self.bias_update_rate = cfg.bias_update_rate if routed else 0.0
        self.register_buffer("load", torch.zeros(E) if self.bias_update_rate > 0 else None, persistent=False)
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
        expert's ``w_down``, the shared experts' ``down``, the latent up-projection) additionally by
        1/sqrt(2 * n_layers) (GPT-2 residual scaling). The expert bias and its load counts start at zero."""
        std, out_std = self.dims.init_std, self.dims.out_std
        if self.router is not None:
            nn.init.normal_(self.router.weight, 0.0, std)
        nn.init.normal_(self.w_gate_up, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, out_std)
        for b in (self.b_gate_up, self.b_down, self.expert_bias, self.load):
            if b is not None:
                nn.init.zeros_(b)
        if self.shared is not None:
            self.shared.reset_parameters()
        for lin, s in ((self.shared_gate, std), (self.to_latent, std), (self.from_latent, out_std)):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, s)

    def init_buffers(self, device: torch.device | str = "cpu") -> None:
        """The load counts, which checkpoints do not carry (they restart every step)."""
        if self.load is not None:
            self.load = torch.zeros(self.n_experts, device=device)

    def after_step(self) -> None:
        """Auxiliary-loss-free balancing: the expert bias moves towards balance by the load since the last step."""
        if self.load is not None:
            update_bias(self.expert_bias, self.load, self.bias_update_rate)

    def flops(self, seq_len: int) -> dict[str, float]:
        """The router counts fully; each token visits ``top_k`` experts (3 D F multiply-adds each, 2 D F
        ungated), the latent projections and the shared experts (and their gate)."""
        T, D = seq_len, self.dims.d_model
        per_token = self.w_gate_up[0].numel() + self.w_down[0].numel()
        if self.router is None:
            out = {"experts": float(T * per_token)}
        else:
            out = {"router": float(T * D * self.n_experts), "experts": float(T * self.top_k * per_token)}
        if self.to_latent is not None:
            out["latent"] = float(T * 2 * D * self.w_down.shape[-1])
        if self.shared is not None:
            gate = 0 if self.shared_gate is None else D
            out["shared"] = float(T * (sum(p.numel() for p in self.shared.parameters()) + gate))
        return out

    def fullgraph_blocker(self) -> str | None:
        """The dropless dispatch compiles on grouped GEMM (static shapes); where that is unavailable (forced
        reference, fp64, widths that are not 16-byte aligned, torch < 2.8) the reference reads each expert's slice
        size on the host, a data-dependent shape."""
        if self.router is None or self.dispatch != "dropless":
            return None
        w = self.w_gate_up
        widths = (w.shape[1], w.shape[2], self.w_down.shape[1])
        # also for 16-bit elements: a bf16 autocast run needs that alignment with fp32 weights
        why = (kernels.grouped_mm_unavailable(w.device, w.dtype, widths)
               or kernels.grouped_mm_unavailable(w.device, torch.bfloat16, widths))
        if why is None:
            return None
        return (f"dropless MoE dispatch without grouped GEMM ({why}) has data-dependent shapes "
                "(use --model.moe.dispatch capacity to compile it)")

    def device_note(self, device_type: str) -> str | None:
        if device_type == "xla" and self.router is not None and self.dispatch != "capacity":
            return (f"on XLA the MoE layers use the static causal capacity dispatch instead of dropless (capacity "
                    f"factor {self.capacity_factor}, earned per {self.capacity_block} tokens of each document; "
                    "drops are logged as moe/drop_frac)")
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
        rdt = torch.promote_types(x.dtype, torch.float32)  # at least fp32 (fp64 stays fp64 for tests)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(cast(x, rdt), cast(self.router.weight, rdt))  # (B, T, E)
        probs, weights, idx = route(logits, k, self.renormalize_top1, bias=self.expert_bias,
                                    **self.route_options)  # (B, T, E), (B, T, k), (B, T, k)
        xe = x if self.to_latent is None else self.to_latent(x)

        ep = self.expert_dispatch
        if not torch.is_grad_enabled() and cache is None and self.dispatch != "capacity" and ep is None \
                and x.device.type == "cpu" and B * T * k <= PADDED_SLOTS and not torch.compiler.is_compiling():
            # decoding-sized inference: no sort-and-group dispatch, and no losses or training figures (nothing reads
            # them); a handful of slots one matmul pair each, a few dozen tokens on padded batched matmuls. Eager only:
            # the padded count is read on the host, which inductor cannot lower (a compiled evaluation of a small
            # batch failed with "could not guard on data-dependent expression")
            few = B * T * k <= FEW_SLOTS
            y = (_few_tokens(xe, idx, weights, self.w_gate_up, self.w_down, self.act) if few else
                 dispatch_padded(xe, idx, weights, self.w_gate_up, self.w_down, self.activation))
            return MixerOutput(cast(self._combine(x, y), x.dtype), None, {}, {})
        if self.dispatch == "capacity" or x.device.type == "xla" or cache is not None:
            y, n_dropped, block_counts = dispatch_causal_capacity(
                xe, idx, weights, self.w_gate_up, self.w_down, block=self.capacity_block,
                capacity=block_capacity(self.capacity_block, k, E, self.capacity_factor),
                start=0 if cache is None else cache.pos, counts=None if cache is None else cache.counts,
                position=None if doc_ids is None else doc_ids.position, act=self.activation,
                experts=None if ep is None else ep.padded)
            if cache is not None:
                cache = CapacityCache(block_counts, cache.pos + T)
        else:
            y = (dispatch_dropless if ep is None else ep.dropless)(xe, idx, weights, self.w_gate_up, self.w_down,
                                                                   self.activation)
            n_dropped = None
        y = self._combine(x, y)
        if n_dropped is None and not (self.training or torch.is_grad_enabled()):
            # dropless evaluation and decoding: the balancing losses and load figures are training figures, nothing
            # reads them here, and at decoding sizes they cost about a sixth of the block (a capacity layer keeps its
            # figures: how much it drops outside training is worth knowing)
            return MixerOutput(y.to(x.dtype), cache, {}, {})

        valid = None if doc_ids is None else doc_ids.valid.reshape(-1, 1).float()  # (B T, 1)
        aux, stats, counts = balance(logits, probs, idx, valid=valid, stats_group=self.stats_group,
                                     aux_coef=self.aux_loss_coef, z_coef=self.z_loss_coef, n_dropped=n_dropped)
        if self.load is not None and self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.load.add_(counts)
        return MixerOutput(y.to(x.dtype), cache, aux, stats)

    def _combine(self, x: Tensor, y: Tensor) -> Tensor:
        """The routed experts' sum ``y`` (back from the latent width) plus the (gated) shared experts on x."""
        if self.from_latent is not None:
            y = self.from_latent(y)
        if self.shared is None:
            return y
        s = self.shared(x)
        if self.shared_gate is not None:
            s = torch.sigmoid(self.shared_gate(x)) * s
        return y + s

    def _dense(self, x: Tensor) -> MixerOutput:
        """The one-expert case: a plain (gated) feed-forward, ``down(act(gate) * up)`` or ``down(act(up))``."""
        h = torch.matmul(x, self.w_gate_up[0].to(x.dtype))  # (B, T, 2F) or (B, T, F)
        if self.b_gate_up is not None:
            h = h + self.b_gate_up[0].to(x.dtype)
        if self.act.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act.fn(gate) * up
        else:
            h = self.act.fn(h)
        y = torch.matmul(h, self.w_down[0].to(x.dtype))
        if self.b_down is not None:
            y = y + self.b_down[0].to(x.dtype)
        return MixerOutput(self._combine(x, y), None, {}, {})


FEW_SLOTS = 16  # up to this many (token, expert) slots, e.g. decoding one row, run them one matmul pair each
PADDED_SLOTS = 256  # up to this many, on padded batched matmuls (measured faster than grouped GEMM up to 128 tokens)


def _few_tokens(x: Tensor, idx: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor, act: Activation) -> Tensor:
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
        h = torch.cat([torch.mm(xn, cast(w_gate_up[e], dt)) for e in experts])  # (k, 2F) or ungated (k, F)
        if act.gated:
            gate, up = h.chunk(2, dim=-1)
            a = act.fn(gate).mul_(up)
        else:
            a = act.fn(h)
        a = a.mul_(w_slots[n].unsqueeze(1))  # (k, F), each slot's routing weight applied
        y = torch.mm(a[:1], cast(w_down[experts[0]], dt))
        for j in range(1, len(experts)):
            y = torch.addmm(y, a[j:j + 1], cast(w_down[experts[j]], dt))
        rows.append(y)
    return torch.cat(rows).reshape(x.shape)


register_family(FamilySpec(letter="E", name="expert", colour="#d62728", config_key="moe",
                           config=MoEConfig, mixer=MoEMixer,
                           summary="top-k mixture of feed-forward experts (dropless or capacity dispatch)"))
