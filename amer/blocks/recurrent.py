"""The R family: Griffin's recurrent block with the RG-LRU (De et al. 2024, arXiv 2402.19427).

Two branches from the (already normalised) input x (B, T, D), fused into one D -> 2W projection::

    gate = GeLU(W_g x)                                      # (B, T, W)
    u    = RG-LRU(causal_depthwise_conv(W_u x))             # (B, T, W)
    y    = out_proj(gate * u)                               # (B, T, D)

The Real-Gated Linear Recurrent Unit (paper section 2.4) is a diagonal linear recurrence whose
decay depends on the input only through a sigmoid gate, so it stays a *linear* scan in h::

    r_t = sigmoid(W_a u_t + b_a)            recurrence gate
    i_t = sigmoid(W_x u_t + b_x)            input gate
    log a_t = -c * softplus(-Lambda) * r_t  (a_t = sigmoid(Lambda)^(c r_t), c = 8)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)

The gate projections are block-diagonal with ``n_heads`` blocks (recurrentgemma's
``BlockDiagonalLinear``), computed for both gates by one einsum. The decay, the normaliser and
the state are kept in fp32 whatever the activation dtype: a decay of 0.999 is not representable
in bf16 (its neighbours are 0.996 and 1.0), and the state integrates over thousands of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amer.blocks.common import Mixer, MixerOutput
from amer.blocks.doc_ids import DocIds
from amer.config import Dims
from amer.configio import check, opt
from amer.families import FamilySpec, register_family
from amer.ops.conv import causal_conv1d, conv_state_init
from amer.ops.scan import linear_scan_backward, linear_scan_forward
from amer.pattern import LayerSpec

__all__ = ["RecurrentConfig", "RecurrentCache", "RecurrentMixer", "rglru_coeffs"]


@dataclass(frozen=True)
class RecurrentConfig:
    """Griffin RG-LRU recurrent block (the R family), De et al. 2024 (arXiv 2402.19427)."""

    lru_width: int | None = opt(None, "RG-LRU recurrence width (default d-model)")
    n_heads: int = opt(4, "RG-LRU block-diagonal gate heads (as in recurrentgemma)")
    d_conv: int = opt(4, "RG-LRU causal convolution width")
    c: float = opt(8.0, "RG-LRU decay sharpness c in a = sigmoid(Lambda)^(c * r)")
    bias: bool = opt(False, "biases on the RG-LRU block's input and output projections (recurrentgemma)")
    normalise_first: bool = opt(True, "scale a sequence's (a document's) first input by sqrt(1 - a^2) like every "
                                "other; false: it enters unscaled, as in recurrentgemma")

    def __post_init__(self) -> None:
        check(self.lru_width is None or self.lru_width >= 1, "recurrent.lru_width must be >= 1")
        check(self.n_heads >= 1, f"recurrent.n_heads must be >= 1, got {self.n_heads}")
        check(self.d_conv >= 1, f"recurrent.d_conv must be >= 1, got {self.d_conv}")
        check(self.c > 0, f"recurrent.c must be > 0, got {self.c}")

    def validate(self, dims: Dims) -> None:
        """Checks that need the shared dimensions (run when the pattern has R blocks)."""
        width = self.lru_width or dims.d_model
        check(width % self.n_heads == 0,
              f"recurrent.lru_width ({width}) must be divisible by recurrent.n_heads ({self.n_heads})")

# d sqrt(z)/dz = 1/(2 sqrt z) is unbounded as a -> 1 (r -> 0), which overflows in low precision. As in
# recurrentgemma, the derivative of the normaliser sqrt(1 - a^2) is bounded at this value while its value stays
# exact, so checkpoints computed with the reference give the same outputs here.
_MAX_SQRT_GRADIENT = 1000.0


class _BoundedSqrt(torch.autograd.Function):
    """``sqrt(z)`` with the derivative ``1 / sqrt(max(4 z, 1 / 1000^2))`` (at most 1000)."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        return z.sqrt()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return grad / (4.0 * z).clamp(min=_MAX_SQRT_GRADIENT ** -2).sqrt()


