"""State-space duality (SSD) scan of Mamba-2, Dao & Gu 2024 (arXiv 2405.21060), in pure torch.

The selective SSM with scalar-times-identity state matrix, per head ``h``::

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T        S: (P, N)
    y_t = S_t C_t

is a 1-semiseparable matrix mixer, so it can be evaluated chunk by chunk (paper section 6, the
"minimal SSD" listing): inside a chunk of length L as a masked (L, L) attention-like matmul, and across
chunks by passing one (P, N) state per chunk through a tiny (c + 1, c + 1) decay matrix. Everything is a
batched matmul, which is what makes the training path fast on CPUs and GPUs alike.

Shapes (``b`` batch, ``T`` time, ``H`` heads, ``P`` head dim, ``G`` B/C groups, ``N`` state size)::

    x (b, T, H, P)   dt (b, T, H) > 0 (already softplus'd)   A (H,) < 0   B, C (b, T, G, N)
    state (b, H, P, N), kept in fp32 (fp64 when the inputs are fp64)

Head ``h`` reads group ``h // (H // G)``, as in mamba_ssm (grouped-value attention analogue).

Packed documents (``seq_idx`` (b, T), a non-decreasing document number per token, as mamba_ssm's
kernels take it): no state flows from one document into the next. The recurrence is cut by zeroing
every decay term that would cross a boundary: the intra-chunk decay matrix, the weights of a chunk's
end state, the chunk-to-chunk decays and the incoming-state decays are multiplied by 0/1 masks of
"same document", so the scan keeps its shapes and stays a sequence of batched matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from amer.ops import kernels
from amer.ops.ssd_kernels import ssd_scan_kernel, ssd_step_kernel

__all__ = ["ssd_chunked", "ssd_sequential", "ssd_step", "ssd_step_torch", "ssd_scan_torch"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least: decays exp(sum dt*A) lose all precision in bf16/fp16 (paper section 9.1)."""
    return torch.promote_types(dtype, torch.float32)


# Log-decays below -60 are clamped: exp(-60) ~ 1e-26 is far below fp32 resolution relative to the
# diagonal term exp(0) = 1, while exp of very negative inputs (or -inf) falls off the vectorised path on
# CPUs and yields subnormals that make every later multiply ~100x slower.
_LOG_DECAY_FLOOR = -60.0


def _decay(log_decay: Tensor) -> Tensor:
    """exp of a log-decay (<= 0), floored at exp(-60) (see ``_LOG_DECAY_FLOOR``)."""
    return torch.exp(log_decay.clamp(min=_LOG_DECAY_FLOOR))


def _segsum_exp(a_cs: Tensor) -> Tensor:
    """exp(segsum): ``out[..., i, j] = exp(a_cs[i] - a_cs[j])`` for ``j <= i``, else 0.

    a_cs: (..., L) inclusive cumulative sums of log-decays (non-increasing). The difference of cumulative
    sums is what the fused kernels use. Clamping to [floor, 0] before exp keeps the upper triangle (where
    the difference is positive and could overflow) finite, and a multiply by the 0/1 causal mask zeroes
    it: cheaper than masked_fill, and exp never sees -inf.
    """
    L = a_cs.shape[-1]
    diff = a_cs.unsqueeze(-1) - a_cs.unsqueeze(-2)  # (..., L, L)
    causal = torch.ones(L, L, dtype=a_cs.dtype, device=a_cs.device).tril()
    return torch.exp(diff.clamp(_LOG_DECAY_FLOOR, 0.0)) * causal


class _DecayScores(torch.autograd.Function):
    """``m = cb * exp(segsum(a_cs))`` with a hand-written backward.

    The (L, L)-per-head decay matrix is the only large elementwise tensor of the scan; autograd would
    store and revisit it several times (sub, mask, exp, mul). Here the forward saves one tensor and
    the backward is two elementwise passes plus reductions:
    d cb = sum_R g * E,  d a_k = sum_j (g m)[k, j] - sum_i (g m)[i, k].
    cb: (..., G, L, L) shared by the R heads of a group; a_cs: (..., G, R, L). Returns (..., G, R, L, L).
    """

    @staticmethod
    def forward(ctx, cb: Tensor, a_cs: Tensor, mask: Tensor | None) -> Tensor:  # type: ignore[override]
        """``mask`` (..., 1, 1, L, L) 0/1, or None: which (i, j) may interact (causal and same document)."""
        L = a_cs.shape[-1]
        if mask is None:
            mask = torch.ones(L, L, dtype=a_cs.dtype, device=a_cs.device).tril()
        E = (a_cs.unsqueeze(-1) - a_cs.unsqueeze(-2)).clamp_(_LOG_DECAY_FLOOR, 0.0).exp_().mul_(mask)
        ctx.save_for_backward(cb, E)
        return cb.unsqueeze(-3) * E

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        cb, E = ctx.saved_tensors
        gE = g * E
        d_cb = gE.sum(-3)
        gm = gE * cb.unsqueeze(-3)
        d_a = gm.sum(-1) - gm.sum(-2)
        return d_cb, d_a, None


