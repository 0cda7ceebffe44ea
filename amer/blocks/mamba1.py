"""Mamba-1 selective state space mixer (the S family), Gu & Dao 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces" (arXiv 2312.00752, figure 3 and algorithm 2).

Structure follows mamba_ssm's ``Mamba`` block, which Jamba and Falcon-Mamba reuse::

    x, z   = in_proj(u)                           D -> 2 d_inner, split in two halves
    x      = silu(causal_depthwise_conv(x))
    r, B, C = x_proj(x)                           d_inner -> dt_rank + 2 N, no bias
    (r, B, C = rmsnorm(r), rmsnorm(B), rmsnorm(C)     optional: Jamba with weights, Falcon-Mamba without)
    dt     = softplus(dt_proj(r))                 low-rank time step: dt_rank -> d_inner, with bias
    y      = selective_scan(x, dt, A = -exp(A_log), B, C) + D x     state (d_inner, N) per sequence
    out    = out_proj(y * silu(z))

With ``n_heads`` > 1 (Zamba's multi-head Mamba, arXiv 2405.16712) the inner channels split into heads, each with its
own x_proj, dt_proj, A and D, so B, C and dt are per head; ``n_heads = 1`` is the block above.

Training runs the blocked chunked scan of :mod:`amer.ops.selective_scan` (no loop over time steps); a
decoding step keeps the last ``d_conv - 1`` conv inputs and one (d_inner, N) fp32 state, O(1) in the
context length; a prefill with a cache continues the scan from the cached state.

Loading transformers checkpoints (``MambaMixer``, ``FalconMambaMixer``, ``JambaMambaMixer``): every
name maps to itself except the convolution and the norms::

    in_proj.{weight,bias}, x_proj.weight, dt_proj.{weight,bias}, A_log, D, out_proj.{weight,bias}  same name
    conv1d.weight (d_inner, 1, K)   -> conv_weight (d_inner, K)     (squeeze the middle axis)
    conv1d.bias                     -> conv_bias                    (use_conv_bias / mamba_conv_bias)
    Jamba: {dt,b,c}_layernorm.weight -> {dt,b,c}_norm.weight        dt_bc_norm = "weighted", eps = rms_norm_eps
    Falcon-Mamba: no weights (its layernorm buffers are unused)     dt_bc_norm = "weightless", eps = mixer_rms_eps

A ``MambaForCausalLM`` layer is ``x + mixer(norm(x))``, one S block (``backbone.layers.i.norm.weight`` ->
``blocks.i.norm.weight``); a Jamba Mamba layer is an S block followed by its MLP or MoE, ``SE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import Mixer, MixerOutput, RMSNorm, time_step_bias_
from amer.blocks.doc_ids import DocIds
from amer.config import Dims
from amer.configio import check, opt
from amer.families import FamilySpec, register_family
from amer.ops.conv import causal_conv1d, conv_state_init
from amer.ops.selective_scan import selective_scan, selective_scan_step
from amer.pattern import LayerSpec

__all__ = ["Mamba1Config", "Mamba1Cache", "Mamba1Mixer"]


@dataclass(frozen=True)
class Mamba1Config:
    """Mamba-1 selective SSM mixer (the S family), Gu & Dao 2023 (arXiv 2312.00752)."""

    d_state: int = opt(16, "Mamba-1 SSM state size per inner channel", ge=1)
    d_conv: int = opt(4, "Mamba-1 depthwise causal convolution width", ge=1)
    expand: int = opt(2, "Mamba-1 inner width as a multiple of d-model", ge=1)
    dt_rank: int | None = opt(None, "Mamba-1 rank of the time-step projection (default 'auto': ceil(d-model / 16))",
                              ge=1)
    chunk_size: int = opt(128, "Mamba-1 time block of the training scan (its slices stay in cache; 64-128 measured "
                          "fastest on CPU)", ge=1)
    dt_min: float = opt(0.001, "Mamba-1 smallest initial time step", gt=0)
    dt_max: float = opt(0.1, "Mamba-1 largest initial time step", gt=0)
    dt_init_floor: float = opt(1e-4, "Mamba-1 floor on the initial time step")
    dt_scale: float = opt(1.0, "Mamba-1 scale of the time-step projection's initial weights", gt=0)
    dt_init: Literal["random", "constant"] = opt("random", "Mamba-1 time-step projection init: random (uniform "
                                                 "+-dt_scale / sqrt(dt_rank)) or constant (dt_scale / sqrt(dt_rank))")
    conv_bias: bool = opt(True, "Mamba-1 bias on the causal convolution (transformers' use_conv_bias)")
    bias: bool = opt(False, "Mamba-1 biases on the input and output projections (transformers' use_bias)")
    dt_bc_norm: Literal["none", "weighted", "weightless"] = opt(
        "none", "Mamba-1 RMSNorms on the time-step rank and on B and C: none, weighted (Jamba) or weightless "
        "(Falcon-Mamba)")
    dt_bc_norm_eps: float = opt(1e-6, "Mamba-1 epsilon of the dt/B/C RMSNorms", gt=0)
    n_heads: int = opt(1, "Mamba-1 heads: each d-inner / n-heads channels wide with its own x_proj, dt_proj, A, D "
                       "and B, C (Zamba's multi-head Mamba)", ge=1)

    def __post_init__(self) -> None:
        check(self.dt_min <= self.dt_max, f"mamba1.dt_min ({self.dt_min}) must be <= mamba1.dt_max ({self.dt_max})")
        check(self.dt_init in ("random", "constant"),
              f"mamba1.dt_init must be 'random' or 'constant', got {self.dt_init!r}")
        check(self.dt_bc_norm in ("none", "weighted", "weightless"),
              f"mamba1.dt_bc_norm must be 'none', 'weighted' or 'weightless', got {self.dt_bc_norm!r}")

    def validate(self, dims: Dims) -> None:
        check((self.expand * dims.d_model) % self.n_heads == 0, f"mamba1.n_heads ({self.n_heads}) must divide "
              f"the inner width expand * d_model ({self.expand * dims.d_model})")

    def rank(self, d_model: int) -> int:
        """The time-step rank: ``dt_rank``, or ceil(d_model / 16) as mamba_ssm's "auto"."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(d_model / 16)