def rglru_coeffs(gates: Tensor, u: Tensor, Lambda: Tensor, c: float,
                 plain: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """RG-LRU coefficients from the gate logits: ``(a, b, sig)``, all in fp32 (fp64 for fp64).

    gates: (B, T, H, 2 bw) logits ``[W_a u + b_a | W_x u + b_x]`` per block; u: (B, T, W);
    Lambda: (W,); ``plain`` (B, T) bool marks inputs that enter without the normaliser. Returns the decay
    ``a`` (B, T, W), the normalised input
    ``b = sqrt(1 - a^2) * i * u`` (B, T, W), and ``sig = sigmoid(gates)`` (B, T, H, 2 bw) whose
    halves are the recurrence gate r and the input gate i. Plain differentiable torch ops: the
    decoding step uses it, and it is the reference :class:`_RGLRUScan` is tested against.
    """
    B, T, W = u.shape
    bw = gates.shape[-1] // 2
    acc = torch.promote_types(u.dtype, torch.float32)  # fp32 for bf16/fp16/fp32, fp64 stays
    sig = torch.sigmoid(gates.to(acc))  # (B, T, H, 2bw)
    r, i = sig[..., :bw].reshape(B, T, W), sig[..., bw:].reshape(B, T, W)
    # log sigmoid(Lambda) = -softplus(-Lambda): finite for any Lambda, no log of a rounded 1
    log_a = (-c * F.softplus(-Lambda.to(acc))) * r  # (B, T, W), <= 0
    a = torch.exp(log_a)
    # sqrt(1 - a^2) through expm1(2 log a): no cancellation when a is close to 1
    norm = _BoundedSqrt.apply(-torch.expm1(2.0 * log_a))
    if plain is not None:
        norm = norm.masked_fill(plain.unsqueeze(-1), 1.0)
    return a, norm * i * u.to(acc), sig


class _RGLRUScan(torch.autograd.Function):
    """Gate logits -> RG-LRU states h (B, T, W) in one autograd node.

    Autograd through :func:`rglru_coeffs` + the scan keeps about ten (B, T, W) fp32
    intermediates per layer and runs about thirty elementwise passes backward. This node keeps
    the gate sigmoids, a, sqrt(1 - a^2) and its derivative, u and h, and writes the chain rule
    out by hand. All elementwise work is done in the (B, T, H, bw) block layout so the r / i
    halves of the gate tensor are used as strided views, never copied.
    """

    @staticmethod
    def forward(ctx, gates: Tensor, u: Tensor, Lambda: Tensor, h0: Tensor | None,  # type: ignore[override]
                c: float, starts: Tensor | None, *plain_starts: bool) -> Tensor:
        """``plain_starts`` (optional flag): the inputs at ``starts`` enter without the sqrt(1 - a^2) normaliser
        (a flag, not a second mask: compiled graphs refuse one tensor passed as two inputs)."""
        B, T, H, bw2 = gates.shape
        bw = bw2 // 2
        acc = torch.promote_types(u.dtype, torch.float32)
        # (B, T, H, 2bw) = [r | i], written contiguous whatever layout the einsum left gates in
        sig = torch.sigmoid(gates.to(acc), out=torch.empty(gates.shape, dtype=acc, device=gates.device))
        r, i = sig[..., :bw], sig[..., bw:]
        neg_c_s = (-c * F.softplus(-Lambda.to(acc))).view(H, bw)  # c log sigmoid(Lambda)
        log_a = r * neg_c_s  # (B, T, H, bw) contiguous
        a = torch.exp(log_a)
        one_minus_a2 = torch.expm1(log_a.mul_(2.0)).neg_()
        # d norm / d log a = -2 a^2 d sqrt(z)/dz, the latter bounded as in _BoundedSqrt
        dnorm = (a * a).mul_(-2.0).div_(one_minus_a2.mul(4.0).clamp_(min=_MAX_SQRT_GRADIENT ** -2).sqrt_())
        norm = one_minus_a2.sqrt_()
        ctx.n_plain = len(plain_starts)
        if plain_starts and plain_starts[0] and starts is not None:
            keep = starts.view(B, T, 1, 1)
            norm.masked_fill_(keep, 1.0)
            dnorm.masked_fill_(keep, 0.0)
        uf = u.to(acc).reshape(B, T, H, bw)  # a view for the conv's output layout
        b = (norm * i).mul_(uf)
        if starts is not None:
            # a document's first step forgets the state it would inherit; its input keeps the normaliser
            # it has when the document runs alone (a_t is still the decay there, only h_{t-1} is absent)
            a = a.masked_fill_(starts.view(B, T, 1, 1), 0.0)
        h = linear_scan_forward(a.reshape(B, T, -1), b.reshape(B, T, -1), h0)  # (B, T, W)
        ctx.save_for_backward(sig, a, norm, dnorm, u, Lambda, h, h0)
        ctx.c = c
        ctx.gates_dtype = gates.dtype
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):  # type: ignore[override]
        sig, a, norm, dnorm, u, Lambda, h, h0 = ctx.saved_tensors
        c = ctx.c
        B, T, H, bw = a.shape
        acc = a.dtype
        r, i = sig[..., :bw], sig[..., bw:]
        g, grad_a, grad_h0 = linear_scan_backward(a.reshape(B, T, -1), h, h0, grad_h)  # g = dL/db
        g, grad_a = g.view(B, T, H, bw), grad_a.view(B, T, H, bw)
        uf = u.to(acc).reshape(B, T, H, bw)
        # b = norm * i * u
        g_norm = g * norm
        grad_u = (g_norm * i).view(B, T, -1).to(u.dtype)
        g_u = g.mul_(uf)
        grad_i = g_norm.copy_(g_u).mul_(norm)
        # log a = c log sigmoid(Lambda) * r enters through a and through norm
        grad_log_a = grad_a.mul_(a).addcmul_(g_u.mul_(i), dnorm)
        neg_c_s = (-c * F.softplus(-Lambda.to(acc))).view(H, bw)
        grad_gates = torch.empty_like(sig)
        grad_gates[..., :bw] = grad_log_a * neg_c_s  # slice assignment, not out=: torch.compile traces it
        grad_gates[..., bw:] = grad_i
        # d(c log sigmoid(Lambda))/dLambda = c sigmoid(-Lambda)
        grad_Lambda = (grad_log_a.mul_(r).sum(dim=(0, 1)).view(-1)
                       * (c * torch.sigmoid(-Lambda.to(acc)))).to(Lambda.dtype)
        # through both sigmoids at once (one fused pass of grad * sig * (1 - sig))
        grad_gates = torch.ops.aten.sigmoid_backward(grad_gates, sig)
        if grad_h0 is not None:
            grad_h0 = grad_h0.to(h0.dtype)
        return (grad_gates.to(ctx.gates_dtype), grad_u, grad_Lambda, grad_h0, None, None) + (None,) * ctx.n_plain