def ssd_scan_torch(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                   initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The chunked matmul SSD in pure torch (paper listing 1, with B/C groups and padding).

    ``seq_idx`` (b, T) non-decreasing document numbers cut the state at document starts (module
    docstring); the initial state then belongs to the row's first document.
    Returns y (b, T, H, P) in x's dtype and the final state (b, H, P, N) in the accumulation dtype.
    """
    b, T, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    if H % G:
        raise ValueError(f"ssd: heads ({H}) must be divisible by groups ({G})")
    R = H // G  # heads per group
    acc = _acc_dtype(x.dtype)
    L = min(chunk_size, T) if T > 0 else chunk_size
    pad = (-T) % L
    # dt = 0 on padded steps: decay exp(0) = 1 and input dt * x B = 0, so the final state is untouched
    x, dt, B, C = x.to(acc), dt.to(acc), B.to(acc), C.to(acc)
    if seq_idx is not None and T == 0:
        seq_idx = None
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:  # padded steps continue the last document: no boundary, no input
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c = (T + pad) // L
    docs = None if seq_idx is None else _DocumentMasks(seq_idx, b, c, L, acc)

    # chunked views; heads split as (G, R) so B/C are shared by the R heads of a group without copying
    Bc = B.view(b, c, L, G, N).transpose(2, 3)  # (b, c, G, L, N) view
    Cc = C.view(b, c, L, G, N).transpose(2, 3)  # (b, c, G, L, N) view
    dt_h = dt.view(b, c, L, H).permute(0, 1, 3, 2)  # (b, c, H, L)
    a_cs = torch.cumsum(dt_h * A.to(acc).view(1, 1, H, 1), dim=-1)  # (b, c, H, L) log-decay from chunk start
    a_cs = a_cs.view(b, c, G, R, L)
    # discretised input dt_s x_s, laid out (b, c, G, R, L, P) once: both per-head matmuls read it
    xdt = (x * dt.unsqueeze(-1)).view(b, c, L, G, R, P).permute(0, 1, 3, 4, 2, 5).contiguous()

    # Per-position decays are folded into the N-wide B and C operands (N <= P in every Mamba-2 config),
    # never applied to the P-wide head outputs: that keeps the elementwise passes over (.., L, P)
    # tensors to the one layout change of xdt and of y, and lets the two contributions to y
    # accumulate inside one baddbmm.

    # 1. intra-chunk (diagonal blocks): y = (C B^T o exp(segsum)) (dt x), a masked attention per chunk
    cb = torch.matmul(Cc, Bc.transpose(-1, -2))  # (b, c, G, L, L), per group
    m = _DecayScores.apply(cb, a_cs, None if docs is None else docs.intra)  # (b, c, G, R, L, L)

    # 2. per-chunk end states from the chunk's own inputs: sum_s (dt_s x_s) (exp(a_end - a_s) B_s)^T
    w = _decay(a_cs[..., -1:] - a_cs)  # (b, c, G, R, L)
    if docs is not None:
        w = w * docs.to_end
    Bw = w.unsqueeze(-1) * Bc.unsqueeze(3)  # (b, c, G, R, L, N)
    states = torch.matmul(xdt.transpose(-1, -2), Bw)  # (b, c, G, R, P, N)
    states = states.reshape(b, c, H, P, N)

    # 3. inter-chunk recurrence, batched over chunks: a (c+1, c+1) semiseparable matrix of chunk decays
    # maps [initial state, chunk states] to the state entering each chunk (and the final state)
    a_end = F.pad(a_cs[..., -1].reshape(b, c, H).transpose(1, 2), (1, 0))  # (b, H, c+1)
    decay_chunk = _segsum_exp(torch.cumsum(a_end, dim=-1))  # (b, H, c+1, c+1)
    if docs is not None:
        decay_chunk = decay_chunk * docs.across
    states = torch.matmul(decay_chunk[..., 1:], states.permute(0, 2, 1, 3, 4).reshape(b, H, c, P * N))
    if initial_state is not None:  # column 0 of the decay matrix carries the initial state
        states = states + decay_chunk[..., :1] * initial_state.to(acc).reshape(b, H, 1, P * N)
    states = states.view(b, H, c + 1, P, N)
    final_state = states[:, :, -1]  # (b, H, P, N)
    prev = states[:, :, :-1].permute(0, 2, 1, 3, 4).reshape(b, c, G, R, P, N)  # state entering each chunk

    # 4. contribution of the incoming state, exp(a_l) C_l S_prev, accumulated onto the intra-chunk matmul
    decay_in = _decay(a_cs) if docs is None else _decay(a_cs) * docs.from_start  # (b, c, G, R, L)
    Cd = decay_in.unsqueeze(-1) * Cc.unsqueeze(3)  # (b, c, G, R, L, N)
    y_off = torch.matmul(Cd, prev.transpose(-1, -2))  # (b, c, G, R, L, P)
    y = torch.baddbmm(y_off.reshape(-1, L, P), m.reshape(-1, L, L), xdt.view(-1, L, P))

    y = y.view(b, c, G, R, L, P).permute(0, 1, 4, 2, 3, 5).reshape(b, c * L, H, P)  # (b, T + pad, H, P)
    if pad:
        y = y[:, :T]
    return y, final_state


class _DocumentMasks:
    """0/1 "same document" masks of a chunked layout, each shaped to multiply one term of the scan.

    seq_idx (b, c * L) non-decreasing, so two positions share a document iff their numbers are equal
    (no boundary lies between them). ``ends`` is the document of each chunk's last position, with the
    first position's document in front for the initial state: the state leaving chunk ``k - 1`` (column
    ``k`` of the chunk recurrence) belongs to ``ends[k]``.
    """

    def __init__(self, seq_idx: Tensor, b: int, c: int, L: int, dtype: torch.dtype) -> None:
        s = seq_idx.view(b, c, L)
        ends = torch.cat([s[:, :1, 0], s[:, :, -1]], dim=1)  # (b, c + 1)
        causal = torch.ones(L, L, dtype=torch.bool, device=s.device).tril()
        self.intra = ((s[..., :, None] == s[..., None, :]) & causal).to(dtype)[:, :, None, None]  # (b, c, 1, 1, L, L)
        self.to_end = (s == s[..., -1:]).to(dtype)[:, :, None, None]  # (b, c, 1, 1, L)
        self.across = (ends[:, :, None] == ends[:, None, :]).to(dtype)[:, None]  # (b, 1, c + 1, c + 1)
        self.from_start = (s == ends[:, :-1, None]).to(dtype)[:, :, None, None]  # (b, c, 1, 1, L)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan: mamba-ssm's fused Triton kernels where :mod:`amer.ops.kernels` picks them (CUDA, or CPU
    under the Triton interpreter), else :func:`ssd_scan_torch`.

    x (b, T, H, P), dt (b, T, H), A (H,), B/C (b, T, G, N), initial_state (b, H, P, N) or None,
    seq_idx (b, T) document numbers of packed rows or None.
    Returns y (b, T, H, P) in x's dtype and the final state (b, H, P, N) in fp32 (fp64 for fp64 inputs).
    """
    if x.shape[1] > 0 and kernels.ssd_scan(x.device, x.dtype) is not None:
        return ssd_scan_kernel(x, dt, A, B, C, chunk_size, initial_state, seq_idx)
    y, final_state = ssd_scan_torch(x, dt, A, B, C, chunk_size, initial_state, seq_idx)
    return y.to(x.dtype), final_state


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrent step (decoding), O(1) in the context length.

    x (b, H, P), dt (b, H), A (H,), B/C (b, G, N), state (b, H, P, N). Returns y (b, H, P) in x's dtype
    and the new state in the accumulation dtype (fp32 at least). mamba-ssm's ``selective_state_update`` where
    :mod:`amer.ops.kernels` picks it.
    """
    fn = kernels.ssd_update(x.device, x.dtype)
    if fn is not None:
        return ssd_step_kernel(fn, x, dt, A, B, C, state)
    return ssd_step_torch(x, dt, A, B, C, state)


def ssd_step_torch(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`ssd_step` in pure torch."""
    b, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    acc = _acc_dtype(torch.promote_types(x.dtype, state.dtype))
    dt = dt.to(acc)
    Bh = B.to(acc).unsqueeze(2).expand(b, G, H // G, N).reshape(b, H, N)  # group -> its heads
    Ch = C.to(acc).unsqueeze(2).expand(b, G, H // G, N).reshape(b, H, N)
    decay = torch.exp(dt * A.to(acc))  # (b, H)
    dx = x.to(acc) * dt.unsqueeze(-1)  # (b, H, P)
    # the decayed copy takes the input's outer product in place: two passes over the (b, H, P, N) state, not four
    new_state = (state.to(acc) * decay[..., None, None]).addcmul_(dx.unsqueeze(-1), Bh.unsqueeze(-2))
    y = torch.matmul(new_state, Ch.unsqueeze(-1)).squeeze(-1)  # (b, H, P)
    return y.to(x.dtype), new_state


def ssd_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int | None = None,
                   initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference: the plain recurrence, one :func:`ssd_step` per time step (tests only; chunk_size unused).
    With ``seq_idx``, the state is zeroed where the document number changes."""
    b, T, H, P = x.shape
    N = B.shape[-1]
    acc = _acc_dtype(x.dtype)
    state = (torch.zeros(b, H, P, N, dtype=acc, device=x.device) if initial_state is None
             else initial_state.to(acc))
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(acc).view(b, 1, 1, 1)
        y_t, state = ssd_step_torch(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, H, P)
    return y, state
