"""Selective scan of Mamba-1 (Gu & Dao 2023, arXiv 2312.00752, section 3 and algorithm 2), in pure torch.

Every inner channel ``d`` carries its own diagonal state of ``N`` entries; the time step ``dt`` is
per channel and the input and output maps ``B``, ``C`` are shared by all channels::

    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] u_t[d] B_t[n]     (zero-order hold on A and
    y_t[d]    = sum_n C_t[n] h_t[d, n]                                           Euler on B, as mamba_ssm)

Unlike Mamba-2's scalar-per-head decay, the decay differs across the N state entries, so the state does
not factor into the attention-like matmuls of the SSD: it is a diagonal linear recurrence over D * N
channels. Training runs it as a two-level chunked scan (Blelloch 1990) inside one autograd node:

- time is cut into blocks of ``chunk`` steps. A block's decays, inputs and states are built, scanned and
  read out, then dropped, so forward keeps only the state entering each block (mamba_ssm's fused kernel
  keeps them in SRAM likewise); backward visits the blocks in reverse and rebuilds them;
- inside a block the steps are laid out offset-major, ``[i][j]`` = step ``j * S + i`` (``S = SWEEP``),
  as a list of S per-offset slices (n, b, N, D) that stay cache-sized: a sweep over the S offsets scans
  all ``n = chunk / S`` sub-chunks at once, a loop over the sub-chunks passes the state between them,
  and a second sweep adds each sub-chunk's decayed entering state. That is ``O(S + chunk / S)`` ops per
  block, never one per time step;
- the reverse-time scan of backward (Martin & Cundy 2018: ``g_t = dL/dh_t + a_{t+1} g_{t+1}``) runs the
  same way and reduces the parameter gradients offset by offset while each slice is hot, handing
  ``dL/dh`` at the block's first step to the block before.

The slices hold the state as (N, D), D innermost, so every contraction over n or d (the read-out with C,
the gradients wrt B, C and dt u) is a small batched matmul over contiguous rows. The state and every
decay are fp32 at least (fp64 for fp64 inputs). Packed documents: ``keep`` (b, T) is 0 where a document
starts; the decay there is multiplied by it, so no state crosses the boundary.

Shapes: u, dt (b, T, D) with dt > 0 (already softplus'd); A (D, N) < 0; B, C (b, T, N);
h0 (b, D, N) or None; keep (b, T) or None.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["selective_scan", "selective_scan_step", "CHUNK", "SWEEP"]

CHUNK = 128  # default time block; Mamba1Config.chunk_size says what was measured
SWEEP = 16  # offsets per sub-chunk: each sweep issues SWEEP ops over (chunk / SWEEP) sub-chunks at once

# Log-decays are floored here: exp(-60) ~ 1e-26 is below fp32 resolution against the step's own input,
# and exp of much smaller numbers produces subnormals that make every later multiply ~100x slower on CPUs.
# The gradient is taken as if unclamped (it is ~1e-26 there either way).
_LOG_DECAY_FLOOR = -60.0
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x log2 e)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _offset_major(t: Tensor, S: int) -> Tensor:
    """(b, n S, ...) -> (S, n, b, ...) contiguous: ``[i, j]`` is step ``j S + i``."""
    b, L = t.shape[:2]
    return t.reshape(b, L // S, S, *t.shape[2:]).movedim((2, 1), (0, 1)).contiguous()


def _time_major(t: Tensor) -> Tensor:
    """Inverse of :func:`_offset_major`: (S, n, b, ...) -> (b, n S, ...)."""
    S, n, b = t.shape[:3]
    return t.movedim((0, 1), (2, 1)).reshape(b, n * S, *t.shape[3:])


class _Block:
    """One time block: operands (S, n, b, D|N) in the offset-major layout and, once :meth:`scan` ran, the
    decays ``a[i]`` and states ``h[i]`` (n, b, N, D) of the S offsets.

    The slices live in workspaces allocated once per call and reused by every block (``ws``: S + 1 slices
    for the decays, S + 1 for the states, S + 3 more for backward): blocks that allocate and free their own
    slices hand the memory back to the OS at every block and pay its page faults again at the next, which
    measured slower than the scan itself.
    """

    def __init__(self, dt: Tensor, dtu: Tensor, A2t: Tensor, B: Tensor, keep: Tensor | None, S: int,
                 h_in: Tensor | None, ws: list[Tensor]) -> None:
        """A2t (N, D) is A^T log2 e; h_in (b, N, D) the state entering the block, or None (zeros)."""
        self.dt, self.dtu, self.B = (_offset_major(t, S) for t in (dt, dtu, B))
        self.keep = None if keep is None else _offset_major(keep, S)[..., None, None]  # (S, n, b, 1, 1)
        n = self.dt.shape[1]
        self.a, self.h = (w[:, :n] for w in ws[:2])  # (S + 1, n, b, N, D): S offsets and one scratch slice
        self.ws = [w[:, :n] for w in ws[2:]]
        self.A2t = A2t
        self.h_in = h_in

    def scan(self, C: Tensor | None = None) -> Tensor | None:
        """Build the states; with ``C`` (S, n, b, N) also return y (S, n, b, D)."""
        a, h = self.a, self.h
        S = a.shape[0] - 1
        n, b, N, D = a.shape[1:]
        # 1. every sub-chunk scanned from a zero state, all at once, and each sub-chunk's total decay.
        #    exp(dt A) is computed as exp2(dt A log2 e): exp2 runs about 2.5x faster than exp on CPUs, and
        #    it is the scan's only transcendental
        total = a[S]
        for i in range(S):
            torch.mul(self.dt[i].unsqueeze(-2), self.A2t, out=a[i]).clamp_(min=_LOG_DECAY_FLOOR * _LOG2E).exp2_()
            if self.keep is not None:
                a[i].mul_(self.keep[i])
            torch.mul(self.B[i].unsqueeze(-1), self.dtu[i].unsqueeze(-2), out=h[i])  # discretised input
            if i == 0:
                total.copy_(a[0])
            else:
                h[i].addcmul_(a[i], h[i - 1])
                total.mul_(a[i])
        # 2. the state entering each sub-chunk (a loop over sub-chunks, not steps)
        enter = h[S]
        state = self.h_in if self.h_in is not None else torch.zeros_like(total[0])
        for j in range(n):
            enter[j] = state
            state = torch.addcmul(h[S - 1, j], total[j], state)
        # 3. each step adds its sub-chunk's entering state, decayed up to it; y read out while hot
        ys = []
        for i in range(S):
            h[i].add_(enter.mul_(a[i]))
            if C is not None:  # y = C h: (1, N) @ (N, D) per step
                ys.append(torch.matmul(C[i].view(n * b, 1, N), h[i].view(n * b, N, D)).view(n, b, D))
        return torch.stack(ys) if C is not None else None

    def backward(self, gy: Tensor, C: Tensor, At: Tensor, carry: Tensor | None,
                 g_At: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        """The reverse-time scan of the block (after :meth:`scan`).

        gy (S, n, b, D) output gradient, C (S, n, b, N), At (N, D), carry (b, N, D) the gradient reaching
        the block's last state from later blocks (or None). Adds dL/dA^T into ``g_At``; returns the block's
        gradients wrt dt u, dt (through the decays), B and C in the offset-major layout, and dL/dh_in.
        """
        a, h = self.a, self.h
        g, extra = self.ws
        S = a.shape[0] - 1
        n, b, N, D = a.shape[1:]
        m = n * b
        tail, enter, prev_first = extra[0], extra[1], extra[2]
        # 1. local reverse scans of the sub-chunks, seeded by the gradient from y, and each sub-chunk's decay
        #    after its first step (what carries a gradient from its end back to its start)
        tail.fill_(1.0)
        for i in range(S - 1, -1, -1):
            torch.mul(C[i].unsqueeze(-1), gy[i].unsqueeze(-2), out=g[i])  # dL/dh_t from y_t
            if i < S - 1:
                g[i].addcmul_(a[i + 1], g[i + 1])
                tail.mul_(a[i + 1])
        # 2. the gradient entering each sub-chunk's last state from the sub-chunk after it
        state = carry if carry is not None else torch.zeros_like(tail[0])
        for j in range(n - 1, -1, -1):
            enter[j] = state
            state = a[0, j] * torch.addcmul(g[0, j], tail[j], state)  # a at the first step times g there
        # 3. add it, decayed, to every step; then the step's parameter gradients while its slices are hot
        prev_first[0] = self.h_in if self.h_in is not None else 0.0  # h_{t-1} at each sub-chunk's first step
        prev_first[1:] = h[S - 1, :-1]
        g_dtu, g_dt, g_B, g_C = [], [], [], []
        g_A_steps = tail.zero_()  # sum over offsets of dL/d(dt A) dt, reduced over (n, b) once
        for i in range(S - 1, -1, -1):
            gi = g[i].add_(enter)
            if i > 0:
                enter.mul_(a[i])
            g_C.append(torch.matmul(gy[i].view(m, 1, D), h[i].view(m, N, D).transpose(1, 2)).view(n, b, N))
            g_dtu.append(torch.matmul(self.B[i].view(m, 1, N), gi.view(m, N, D)).view(n, b, D))
            g_B.append(torch.matmul(self.dtu[i].view(m, 1, D), gi.view(m, N, D).transpose(1, 2)).view(n, b, N))
            g_log = gi.mul_(h[i - 1] if i > 0 else prev_first).mul_(a[i])  # dL/da_t a_t = g_t h_{t-1} a_t
            g_dt.append(torch.mul(g_log, At, out=h[i]).sum(-2))  # h[i] is not read again
            g_A_steps.addcmul_(g_log, self.dt[i].unsqueeze(-2))
        g_At += g_A_steps.sum((0, 1))
        return tuple(torch.stack(x[::-1]) for x in (g_dtu, g_dt, g_B, g_C)), state


def _workspace(n_slices: tuple[int, ...], n: int, b: int, N: int, D: int, like: Tensor) -> list[Tensor]:
    return [torch.empty(k, n, b, N, D, dtype=like.dtype, device=like.device) for k in n_slices]


def _sizes(T: int, chunk: int) -> tuple[int, int, int]:
    """Sweep length S, block length L (a multiple of S) and the padded length Tp (a multiple of S)."""
    S = max(1, min(SWEEP, chunk, T))
    L = max(S, (min(chunk, T) + S - 1) // S * S)
    Tp = (T + S - 1) // S * S
    return S, L, Tp


def _padded(Tp: int, tensors: tuple[Tensor, ...], keep: Tensor | None, acc: torch.dtype) -> tuple[Tensor | None, ...]:
    """The (b, T, .) operands in the accumulation dtype, padded to Tp steps with zeros. Padded steps have
    dt = 0: decay 1 and input 0, so the final state is untouched, and they read no output gradient."""
    pad = Tp - tensors[0].shape[1]
    out = [F.pad(t.to(acc), (0, 0, 0, pad)) if pad else t.to(acc) for t in tensors]
    k = None if keep is None else (F.pad(keep.to(acc), (0, pad), value=1.0) if pad else keep.to(acc))
    return (*out, k)


def _no_autocast(t: Tensor) -> Any:
    """The scan's small matmuls (the read-out with C, the gradients wrt B and C) run in the accumulation
    dtype: under an enclosing autocast they would drop to bf16 (and on CPUs without bf16 units, crawl)."""
    kind = t.device.type
    return torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else contextlib.nullcontext()


# The scan is registered as two custom operators with a registered autograd formula: torch.compile and
# AOT autograd see each as one opaque node (with a shape-only fake implementation) instead of tracing and
# functionalising its hundreds of in-place slice updates, which made compiling a tiny two-layer model take
# over a minute; eager calls run the Python below directly.


@torch.library.custom_op("amer::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, keep: Tensor | None,
              chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """y (b, T, D), the final state (b, D, N) and the state entering each block (b, blocks, N, D)."""
    with _no_autocast(u):
        return _forward(u, dt, A, B, C, h0, keep, chunk)


def _forward(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, keep: Tensor | None,
             chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    acc = _acc(torch.promote_types(u.dtype, dt.dtype))
    b, T, D = u.shape
    N = A.shape[-1]
    S, L, Tp = _sizes(T, chunk)
    uf, dtf, Bf, Cf, kf = _padded(Tp, (u, dt, B, C), keep, acc)
    A2t = A.to(acc).t() * _LOG2E
    dtu = dtf * uf
    ys, entries = [], []
    h = torch.zeros(b, N, D, dtype=acc, device=u.device) if h0 is None else h0.to(acc).transpose(1, 2).contiguous()
    ws = _workspace((S + 1, S + 1), L // S, b, N, D, dtf)
    for s in range(0, Tp, L):
        e = min(s + L, Tp)
        entries.append(h)
        blk = _Block(dtf[:, s:e], dtu[:, s:e], A2t, Bf[:, s:e], None if kf is None else kf[:, s:e], S, h, ws)
        ys.append(_time_major(blk.scan(_offset_major(Cf[:, s:e], S))))
        h = blk.h[S - 1, -1].clone()  # the block's last state (the workspace is reused)
    y = torch.cat(ys, 1)[:, :T] if ys else torch.zeros(b, 0, D, dtype=acc, device=u.device)
    stored = torch.stack(entries or [h], 1)
    return y.to(torch.promote_types(u.dtype, dt.dtype)).contiguous(), h.transpose(1, 2).contiguous(), stored


@_scan_fwd.register_fake
def _(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, keep: Tensor | None,
      chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    b, T, D = u.shape
    N = A.shape[-1]
    acc = _acc(torch.promote_types(u.dtype, dt.dtype))
    S, L, Tp = _sizes(T, chunk)
    blocks = max(1, -(-Tp // L))
    return (u.new_empty(b, T, D, dtype=torch.promote_types(u.dtype, dt.dtype)), u.new_empty(b, D, N, dtype=acc),
            u.new_empty(b, blocks, N, D, dtype=acc))


@torch.library.custom_op("amer::selective_scan_bwd", mutates_args=())
def _scan_bwd(grad_y: Tensor, grad_h_last: Tensor, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
              h0: Tensor | None, keep: Tensor | None, entries: Tensor,
              chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients wrt u, dt, A, B, C and h0 (an empty tensor when h0 is None)."""
    with _no_autocast(u):
        return _backward_impl(grad_y, grad_h_last, u, dt, A, B, C, h0, keep, entries, chunk)