class RecurrentCache(NamedTuple):
    """Decoding state of one recurrent block: O(1) in the context length."""

    conv_state: Tensor  # (B, K-1, W) the last K-1 inputs of the causal conv
    h: Tensor  # (B, W) fp32 RG-LRU state after the last token seen
    pos: int = 0  # tokens seen (the first one may enter unnormalised, see RecurrentConfig.normalise_first)


class RecurrentMixer(Mixer):
    """Griffin / Hawk recurrent block (De et al. 2024, Fig. 2c) with the RG-LRU.

    Training (``cache=None``) runs the RG-LRU as a chunked parallel scan (:mod:`amer.ops.scan`)
    inside one hand-differentiated autograd node; a decoding step (T == 1 with a cache) is one
    multiply-add on the fp32 state; a prefill with a cache scans from the cached state.

    Packed documents (``doc_ids``): the state and the conv window restart at each document's first
    token, so a document's outputs are those it has alone. (recurrentgemma also drops the input
    normaliser at a reset; amer keeps it, which is what a document's first token gets in a fresh
    sequence, so packed and unpacked training see the same block.)
    """

    def __init__(self, cfg: RecurrentConfig, dims: Dims, layer: LayerSpec) -> None:
        super().__init__(dims, layer)
        self.d_model = dims.d_model
        self.width = cfg.lru_width or dims.d_model
        self.n_heads = cfg.n_heads
        self.head_width = self.width // self.n_heads
        self.d_conv = cfg.d_conv
        self.c = float(cfg.c)
        self.normalise_first = cfg.normalise_first
        W, H, bw, K = self.width, self.n_heads, self.head_width, self.d_conv

        self.in_proj = nn.Linear(dims.d_model, 2 * W, bias=cfg.bias)  # gate and recurrence branches in one GEMM
        self.conv_weight = nn.Parameter(torch.empty(W, K))  # (W, K)
        self.conv_bias = nn.Parameter(torch.empty(W))
        self.gate_weight = nn.Parameter(torch.empty(H, bw, 2 * bw))  # (H, bw, 2bw) block-diagonal [r | i]
        self.gate_bias = nn.Parameter(torch.empty(H, 2 * bw))
        self.Lambda = nn.Parameter(torch.empty(W))
        self.out_proj = nn.Linear(W, dims.d_model, bias=cfg.bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Projections N(0, init_std), ``out_proj`` residual-scaled by 1/sqrt(2 n_layers).

        The depthwise causal conv takes PyTorch's nn.Conv1d default (uniform +-1/sqrt(K)), as the Mamba
        block does: recurrentgemma's 0.1/sqrt(K) std assumes its 1/sqrt(D) input projections, and on top
        of the model's small init_std it would start the block mute. The block-diagonal gate weights get
        std sqrt(1 / block_width) (recurrentgemma's BlockDiagonalLinear), so each gate logit starts with
        unit variance for unit inputs. Lambda: a^c = sigmoid(Lambda)^c uniform in [0.9, 0.999] (paper
        section 2.4, following the LRU's ring init, Orvieto et al. 2023), so at r = 1 every channel starts
        with a memory of 10 to 1000 steps; stored as the logit, so sigmoid(Lambda) is in (0, 1) for any value.
        """
        nn.init.normal_(self.in_proj.weight, 0.0, self.dims.init_std)
        bound = 1.0 / math.sqrt(self.d_conv)
        self.conv_weight.uniform_(-bound, bound)
        self.conv_bias.zero_()
        self.gate_weight.normal_(0.0, 1.0 / math.sqrt(self.head_width))
        self.gate_bias.zero_()
        a_c = torch.empty_like(self.Lambda).uniform_(0.9, 0.999)
        log_a = torch.log(a_c) / self.c  # log sigmoid(Lambda)
        self.Lambda.copy_(log_a - torch.log(-torch.expm1(log_a)))  # logit(exp(log_a))
        nn.init.normal_(self.out_proj.weight, 0.0, self.dims.out_std)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                lin.bias.zero_()

    def flops(self, seq_len: int) -> dict[str, float]:
        """Projections, plus the block-diagonal gate projection (W x 2 bw per token); the scan is not a matmul."""
        return {"proj": self.linear_flops(seq_len), "gates": float(seq_len * self.width * 2 * self.head_width)}

    def init_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> RecurrentCache:
        """Zero state; ``max_len`` is unused since the state does not grow with the context."""
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        return RecurrentCache(
            conv_state=conv_state_init(batch_size, self.width, self.d_conv, device=device, dtype=dtype),
            h=torch.zeros(batch_size, self.width, device=device, dtype=torch.float32),
        )

    def _gate_logits(self, u: Tensor) -> Tensor:
        """Both gates' logits with one batched matmul over the n_heads diagonal blocks: (B, T, H, 2bw)."""
        B, T, _ = u.shape
        gates = torch.einsum("bthi,hij->bthj", u.reshape(B, T, self.n_heads, self.head_width),
                             self.gate_weight.to(u.dtype))
        return gates + self.gate_bias.to(u.dtype)

    def forward(self, x: Tensor, cache: RecurrentCache | None = None,
                doc_ids: DocIds | None = None) -> MixerOutput:
        """x (B, T, D) -> MixerOutput(y (B, T, D), new cache or None)."""
        B, T, _ = x.shape
        gate, u = self.in_proj(x).chunk(2, dim=-1)  # (B, T, W) each
        gate = F.gelu(gate, approximate="tanh")  # Griffin's GeLU is the tanh approximation (JAX default)
        u, conv_state = causal_conv1d(u, self.conv_weight, self.conv_bias,
                                      None if cache is None else cache.conv_state,
                                      position=None if doc_ids is None else doc_ids.position,
                                      seq_idx=None if doc_ids is None else doc_ids.index)
        gates = self._gate_logits(u)  # (B, T, H, 2bw)
        plain = self._plain(x, cache, doc_ids)
        if cache is None:
            # the first-token mask doubles as a reset there: no state precedes a sequence's first token anyway
            starts = plain if plain is not None else None if doc_ids is None else doc_ids.starts
            h = _RGLRUScan.apply(gates, u, self.Lambda, None, self.c, starts, plain is not None)  # (B, T, W) fp32
            new_cache = None
        elif T == 1:
            a, b, _ = rglru_coeffs(gates, u, self.Lambda, self.c, plain)
            h = torch.addcmul(b, a, cache.h.to(a.dtype).unsqueeze(1))  # (B, 1, W): one step, O(1)
            new_cache = RecurrentCache(conv_state, h[:, -1], cache.pos + 1)
        else:
            # prefill continues the scan from the cached state
            h = _RGLRUScan.apply(gates, u, self.Lambda, cache.h, self.c, plain,
                                 plain is not None)  # cache.h is 0 at pos 0
            new_cache = RecurrentCache(conv_state, h[:, -1].clone(), cache.pos + T)  # don't pin the (B, T, W) buffer
        y = self.out_proj(h.to(x.dtype) * gate)
        return MixerOutput(y, new_cache)

    def _plain(self, x: Tensor, cache: RecurrentCache | None, doc_ids: DocIds | None) -> Tensor | None:
        """(B, T) bool: inputs entering without the normaliser (each sequence's or document's first token when
        ``normalise_first`` is off), or None."""
        if self.normalise_first or (cache is not None and cache.pos > 0):
            return None
        if doc_ids is not None:
            return doc_ids.starts
        first = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        first[:, 0] = True
        return first


register_family(FamilySpec(letter="R", name="recurrent", colour="#9467bd", config_key="recurrent",
                           config=RecurrentConfig, mixer=RecurrentMixer,
                           summary="Griffin RG-LRU recurrent block; O(1) decoding state"))
