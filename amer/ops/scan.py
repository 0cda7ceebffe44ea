"""Diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` as a chunked parallel scan.

This is the recurrence inside Griffin's RG-LRU (De et al. 2024, arXiv 2402.19427) and, more
generally, any diagonal linear RNN (LRU, S5, Mamba-1 with a diagonal state). The pair ``(a, b)``
composes associatively, ``(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)``, so the sequence can be
cut into chunks that are scanned independently and then stitched together by a scan of the
chunk carries (the two-level scan of Blelloch 1990, applied recursively).

Why chunked rather than Hillis-Steele: a log-depth Hillis-Steele scan makes ``log2 T`` full
passes over (B, T, C) plus ping-pong copies, and on CPU the scan is memory-bound. The chunked
form makes about three full passes (the in-chunk sweep, the in-chunk cumulative decay, the
carry fix-up); it measured 1.5-2x faster forward+backward than Hillis-Steele on a 2-core CPU
at T = 256 and 1024. The in-chunk sweep steps through the CHUNK offsets of a chunk, each op
covering that offset in every chunk of every sequence at once, so the number of tensor ops is
``O(CHUNK * log_CHUNK T)``: fixed by the chunk size, not a loop over T.

The training path runs through :class:`_LinearScan`, a custom autograd function whose backward
is the same scan run in reverse time (Martin & Cundy 2018, "Parallelizing linear recurrent neural
nets over sequence length"): with ``g_t = dL/dh_t + a_{t+1} g_{t+1}``,

    dL/db_t = g_t,    dL/da_t = g_t * h_{t-1},    dL/dh0 = a_0 * g_0.

Only ``a`` and the output ``h`` are kept for backward, not the scan's intermediates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_scan", "linear_scan_sequential", "linear_scan_forward", "linear_scan_backward", "CHUNK"]

CHUNK = 16  # steps per chunk; the in-chunk sweep issues CHUNK small ops per recursion level


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: low-precision inputs accumulate in fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _scan_(a: Tensor, h: Tensor, h0: Tensor | None = None, *, reverse: bool = False,
           chunk: int = CHUNK) -> Tensor:
    """Inclusive scan along dim 1, in place in ``h`` (B, T, C) where possible; returns the result.

    Forward: ``h[t] = a[t] h[t-1] + h_in[t]`` with ``h[-1] = h0`` (zero when None).
    Reverse: ``h[t] = a[t] h[t+1] + h_in[t]`` with ``h[T] = 0`` (so ``a[T-1]`` is never read).
    ``a`` is only read; ``h`` must be a scratch buffer the caller owns.
    """
    B, T, C = h.shape
    if T <= chunk:
        if not reverse:
            if h0 is not None:
                h[:, 0].addcmul_(a[:, 0], h0)
            for t in range(1, T):
                h[:, t].addcmul_(a[:, t], h[:, t - 1])
        else:
            for t in range(T - 2, -1, -1):
                h[:, t].addcmul_(a[:, t], h[:, t + 1])
        return h
    if T % chunk:
        # pad the end with a = 0, h = 0: padded steps never feed back into the real ones
        pad = chunk - T % chunk
        out = _scan_(F.pad(a, (0, 0, 0, pad)), F.pad(h, (0, 0, 0, pad)), h0, reverse=reverse, chunk=chunk)
        return out[:, :T]
    n = T // chunk
    a4, h4 = a.reshape(B, n, chunk, C), h.view(B, n, chunk, C)
    if not reverse:
        # 1. every chunk scanned from a zero state, all chunks at once
        for t in range(1, chunk):
            h4[:, :, t].addcmul_(a4[:, :, t], h4[:, :, t - 1])
        decay = torch.cumprod(a4, dim=2)  # (B, n, chunk, C): prod of a from the chunk start to t
        # 2. true state leaving each chunk: a scan over the n chunk carries (recursive)
        carry = _scan_(decay[:, :, -1], h4[:, :, -1].clone(), h0, chunk=chunk)  # (B, n, C)
        # 3. each chunk adds the decayed state it starts from
        h4[:, 1:].addcmul_(decay[:, 1:], carry[:, :-1].unsqueeze(2))
        if h0 is not None:
            h4[:, 0].addcmul_(decay[:, 0], h0.unsqueeze(1))
    else:
        for t in range(chunk - 2, -1, -1):
            h4[:, :, t].addcmul_(a4[:, :, t], h4[:, :, t + 1])
        decay = torch.empty_like(h4)  # prod of a from t to the chunk end (a reversed cumprod)
        decay[:, :, -1].copy_(a4[:, :, -1])
        for t in range(chunk - 2, -1, -1):
            decay[:, :, t] = a4[:, :, t] * decay[:, :, t + 1]
        carry = _scan_(decay[:, :, 0], h4[:, :, 0].clone(), reverse=True, chunk=chunk)  # state at each chunk start
        h4[:, :-1].addcmul_(decay[:, :-1], carry[:, 1:].unsqueeze(2))
    return h


def linear_scan_forward(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """The scan without autograd, for fused autograd functions built on it (the RG-LRU's).

    Returns a fresh (B, T, C) ``h`` in the accumulation dtype (fp32, or fp64 for fp64 inputs).
    """
    acc = _acc_dtype(a.dtype, b.dtype, *(() if h0 is None else (h0.dtype,)))
    h = b.to(acc, memory_format=torch.contiguous_format, copy=True)  # (B, T, C) scratch -> output
    return _scan_(a.to(acc), h, None if h0 is None else h0.to(acc))


def linear_scan_backward(a: Tensor, h: Tensor, h0: Tensor | None, grad_h: Tensor, *,
                         need_a: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Vector-Jacobian product of the scan: ``(grad_b, grad_a, grad_h0)`` in the accumulation dtype.

    ``h`` is the forward output. ``grad_b = g`` with ``g_t = grad_h_t + a_{t+1} g_{t+1}`` (a
    reverse-time scan), ``grad_a_t = g_t h_{t-1}`` and ``grad_h0 = a_0 g_0``. ``grad_a`` is None
    unless ``need_a``, ``grad_h0`` None when ``h0`` is.
    """
    acc = _acc_dtype(a.dtype, grad_h.dtype, h.dtype)
    # the reverse scan's coefficient at t is a_{t+1}; the one at T-1 multiplies nothing
    coef = torch.empty(a.shape, dtype=acc, device=a.device)
    coef[:, :-1].copy_(a[:, 1:])
    coef[:, -1:].zero_()
    g = _scan_(coef, grad_h.to(acc, memory_format=torch.contiguous_format, copy=True), reverse=True)  # (B, T, C)
    grad_a = None
    if need_a:
        grad_a = torch.empty_like(g)
        grad_a[:, 1:] = g[:, 1:] * h[:, :-1]  # slice assignment, not out=: torch.compile traces it
        if h0 is not None:
            grad_a[:, 0] = g[:, 0] * h0
        else:
            grad_a[:, 0].zero_()
    grad_h0 = None if h0 is None else g[:, 0] * a[:, 0]
    return g, grad_a, grad_h0


class _LinearScan(torch.autograd.Function):
    """Chunked scan with a reverse-time chunked scan as its backward (memory-lean)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:  # type: ignore[override]
        out_dtype = torch.result_type(a, b) if h0 is None else torch.promote_types(
            torch.result_type(a, b), h0.dtype)
        h = linear_scan_forward(a, b, h0).to(out_dtype)
        ctx.save_for_backward(a, h, h0)
        ctx.b_dtype = b.dtype
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        a, h, h0 = ctx.saved_tensors
        need_a, need_b, need_h0 = ctx.needs_input_grad
        g, grad_a, grad_h0 = linear_scan_backward(a, h, h0, grad_h, need_a=need_a)
        return (None if grad_a is None else grad_a.to(a.dtype),
                g.to(ctx.b_dtype) if need_b else None,
                grad_h0.to(h0.dtype) if need_h0 and h0 is not None else None)


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` for all t, with ``h_{-1} = h0`` (zeros when None).

    a, b: (B, T, C); h0: (B, C) or None. Returns h: (B, T, C) in the promoted dtype of the inputs
    (so an fp32 ``h0`` with bf16 ``a, b`` gives an fp32 ``h``, whose last step is an exact carry).
    Accumulation is in fp32 (fp64 for fp64 inputs). Chunked parallel scan (no loop over T),
    differentiable wrt a, b and h0 through a reverse-time scan of the same kind.
    """
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(f"linear_scan: a and b must both be (B, T, C), got {tuple(a.shape)} and {tuple(b.shape)}")
    if h0 is not None and h0.shape != (a.shape[0], a.shape[2]):
        raise ValueError(f"linear_scan: h0 must be (B, C) = {(a.shape[0], a.shape[2])}, got {tuple(h0.shape)}")
    return _LinearScan.apply(a, b, h0)


def linear_scan_sequential(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """Reference: the plain loop over time (for tests), same dtype rules as :func:`linear_scan`."""
    out_dtype = torch.result_type(a, b) if h0 is None else torch.promote_types(torch.result_type(a, b), h0.dtype)
    acc = _acc_dtype(a.dtype, b.dtype, *(() if h0 is None else (h0.dtype,)))
    h = torch.zeros(a.shape[0], a.shape[2], dtype=acc, device=a.device) if h0 is None else h0.to(acc)
    out = []
    for t in range(a.shape[1]):
        h = a[:, t].to(acc) * h + b[:, t].to(acc)
        out.append(h)
    return torch.stack(out, dim=1).to(out_dtype)