def _backward_impl(grad_y: Tensor, grad_h_last: Tensor, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   h0: Tensor | None, keep: Tensor | None, entries: Tensor,
                   chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = entries.dtype
    b, T, D = u.shape
    N = A.shape[-1]
    S, L, Tp = _sizes(T, chunk)
    uf, dtf, Bf, Cf, gyf, kf = _padded(Tp, (u, dt, B, C, grad_y), keep, acc)
    At = A.to(acc).t()
    A2t = At * _LOG2E
    dtu = dtf * uf
    parts: list[list[Tensor]] = [[], [], [], []]  # dL/d(dt u), dL/d dt (decays), dL/dB, dL/dC per block
    g_At = torch.zeros(N, D, dtype=acc, device=u.device)
    carry = grad_h_last.to(acc).transpose(1, 2).contiguous()  # dL/dh at the block's last step
    starts = list(range(0, Tp, L))
    ws = _workspace((S + 1, S + 1, S, 3), L // S, b, N, D, dtf)
    for k in reversed(range(len(starts))):
        s = starts[k]
        e = min(s + L, Tp)
        blk = _Block(dtf[:, s:e], dtu[:, s:e], A2t, Bf[:, s:e], None if kf is None else kf[:, s:e], S,
                     entries[:, k], ws)
        blk.scan()
        grads, carry = blk.backward(_offset_major(gyf[:, s:e], S), _offset_major(Cf[:, s:e], S), At, carry, g_At)
        for out, p in zip(parts, grads, strict=True):
            out.append(_time_major(p))
    if parts[0]:
        g_dtu, g_dt, g_B, g_C = (torch.cat(x[::-1], 1)[:, :T] for x in parts)
    else:
        g_dtu, g_dt, g_B, g_C = (torch.zeros(b, 0, k, dtype=acc, device=u.device) for k in (D, D, N, N))
    g_u = g_dtu * dtf[:, :T]
    g_dt = g_dt + g_dtu * uf[:, :T]
    g_h0 = u.new_empty(0) if h0 is None else carry.transpose(1, 2).to(h0.dtype).contiguous()
    return (g_u.to(u.dtype), g_dt.to(dt.dtype), g_At.t().to(A.dtype).contiguous(), g_B.to(B.dtype).contiguous(),
            g_C.to(C.dtype).contiguous(), g_h0)


@_scan_bwd.register_fake
def _(grad_y: Tensor, grad_h_last: Tensor, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
      h0: Tensor | None, keep: Tensor | None, entries: Tensor,
      chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (torch.empty_like(u), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C),
            u.new_empty(0) if h0 is None else torch.empty_like(h0))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    u, dt, A, B, C, h0, keep, chunk = inputs
    ctx.save_for_backward(u, dt, A, B, C, h0, keep, output[2])
    ctx.chunk = chunk
    ctx.y_dtype, ctx.h_dtype = output[0].dtype, output[1].dtype


def _backward(ctx: Any, grad_y: Tensor | None, grad_h_last: Tensor | None, _grad_entries: Any) -> tuple[Any, ...]:
    u, dt, A, B, C, h0, keep, entries = ctx.saved_tensors
    b, T, D = u.shape
    if grad_y is None:
        grad_y = u.new_zeros(b, T, D, dtype=ctx.y_dtype)
    if grad_h_last is None:
        grad_h_last = u.new_zeros(b, D, A.shape[-1], dtype=ctx.h_dtype)
    g_u, g_dt, g_A, g_B, g_C, g_h0 = _scan_bwd(grad_y, grad_h_last, u, dt, A, B, C, h0, keep, entries, ctx.chunk)
    return g_u, g_dt, g_A, g_B, g_C, (None if h0 is None else g_h0), None, None


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None = None,
                   keep: Tensor | None = None, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """The selective scan over a sequence (training and prefill), see the module docstring.

    u, dt (b, T, D); A (D, N); B, C (b, T, N); h0 (b, D, N) or None (zeros); keep (b, T) 0/1 or None.
    Returns y (b, T, D) in the inputs' dtype (without the D skip) and the final state (b, D, N) in fp32
    (fp64 for fp64 inputs). Differentiable in every tensor argument but ``keep``.
    """
    if u.dim() != 3 or dt.shape != u.shape:
        raise ValueError(f"selective_scan: u and dt must both be (b, T, D), got {tuple(u.shape)} and {tuple(dt.shape)}")
    b, T, D = u.shape
    if A.dim() != 2 or A.shape[0] != D:
        raise ValueError(f"selective_scan: A must be (D, N) = ({D}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    if B.shape != (b, T, N) or C.shape != (b, T, N):
        raise ValueError(f"selective_scan: B and C must be (b, T, N) = {(b, T, N)}, got {tuple(B.shape)} "
                         f"and {tuple(C.shape)}")
    if h0 is not None and h0.shape != (b, D, N):
        raise ValueError(f"selective_scan: h0 must be (b, D, N) = {(b, D, N)}, got {tuple(h0.shape)}")
    if chunk < 1:
        raise ValueError(f"selective_scan: chunk must be >= 1, got {chunk}")
    y, h_last, _ = _scan_fwd(u, dt, A, B, C, h0, keep, chunk)
    return y, h_last


def selective_scan_step(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        h: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrent step (decoding), O(1) in the context length.

    u, dt (b, D); A (D, N); B, C (b, N); h (b, D, N). Returns y (b, D) in u's dtype and the new state in
    the accumulation dtype (fp32 at least).
    """
    acc = _acc(torch.promote_types(u.dtype, h.dtype))
    dtf = dt.to(acc)
    a = torch.mul(dtf.unsqueeze(-1), A.to(acc) * _LOG2E).clamp_(min=_LOG_DECAY_FLOOR * _LOG2E).exp2_()  # (b, D, N)
    x = (dtf * u.to(acc)).unsqueeze(-1) * B.to(acc).unsqueeze(1)
    h = torch.addcmul(x, a, h.to(acc))
    y = (h * C.to(acc).unsqueeze(1)).sum(-1)  # elementwise, so an enclosing autocast leaves it in fp32
    return y.to(u.dtype), h
