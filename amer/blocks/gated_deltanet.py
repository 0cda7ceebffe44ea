"""Gated DeltaNet mixer (the G family): Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving
Mamba2 with Delta Rule" (ICLR 2025, arXiv 2412.06464), with Kimi Delta Attention (Kimi Team 2025,
arXiv 2510.26692) as its per-channel-decay variant.

    in_proj: D -> [q (Hk dk) | k (Hk dk) | v (H dv) | z (output gate) | b (H) | a (decay gate)]   one GEMM
    q, k, v = silu(causal_depthwise_conv([q | k | v]))             one short conv over the three
    q, k    = l2norm per head; q * dk^-1/2
    beta    = sigmoid(b)        (x 2 with allow_neg_eigval: eigenvalues of I - beta k k^T in (-1, 1])
    g       = -exp(A_log) * softplus(a + dt_bias)                  log-decay, per head or per key channel
    o       = gated delta rule(q, k, v, g, beta)                   (amer.ops.delta)
    o       = rmsnorm(o) * act(z) per head; out_proj(o)            act: silu (GDN) or sigmoid (KDA)

Value head ``h`` reads query/key head ``h // (H / Hk)`` (Qwen3-Next's grouped value heads). Training runs
the chunked UT-transform form (:func:`amer.ops.delta.delta_rule_chunked`); decoding keeps the last
``d_conv - 1`` conv inputs and one fp32 (dk, dv) state per value head: O(1) per token.

Checkpoint layouts (``in_proj.weight`` rows are the concatenation ``[q; k; v; z; b; a]``):

- Qwen3-Next ``Qwen3NextGatedDeltaNet``: ``in_proj_qkvz`` is grouped by key head, so view it as
  (Hk, 2 dk + 2 R dv, D), split each group into q, k, v, z and concatenate each part over the groups;
  ``in_proj_ba`` likewise as (Hk, 2 R, D) into b, a. ``conv1d.weight[:, 0]`` -> ``conv_weight``;
  ``A_log``, ``dt_bias``, ``out_proj`` keep their names; ``norm.weight`` -> ``norm_weight``.
  Options: ``norm_eps = rms_norm_eps``.
- OLMo-Hybrid ``OlmoHybridGatedDeltaNet``: ``in_proj = [q_proj; k_proj; v_proj; g_proj; b_proj; a_proj]``,
  ``conv1d.weight[:, 0]``, ``o_norm.weight`` -> ``norm_weight``, ``o_proj`` -> ``out_proj``.
  Options: ``allow_neg_eigval = linear_allow_neg_eigval``, ``norm_eps = 1e-5`` (fixed there).
- Kimi Linear ``KimiLinearDeltaAttention``: ``in_proj = [q_proj; k_proj; v_proj; g_a_proj; b_proj;
  forget_gate.f_a_proj]``, ``g_b_proj`` -> ``out_gate_proj``, ``forget_gate.f_b_proj`` -> ``gate_proj``,
  ``forget_gate.dt_bias`` -> ``dt_bias`` (H dk), ``forget_gate.A_log`` flattened -> ``A_log`` (H),
  ``o_norm.weight``, ``o_proj``. Options: ``gate = "channel"``, ``gate_rank = out_gate_rank = head_dim``,
  ``output_gate = "sigmoid"``, ``norm_eps = rms_norm_eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import Mixer, MixerOutput, time_step_bias_
from amer.blocks.doc_ids import DocIds
from amer.config import Dims
from amer.configio import check, opt
from amer.families import FamilySpec, register_family
from amer.ops.conv import causal_conv1d, conv_state_init
from amer.ops.delta import delta_rule_chunked, delta_rule_step
from amer.ops.fused import rms_norm
from amer.pattern import LayerSpec

__all__ = ["DeltaNetCache", "DeltaNetConfig", "DeltaNetMixer"]

_L2_EPS = 1e-6  # q/k normalisation: x / sqrt(sum x^2 + eps), as fla's l2norm (and transformers' copies)


@dataclass(frozen=True)
class DeltaNetConfig:
    """Gated DeltaNet mixer (the G family), Yang et al. 2025 (arXiv 2412.06464); KDA with gate 'channel'."""

    n_k_heads: int = opt(4, "gated DeltaNet query/key heads", ge=1)
    n_v_heads: int | None = opt(None, "gated DeltaNet value heads, a multiple of n-k-heads (Qwen3-Next: 2x); "
                                "default n-k-heads", ge=1)
    head_k_dim: int | None = opt(None, "gated DeltaNet query/key head width (default d-model / n-k-heads)", ge=1)
    head_v_dim: int | None = opt(None, "gated DeltaNet value head width (default head-k-dim)", ge=1)
    d_conv: int = opt(4, "gated DeltaNet causal depthwise convolution width over q, k, v", ge=1)
    conv_bias: bool = opt(False, "a bias on the gated DeltaNet convolution (none in fla, Qwen3-Next, OLMo, Kimi)")
    chunk_size: int = opt(32, "gated DeltaNet chunk length of the training scan (32: the fastest on CPU at head "
                          "widths 32-128, equal to 64 at 128)", ge=1)
    gate: Literal["head", "channel"] = opt("head", "decay gate: one per head (gated DeltaNet) or one per key "
                                           "channel (Kimi Delta Attention)")
    gate_rank: int | None = opt(None, "channel gate: rank of its projection D -> rank -> heads x head-k-dim "
                                "(default head-k-dim, as Kimi; 0: one full-rank projection)")
    output_gate: Literal["silu", "sigmoid", "none"] = opt("silu", "output gate after the per-head RMSNorm: "
                                                          "silu (gated DeltaNet), sigmoid (Kimi) or none")
    out_gate_rank: int = opt(0, "rank of the output gate projection D -> rank -> value width (Kimi: head-v-dim); "
                             "0: one full-rank projection")
    allow_neg_eigval: bool = opt(False, "beta in (0, 2) instead of (0, 1), so the state transition may have "
                                 "negative eigenvalues (Grazzi et al. 2025; OLMo-Hybrid)")
    norm_eps: float | None = opt(None, "epsilon of the output RMSNorm (default the model's norm-eps)", gt=0)
    bias: bool = opt(False, "biases on the gated DeltaNet input and output projections")
    dt_min: float = opt(0.001, "gated DeltaNet smallest initial time step", gt=0)
    dt_max: float = opt(0.1, "gated DeltaNet largest initial time step", gt=0)
    dt_init_floor: float = opt(1e-4, "gated DeltaNet floor on the initial time step")
    a_init_range: tuple[float, float] = opt((1.0, 16.0), "gated DeltaNet range of the initial decay rates A, "
                                            "as 'lo,hi'")

    def __post_init__(self) -> None:
        object.__setattr__(self, "a_init_range", tuple(self.a_init_range))  # a TOML list becomes the tuple
        check(self.gate in ("head", "channel"), f"deltanet.gate must be 'head' or 'channel', got {self.gate!r}")
        check(self.output_gate in ("silu", "sigmoid", "none"),
              f"deltanet.output_gate must be 'silu', 'sigmoid' or 'none', got {self.output_gate!r}")
        check(self.out_gate_rank == 0 or self.output_gate != "none",
              "deltanet.out_gate_rank needs an output gate (output_gate 'silu' or 'sigmoid')")
        check(self.gate_rank in (None, 0) or self.gate == "channel",
              "deltanet.gate_rank applies to the channel gate only (gate 'channel')")
        check(self.dt_min <= self.dt_max, f"deltanet.dt_min ({self.dt_min}) must be <= dt_max ({self.dt_max})")
        check(len(self.a_init_range) == 2, f"deltanet.a_init_range must be two numbers lo,hi, got {self.a_init_range}")
        lo, hi = self.a_init_range
        check(0 < lo <= hi, f"deltanet.a_init_range must be 0 < lo <= hi, got {self.a_init_range}")

    def validate(self, dims: Dims) -> None:
        """Checks that need the shared dimensions (run when the pattern has G blocks)."""
        check(self.head_k_dim is not None or dims.d_model % self.n_k_heads == 0,
              f"deltanet: d_model ({dims.d_model}) must be divisible by deltanet.n_k_heads ({self.n_k_heads}) "
              "unless deltanet.head_k_dim is set")
        n_v = self.n_v_heads or self.n_k_heads
        check(n_v % self.n_k_heads == 0,
              f"deltanet.n_v_heads ({n_v}) must be a multiple of deltanet.n_k_heads ({self.n_k_heads})")


class DeltaNetCache(NamedTuple):
    """Decoding state of one gated DeltaNet layer."""

    conv_state: Tensor  # (B, d_conv - 1, 2 Hk dk + H dv) the last conv inputs
    state: Tensor  # (B, H, dk, dv) fp32: the delta-rule memory after the tokens seen so far


def _l2norm(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + _L2_EPS)


class DeltaNetMixer(Mixer):
    """Gated DeltaNet (or KDA) token mixer with a short causal conv and a gated per-head RMSNorm.

    Initialisation (:meth:`reset_parameters`) follows fla's ``GatedDeltaNet`` (the paper's code):
    ``A_log = log U[a_init_range]``, ``dt_bias`` the inverse softplus of dt ~ logU[dt_min, dt_max]
    floored at ``dt_init_floor`` (Mamba-2's time-step init, so the decay rates start spread over short
    and long memories), the conv nn.Conv1d's default, norm weights 1, projections N(0, init_std) and the
    residual-writing ``out_proj`` N(0, out_std). ``A_log``, ``dt_bias`` and the norm weight carry
    ``_no_weight_decay`` as in fla and mamba_ssm.
    """

    def __init__(self, cfg: DeltaNetConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.cfg = cfg
        self.Hk = cfg.n_k_heads
        self.H = cfg.n_v_heads or cfg.n_k_heads
        self.dk = cfg.head_k_dim or dims.d_model // cfg.n_k_heads
        self.dv = cfg.head_v_dim or self.dk
        self.key_dim, self.value_dim = self.Hk * self.dk, self.H * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.chunk_size = cfg.chunk_size
        self.channel = cfg.gate == "channel"
        self.norm_eps = cfg.norm_eps if cfg.norm_eps is not None else dims.norm_eps
        gate_rank = (self.dk if cfg.gate_rank is None else cfg.gate_rank) if self.channel else 0
        decay_dim = self.H * self.dk if self.channel else self.H
        z_dim = 0 if cfg.output_gate == "none" else cfg.out_gate_rank or self.value_dim
        self.split = [self.conv_dim, z_dim, self.H, gate_rank or decay_dim]

        self.in_proj = nn.Linear(dims.d_model, sum(self.split), bias=cfg.bias)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim)) if cfg.conv_bias else None
        self.gate_proj = nn.Linear(gate_rank, decay_dim, bias=False) if gate_rank else None
        low_rank_z = z_dim and cfg.out_gate_rank
        self.out_gate_proj = nn.Linear(cfg.out_gate_rank, self.value_dim, bias=False) if low_rank_z else None
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.dt_bias = nn.Parameter(torch.empty(decay_dim))
        self.norm_weight = nn.Parameter(torch.empty(self.dv))
        for p in (self.A_log, self.dt_bias, self.norm_weight):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.value_dim, dims.d_model, bias=cfg.bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.cfg
        for lin in (self.in_proj, self.gate_proj, self.out_gate_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, 0.0, self.dims.init_std)
        bound = 1.0 / math.sqrt(c.d_conv)  # nn.Conv1d's default for a depthwise kernel: fan_in = K
        self.conv_weight.uniform_(-bound, bound)
        if self.conv_bias is not None:
            self.conv_bias.uniform_(-bound, bound)
        lo, hi = c.a_init_range
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(lo, hi)))
        time_step_bias_(self.dt_bias, c.dt_min, c.dt_max, c.dt_init_floor)
        self.norm_weight.fill_(1.0)
        nn.init.normal_(self.out_proj.weight, 0.0, self.dims.out_std)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                lin.bias.zero_()

    def flops(self, seq_len: int) -> dict[str, float]:
        """Projections, plus the chunked delta rule as executed (chunk ``L``, ``c`` chunks, per chunk):
        ``intra``: the (L, L) products ``K K^T`` and ``Q K^T`` (per key head for the head gate, per value
        head for the channel gate), the inverse ``(I + A)^-1`` (a triangular solve against the L columns of
        the identity, L^3 / 2), its products with ``V_beta`` and ``K_beta Gamma`` (L^2 (dk + dv)) and the
        masked attention (L, L) @ (L, dv) per value head; ``state``: ``W S``, ``K^T delta`` and ``Q S`` (three
        (L, dk) x (dk, dv) products per value head)."""
        H, dk, dv = self.H, self.dk, self.dv
        L = min(self.chunk_size, seq_len)
        c = math.ceil(seq_len / L)
        qk_heads = H if self.channel else self.Hk
        intra = c * (qk_heads * 2 * L * L * dk + H * (L ** 3 / 2 + L * L * (dk + dv) + L * L * dv))
        state = c * H * 3 * L * dk * dv
        return {"proj": self.linear_flops(seq_len), "intra": float(intra), "state": float(state)}

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> DeltaNetCache:
        """Zero conv window and zero fp32 state; ``max_len`` is irrelevant (constant-size state)."""
        device = device if device is not None else self.in_proj.weight.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        return DeltaNetCache(conv_state_init(batch_size, self.conv_dim, self.cfg.d_conv, device=device, dtype=dtype),
                             torch.zeros(batch_size, self.H, self.dk, self.dv, device=device, dtype=torch.float32))

    def _decay(self, a: Tensor, acc: torch.dtype) -> Tensor:
        """Log-decays g <= 0: (B, T, H) for the head gate, (B, T, H, dk) for the channel gate."""
        if self.gate_proj is not None:
            a = self.gate_proj(a)
        A = torch.exp(self.A_log.to(acc))
        if not self.channel:
            return -A * F.softplus(a.to(acc) + self.dt_bias.to(acc))
        a = a.to(acc).unflatten(-1, (self.H, self.dk)) + self.dt_bias.to(acc).view(self.H, self.dk)
        return -A.unsqueeze(-1) * F.softplus(a)

    def forward(self, x: Tensor, cache: DeltaNetCache | None = None,
                doc_ids: DocIds | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y (B, T, D), new cache or None). With packed documents (``doc_ids``), the conv
        window and the state restart at every document's first token."""
        T = x.shape[1]
        qkv, z, b, a = self.in_proj(x).split(self.split, dim=-1)
        qkv, conv_state = causal_conv1d(qkv, self.conv_weight, self.conv_bias,
                                        None if cache is None else cache.conv_state,
                                        position=None if doc_ids is None else doc_ids.position)
        q, k, v = F.silu(qkv).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        acc = torch.promote_types(x.dtype, torch.float32)
        q = _l2norm(q.to(acc).unflatten(-1, (self.Hk, self.dk))) * self.dk ** -0.5
        k = _l2norm(k.to(acc).unflatten(-1, (self.Hk, self.dk)))
        v = v.unflatten(-1, (self.H, self.dv))
        beta = torch.sigmoid(b.to(acc))
        if self.cfg.allow_neg_eigval:
            beta = beta * 2.0
        g = self._decay(a, acc)

        if cache is not None and T == 1:
            o, state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.state)
            o = o.unsqueeze(1)  # (B, 1, H, dv)
        else:
            o, state = delta_rule_chunked(q, k, v, g, beta, self.chunk_size, None if cache is None else cache.state,
                                          None if doc_ids is None else doc_ids.index)
        o = rms_norm(o, self.norm_weight, self.norm_eps)  # (B, T, H, dv), per head
        if self.cfg.output_gate != "none":
            z = (z if self.out_gate_proj is None else self.out_gate_proj(z)).unflatten(-1, (self.H, self.dv))
            o = o * (F.silu(z) if self.cfg.output_gate == "silu" else torch.sigmoid(z))
        y = self.out_proj(o.flatten(-2))
        return MixerOutput(y, None if cache is None else DeltaNetCache(conv_state, state))


register_family(FamilySpec(letter="G", name="deltanet", colour="#17becf", config_key="deltanet",
                           config=DeltaNetConfig, mixer=DeltaNetMixer,
                           summary="gated DeltaNet (KDA with a channel gate), short conv; O(1) decoding state"))
