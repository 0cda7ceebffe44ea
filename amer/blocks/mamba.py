"""Mamba-2 mixer (the M family), Dao & Gu 2024, "Transformers are SSMs" (arXiv 2405.21060).

Structure follows the paper's Mamba-2 block (figure 6) and mamba_ssm's ``Mamba2``:

    in_proj: D -> [z (d_inner) | xBC (d_inner + 2 G N) | dt (H)]     one fused Linear (parallel projections)
    xBC = silu(causal_depthwise_conv(xBC))                          x, B, C all see the short conv
    y   = SSD(x, dt = softplus(dt + dt_bias), A = -exp(A_log), B, C) + D * x
    y   = rmsnorm(y * silu(z))                                      gate before the norm (extra norm, sec. 7.4)
          (mamba.norm: "before_gate" is rmsnorm(y) * silu(z), "none" y * silu(z): Falcon-H1's two forms)
    out = out_proj(y)                                               d_inner -> D

Training uses the chunked matmul scan (:func:`amer.ops.ssd.ssd_chunked`); decoding keeps the last
``d_conv - 1`` conv inputs and one (H, P, N) fp32 state per sequence, O(1) in the context length.
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
from amer.ops import kernels
from amer.ops.conv import causal_conv1d, conv_state_init
from amer.ops.fused import rms_norm
from amer.ops.ssd import ssd_chunked, ssd_step
from amer.ops.ssd_kernels import gated_rmsnorm_kernel
from amer.pattern import LayerSpec

__all__ = ["MambaConfig", "MambaCache", "MambaMixer"]


@dataclass(frozen=True)
class MambaConfig:
    """Mamba-2 / SSD mixer (the M family), Dao & Gu 2024 (arXiv 2405.21060)."""

    d_state: int = opt(64, "Mamba-2 SSM state size per head")
    d_conv: int = opt(4, "Mamba-2 depthwise causal convolution width")
    expand: int = opt(2, "Mamba-2 inner width as a multiple of d-model")
    head_dim: int = opt(32, "Mamba-2 head width (divides expand * d-model)")
    n_groups: int = opt(1, "Mamba-2 B/C groups (divides the number of heads)")
    chunk_size: int = opt(64, "Mamba-2 SSD chunk length for the training scan")
    dt_min: float = opt(0.001, "Mamba-2 smallest initial time step")
    dt_max: float = opt(0.1, "Mamba-2 largest initial time step")
    dt_init_floor: float = opt(1e-4, "Mamba-2 floor on the initial time step")
    a_init_range: tuple[float, float] = opt((1.0, 16.0), "Mamba-2 range of the initial decay rates A, as 'lo,hi'")
    bias: bool = opt(False, "Mamba-2 biases on the input and output projections (transformers' use_bias)")
    d_inner: int | None = opt(None, "Mamba-2 inner width when it is not a multiple of d-model (Falcon-H1's "
                              "mamba_d_ssm); unset: expand * d-model", ge=1)
    norm: Literal["gated", "before_gate", "none"] = opt(
        "gated", "Mamba-2 output norm: gated is rmsnorm(y * silu(z)) (Mamba-2), before_gate rmsnorm(y) * silu(z), "
                 "none y * silu(z) without a norm weight (Falcon-H1's mamba_rms_norm false)")
    dt_clamp_min: float = opt(0.0, "Mamba-2 lower bound of the time step softplus(dt + dt_bias) in every forward "
                              "(Zamba2's time_step_min; 0: unbounded)", ge=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "a_init_range", tuple(self.a_init_range))  # a TOML list becomes the tuple
        for name in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            check(getattr(self, name) >= 1, f"mamba.{name} must be >= 1, got {getattr(self, name)}")
        check(0 < self.dt_min <= self.dt_max, "mamba.dt_min must be in (0, dt_max]")
        check(len(self.a_init_range) == 2, f"mamba.a_init_range must be two numbers lo,hi, got {self.a_init_range}")
        lo, hi = self.a_init_range
        check(0 < lo <= hi, f"mamba.a_init_range must be 0 < lo <= hi, got {self.a_init_range}")
        check(self.norm in ("gated", "before_gate", "none"),
              f"mamba.norm must be 'gated', 'before_gate' or 'none', got {self.norm!r}")

    def inner(self, d_model: int) -> int:
        """The inner width: ``d_inner`` when set, else ``expand * d_model``."""
        return self.d_inner if self.d_inner is not None else self.expand * d_model

    def validate(self, dims: Dims) -> None:
        """Checks that need the shared dimensions (run when the pattern has M blocks)."""
        d_inner = self.inner(dims.d_model)
        check(d_inner % self.head_dim == 0,
              f"mamba inner width ({d_inner}: d_inner, or expand * d_model) must be divisible by mamba.head_dim "
              f"({self.head_dim})")
        check((d_inner // self.head_dim) % self.n_groups == 0,
              f"mamba heads ({d_inner // self.head_dim}) must be divisible by mamba.n_groups ({self.n_groups})")


class MambaCache(NamedTuple):
    """Decoding state of one Mamba-2 layer."""

    conv_state: Tensor  # (B, d_conv - 1, conv_dim) the last conv inputs (xBC before the conv)
    ssm_state: Tensor  # (B, H, P, N) fp32: the SSM state after the tokens seen so far


class MambaMixer(Mixer):
    """Mamba-2 (SSD) token mixer with a depthwise causal conv and a gated RMSNorm.

    Initialisation (:meth:`reset_parameters`) follows mamba_ssm's ``Mamba2``: ``dt_bias`` is the
    inverse softplus of dt ~ logU[dt_min, dt_max] (floored) so softplus(dt_bias) starts in the range
    that Mamba found to train well; ``A_log = log U[a_init_range]`` gives per-head decay rates spanning
    short and long memories; ``D = 1`` (skip connection); the depthwise conv takes nn.Conv1d's default.
    ``A_log``, ``dt_bias``, ``D`` and the norm weight carry ``_no_weight_decay = True`` as in mamba_ssm.
    """

    def __init__(self, cfg: MambaConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.cfg = cfg
        self.d_model = dims.d_model
        self.d_inner = cfg.inner(dims.d_model)
        self.head_dim = cfg.head_dim
        self.n_heads = self.d_inner // cfg.head_dim
        self.n_groups = cfg.n_groups
        self.d_state = cfg.d_state
        self.d_conv = cfg.d_conv
        self.chunk_size = cfg.chunk_size
        self.norm_eps = dims.norm_eps
        self.conv_dim = self.d_inner + 2 * cfg.n_groups * cfg.d_state
        H = self.n_heads

        self.in_proj = nn.Linear(dims.d_model, self.d_inner + self.conv_dim + H, bias=cfg.bias)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm_weight = nn.Parameter(torch.empty(self.d_inner)) if cfg.norm != "none" else None
        for p in (self.dt_bias, self.A_log, self.D, self.norm_weight):
            if p is not None:
                p._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.d_inner, dims.d_model, bias=cfg.bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        m = self.cfg
        nn.init.normal_(self.in_proj.weight, 0.0, self.dims.init_std)
        bound = 1.0 / math.sqrt(m.d_conv)  # nn.Conv1d's default for a depthwise kernel: fan_in = K
        self.conv_weight.uniform_(-bound, bound)
        self.conv_bias.uniform_(-bound, bound)
        time_step_bias_(self.dt_bias, m.dt_min, m.dt_max, m.dt_init_floor)
        lo, hi = m.a_init_range
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(lo, hi)))
        self.D.fill_(1.0)
        if self.norm_weight is not None:
            self.norm_weight.fill_(1.0)
        nn.init.normal_(self.out_proj.weight, 0.0, self.dims.out_std)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                lin.bias.zero_()

    def flops(self, seq_len: int) -> dict[str, float]:
        """Projections, plus the chunked SSD as executed (chunk ``L``, ``c`` chunks, head dim ``P``, state
        ``N``): per chunk ``C B^T`` (L x L x N per group), the masked (L x L) @ (L x P) per head, the
        chunk-state (P x L) @ (L x N) and state-output (L x N) @ (N x P) per head, plus the inter-chunk
        (c+1) x c state recurrence."""
        H, P, N, G = self.n_heads, self.head_dim, self.d_state, self.n_groups
        L = min(self.chunk_size, seq_len)
        c = math.ceil(seq_len / L)
        Tp = c * L
        ssd = Tp * (G * L * N + H * L * P + 2 * H * P * N) + H * c * c * P * N
        return {"proj": self.linear_flops(seq_len), "ssd": float(ssd)}

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> MambaCache:
        """Zero conv window and zero fp32 SSM state; ``max_len`` is irrelevant (constant-size state)."""
        device = device if device is not None else self.in_proj.weight.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        conv_state = conv_state_init(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state,
                                device=device, dtype=torch.float32)
        return MambaCache(conv_state, ssm_state)

    def _gated_norm(self, y: Tensor, z: Tensor) -> Tensor:
        """rmsnorm(y * silu(z)) in fp32, normalised per B/C group as mamba_ssm's RMSNormGated does (its Triton
        kernel where :mod:`amer.ops.kernels` picks it). ``mamba.norm`` "none" gates without a norm (in fp32, as
        Falcon-H1 does), "before_gate" norms ``y`` and then gates."""
        if self.norm_weight is None:
            return (y.float() * F.silu(z.float())).to(y.dtype)
        if self.cfg.norm == "before_gate":
            G = self.n_groups
            normed = rms_norm(y.unflatten(-1, (G, -1)), self.norm_weight.view(G, -1), self.norm_eps).flatten(-2)
            return (normed.float() * F.silu(z.float())).to(y.dtype)
        fn = kernels.gated_rmsnorm(y.device, y.dtype)
        if fn is not None:
            return gated_rmsnorm_kernel(fn, y, z, self.norm_weight, self.norm_eps, self.n_groups)
        if self.n_groups == 1:
            return rms_norm(y, self.norm_weight, self.norm_eps, gate=z)
        G = self.n_groups
        out = rms_norm(y.unflatten(-1, (G, -1)), self.norm_weight.view(G, -1), self.norm_eps,
                       gate=z.unflatten(-1, (G, -1)))  # (..., G, d_inner / G)
        return out.flatten(-2)

    def forward(self, x: Tensor, cache: MambaCache | None = None, doc_ids: DocIds | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y (B, T, D), new cache or None). With packed documents (``doc_ids``), the conv
        window and the SSD state restart at every document's first token."""
        T = x.shape[1]
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)

        xBC, conv_state = causal_conv1d(xBC, self.conv_weight, self.conv_bias,
                                        None if cache is None else cache.conv_state,
                                        position=None if doc_ids is None else doc_ids.position,
                                        seq_idx=None if doc_ids is None else doc_ids.index)
        xBC = F.silu(xBC)  # (B, T, conv_dim)
        xs, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.unflatten(-1, (H, P))  # (B, T, H, P)
        Bm = Bm.unflatten(-1, (G, N))  # (B, T, G, N)
        Cm = Cm.unflatten(-1, (G, N))
        acc = torch.promote_types(x.dtype, torch.float32)  # decays in fp32 at least
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # (B, T, H)
        if self.cfg.dt_clamp_min > 0:  # a floor on how fast the state may be overwritten, kept in inference too
            dt = dt.clamp(min=self.cfg.dt_clamp_min)
        A = -torch.exp(self.A_log.to(acc))  # (H,) < 0: a stable, decaying state

        if cache is not None and T == 1:
            y, ssm_state = ssd_step(xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], cache.ssm_state)
            y = y.unsqueeze(1)  # (B, 1, H, P)
        else:
            init = None if cache is None else cache.ssm_state
            y, ssm_state = ssd_chunked(xs, dt, A, Bm, Cm, self.chunk_size, init,
                                       None if doc_ids is None else doc_ids.index)

        y = torch.addcmul(y, xs, self.D.to(y.dtype).unsqueeze(-1))  # skip connection D x per head
        y = self._gated_norm(y.flatten(-2), z)  # (B, T, d_inner)
        out = self.out_proj(y)
        new_cache = None if cache is None else MambaCache(conv_state, ssm_state)
        return MixerOutput(out, new_cache, {}, {})


register_family(FamilySpec(letter="M", name="mamba", colour="#2ca02c", config_key="mamba",
                           config=MambaConfig, mixer=MambaMixer,
                           summary="Mamba-2 (SSD) with a causal depthwise conv; O(1) decoding state"))