class Mamba1Cache(NamedTuple):
    """Decoding state of one Mamba-1 layer."""

    conv_state: Tensor  # (B, d_conv - 1, d_inner) the last conv inputs
    ssm_state: Tensor  # (B, d_inner, d_state) fp32: the SSM state after the tokens seen so far


class Mamba1Mixer(Mixer):
    """Mamba-1 selective SSM token mixer (module docstring).

    Initialisation (:meth:`reset_parameters`) follows mamba_ssm's ``Mamba``: A is S4D-real,
    ``A_log[d, n] = log(n + 1)`` (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal
    State Space Models"); ``dt_proj.bias`` is the inverse softplus of dt ~ logU[dt_min, dt_max] (floored at
    dt_init_floor), so the initial time steps span short and long memories; ``dt_proj.weight`` is
    uniform (or constant) at dt_scale / sqrt(dt_rank); ``D = 1``; the depthwise conv takes nn.Conv1d's
    default, as in mamba_ssm. ``in_proj`` and ``x_proj`` draw N(0, init_std) and ``out_proj`` the
    residual-scaled std, as every amer block. ``A_log``, ``D``, ``dt_proj.bias`` and the norm weights carry
    ``_no_weight_decay = True`` (mamba_ssm's marks).
    """

    def __init__(self, cfg: Mamba1Config, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.cfg = cfg
        self.d_inner = cfg.expand * dims.d_model
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.dt_rank = cfg.rank(dims.d_model)
        E, N, R = self.d_inner, cfg.d_state, self.dt_rank

        self.in_proj = nn.Linear(dims.d_model, 2 * E, bias=cfg.bias)
        self.conv_weight = nn.Parameter(torch.empty(E, cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(E)) if cfg.conv_bias else None
        self.n_heads = H = cfg.n_heads
        self.head_dim = E // H
        # one head: x_proj is (R + 2N, E); H heads stack their (R + 2N, E / H) maps along the rows, and dt_proj's
        # (E, R) rows are already the heads' (E / H, R) maps one after the other, so the names and (with one head)
        # the shapes are Mamba-1's
        self.x_proj = nn.Linear(E // H, H * (R + 2 * N), bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, dims.d_model, bias=cfg.bias)
        weighted = cfg.dt_bc_norm == "weighted"
        self.dt_norm = RMSNorm(R, cfg.dt_bc_norm_eps) if weighted else None
        self.b_norm = RMSNorm(N, cfg.dt_bc_norm_eps) if weighted else None
        self.c_norm = RMSNorm(N, cfg.dt_bc_norm_eps) if weighted else None
        for p in (self.A_log, self.D, self.dt_proj.bias, *(n.weight for n in self._norms() if n is not None)):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_parameters()

    def _norms(self) -> tuple[RMSNorm | None, RMSNorm | None, RMSNorm | None]:
        return self.dt_norm, self.b_norm, self.c_norm

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c, E, N, R = self.cfg, self.d_inner, self.d_state, self.dt_rank
        nn.init.normal_(self.in_proj.weight, 0.0, self.dims.init_std)
        nn.init.normal_(self.x_proj.weight, 0.0, self.dims.init_std)
        bound = 1.0 / math.sqrt(c.d_conv)  # nn.Conv1d's default for a depthwise kernel: fan_in = K
        self.conv_weight.uniform_(-bound, bound)
        if self.conv_bias is not None:
            self.conv_bias.uniform_(-bound, bound)
        std = c.dt_scale / math.sqrt(R)
        if c.dt_init == "constant":
            self.dt_proj.weight.fill_(std)
        else:
            self.dt_proj.weight.uniform_(-std, std)
        time_step_bias_(self.dt_proj.bias, c.dt_min, c.dt_max, c.dt_init_floor)
        n = torch.arange(1, N + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(n).expand(E, N))
        self.D.fill_(1.0)
        nn.init.normal_(self.out_proj.weight, 0.0, self.dims.out_std)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                lin.bias.zero_()
        for norm in self._norms():
            if norm is not None:
                norm.reset_parameters()

    def flops(self, seq_len: int) -> dict[str, float]:
        """Projections (in, x, dt, out), plus the scan: per token and state entry the decayed-state update,
        the input outer product dt u B and the read-out with C (3 multiply-adds per d_inner x d_state)."""
        return {"proj": self.linear_flops(seq_len), "scan": float(3 * seq_len * self.d_inner * self.d_state)}

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> Mamba1Cache:
        """Zero conv window and zero fp32 SSM state; ``max_len`` is irrelevant (constant-size state)."""
        device = device if device is not None else self.in_proj.weight.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        return Mamba1Cache(conv_state_init(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
                           torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32))

    def _norm(self, v: Tensor, norm: RMSNorm | None) -> Tensor:
        if self.cfg.dt_bc_norm == "none":
            return v
        if norm is not None:
            return norm(v)
        acc = torch.promote_types(v.dtype, torch.float32)  # Falcon-Mamba's weightless norm, in fp32 at least
        return F.rms_norm(v.to(acc), (v.shape[-1],), eps=self.cfg.dt_bc_norm_eps).to(v.dtype)

    def _time_step(self, xs: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The selective parameters of xs (B, T, d_inner): per head B and C (B, T, n_heads, N), and
        dt = softplus(dt_proj(r)) (B, T, d_inner) in ``acc``."""
        H, R, N = self.n_heads, self.dt_rank, self.d_state
        Bt, T = xs.shape[:2]
        if H == 1:
            p = self.x_proj(xs).unsqueeze(2)
        else:
            p = torch.einsum("bthi,hoi->btho", xs.view(Bt, T, H, -1), self.x_proj.weight.view(H, R + 2 * N, -1))
        r, Bm, Cm = p.split([R, N, N], dim=-1)
        r, Bm, Cm = (self._norm(v, n) for v, n in zip((r, Bm, Cm), self._norms(), strict=True))
        if H == 1:
            dt = F.linear(r[:, :, 0], self.dt_proj.weight)
        else:
            dt = torch.einsum("bthr,hdr->bthd", r, self.dt_proj.weight.view(H, -1, R)).reshape(Bt, T, -1)
        return Bm, Cm, F.softplus(dt.to(acc) + self.dt_proj.bias.to(acc))

    def forward(self, x: Tensor, cache: Mamba1Cache | None = None, doc_ids: DocIds | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y (B, T, D), new cache or None). With packed documents (``doc_ids``), the conv
        window and the SSM state restart at every document's first token."""
        T = x.shape[1]
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, d_inner) each
        xs, conv_state = causal_conv1d(xs, self.conv_weight, self.conv_bias,
                                       None if cache is None else cache.conv_state,
                                       position=None if doc_ids is None else doc_ids.position)
        xs = F.silu(xs)
        acc = torch.promote_types(x.dtype, torch.float32)  # time steps and decays in fp32 at least
        Bm, Cm, dt = self._time_step(xs, acc)  # Bm, Cm (B, T, n_heads, N); dt (B, T, d_inner)
        A = -torch.exp(self.A_log.to(acc))  # (d_inner, N) < 0: every state entry decays
        keep = None if doc_ids is None else (~doc_ids.starts).to(acc)  # a document start forgets the state
        ys, states = [], []
        # heads differ in A as well as in B and C, so they cannot share one scan; there are few of them (Zamba: 2)
        for h in range(self.n_heads):
            c = slice(h * self.head_dim, (h + 1) * self.head_dim)
            h0 = None if cache is None else cache.ssm_state[:, c]
            if cache is not None and T == 1:
                y, s = selective_scan_step(xs[:, 0, c], dt[:, 0, c], A[c], Bm[:, 0, h], Cm[:, 0, h], h0)
                y = y.unsqueeze(1)
            else:
                y, s = selective_scan(xs[..., c], dt[..., c], A[c], Bm[:, :, h], Cm[:, :, h], h0, keep,
                                      self.cfg.chunk_size)
            ys.append(y)
            states.append(s)
        y, ssm_state = (ys[0], states[0]) if self.n_heads == 1 else (torch.cat(ys, -1), torch.cat(states, 1))
        y = torch.addcmul(y, xs, self.D.to(y.dtype)) * F.silu(z)  # skip connection D x, then the gate
        out = self.out_proj(y.to(x.dtype))
        return MixerOutput(out, None if cache is None else Mamba1Cache(conv_state, ssm_state), {}, {})


register_family(FamilySpec(letter="S", name="mamba1", colour="#17becf", config_key="mamba1",
                           config=Mamba1Config, mixer=Mamba1Mixer,
                           summary="Mamba-1 selective scan with a causal depthwise conv; O(1) decoding state"))
