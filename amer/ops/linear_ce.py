"""Fused, chunked LM head + cross-entropy: the loss of ``softcap(scale * h @ W^T)`` against the targets
without ever holding the full (tokens, vocabulary) logits.

With a real vocabulary the logits are the largest tensors of a training step: at vocabulary 32,768 every
token costs 128 KiB of fp32 logits, and the plain path keeps three such tensors alive at once (the logits,
their fp32 copy or log-softmax saved for backward, and the gradient). Here the tokens are cut into chunks;
each chunk's logits are computed, turned into its share of the loss *and* of the gradients with respect
to the hidden states and the head weight, and dropped before the next chunk. Computing the gradients in
the forward pass (as Liger Kernel's fused linear cross-entropy does: Hsu et al., 2024,
arXiv:2410.10989) costs no extra matmul: the three GEMMs of the plain path (logits, d hidden, d weight)
are done once each, chunk by chunk; backward only scales the stored gradients by the incoming one.

The logit transform follows :func:`amer.model.final_logits`: ``z = scale * logits``, then
``c * tanh(z / c)`` when a soft cap ``c`` is set (Gemma 2). The loss is the mean over the targets that are
not ``ignore_index`` (NaN when there are none, like ``F.cross_entropy``). Pure torch, no data-dependent
shapes and no host read-back, so the same code runs eagerly, under ``torch.compile`` and on XLA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy", "chunk_rows"]

# fp32 elements in one chunk of logits (16 MiB), yet at least MIN_CHUNK_ROWS tokens: each chunk's GEMMs read
# the whole (V, D) weight and its gradient, so a chunk needs enough rows to pay that back. Head + loss, forward
# and backward, 2,048 tokens on a 2-core AMD EPYC: at vocabulary 8,192, 128 / 256 / 512 / 1,024 rows took 235 /
# 203 / 200 / 209 ms; at 32,768 (width 384), 1,369 / 1,281 / 1,198 / 1,151 ms. (A 2-core Xeon preferred 4 MiB
# chunks, 0.73x the time of 16 MiB at 8,192; the memory a chunk holds is the other side of the trade.)
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_ROWS = 256


def chunk_rows(n_tokens: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: as many as keep one chunk's logits within ``elements``, at least ``MIN_CHUNK_ROWS``
    (and at least 1, at most ``n_tokens``)."""
    return max(1, min(n_tokens, max(MIN_CHUNK_ROWS, elements // max(vocab, 1))))


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, logit_scale: float = 1.0,
                         logit_softcap: float | None = None, ignore_index: int = -100,
                         dtype: torch.dtype | None = None, chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of ``final_logits(hidden @ weight.T)`` against ``targets``, in fp32.

    ``hidden`` (..., D), ``weight`` (V, D), ``targets`` (...) with the leading shape of ``hidden``.
    ``dtype``: the head matmul's compute dtype (the autocast dtype the model ran under; default
    ``hidden``'s); logits are taken to fp32 before the transform and the softmax. ``chunk``: tokens per
    chunk (default :func:`chunk_rows`). Gradients reach ``hidden`` and ``weight`` (a tied embedding gets
    its head gradient added to its own by autograd).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden {tuple(hidden.shape)} without its last dim")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (vocabulary, {hidden.shape[-1]})")
    h = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk if chunk is not None else chunk_rows(h.shape[0], weight.shape[0])
    return _LinearCE.apply(h, weight, targets.reshape(-1), float(logit_scale),
                           None if logit_softcap is None else float(logit_softcap), int(ignore_index),
                           dtype or hidden.dtype, max(1, int(rows)))


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, w: Tensor, targets: Tensor, scale: float, softcap: float | None,
                ignore_index: int, dtype: torch.dtype, rows: int) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            loss, grad_h, grad_w = _chunked(h, w, targets, scale, softcap, ignore_index, dtype, rows, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = None if grad_h is None else (grad_h * grad_out).to(h_dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        return gh, gw, None, None, None, None, None, None


def _chunked(h: Tensor, w: Tensor, targets: Tensor, scale: float, softcap: float | None, ignore_index: int,
             dtype: torch.dtype, rows: int, need_h: bool, need_w: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Loss (fp32 scalar) and, when asked, d loss / d h (fp32, h's shape) and d loss / d w (fp32, w's shape).

    Per chunk: ``log p = log_softmax(z)`` (one fused pass; the loss gathers it at the targets), then in place
    ``d z = p - onehot(target)``; back through the soft cap (``1 - tanh^2``); then ``d h = d logits @ W`` and
    ``d W += d logits^T @ h``. Each token's share of the mean (``valid / n``) and the logit scale are per-row
    factors, so they scale the (rows, D) side of those products, never the (rows, V) chunk."""
    n_tok = h.shape[0]
    acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (the parity tests)
    valid = targets != ignore_index
    n_valid = valid.sum().to(acc)  # a tensor: no read-back (XLA, compile)
    safe = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(1)  # ignored rows gather column 0
    row_w = valid.to(acc) / n_valid.clamp(min=1.0)  # per-token share of the mean
    if scale != 1.0:
        row_w = row_w * scale  # d (scale * logits) / d logits, folded into the same per-row factor
    row_w = row_w.unsqueeze(1)
    wc = w.to(dtype)
    fp32_grad_w = dtype == acc
    loss = torch.zeros((), dtype=acc, device=h.device)
    grad_h = torch.empty(h.shape, dtype=acc, device=h.device) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
    for s in range(0, n_tok, rows):
        e = min(s + rows, n_tok)
        hc = h[s:e].to(dtype)
        z = (hc @ wc.t()).to(acc)  # (rows, V): the only logits alive at a time
        if scale != 1.0:
            z.mul_(scale)
        t = None
        if softcap is not None:
            t = torch.tanh(z.div_(softcap))
            z = torch.mul(t, softcap)
        logp = torch.log_softmax(z, dim=1)
        del z
        tgt = safe[s:e]
        loss = loss - (logp.gather(1, tgt).squeeze(1) * valid[s:e]).sum()
        if not (need_h or need_w):
            continue
        g = logp.exp_()  # softmax, in place
        g.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=g.dtype))
        if t is not None:
            g.mul_(t.square_().neg_().add_(1.0))  # d (c tanh(z/c)) / dz = 1 - tanh^2
            del t
        gd = g if fp32_grad_w else g.to(dtype)
        rw = row_w[s:e]
        if grad_h is not None:
            if fp32_grad_w:
                torch.mm(gd, wc, out=grad_h[s:e])
                grad_h[s:e].mul_(rw)
            else:
                grad_h[s:e] = (gd @ wc).to(acc).mul_(rw)
        if grad_w is not None:
            hw = hc * rw.to(hc.dtype) if fp32_grad_w else (hc.to(acc) * rw).to(dtype)
            if fp32_grad_w:
                grad_w.addmm_(gd.t(), hw)
            else:
                grad_w.add_((gd.t() @ hw).to(acc))
    return loss / n_valid, grad_h, grad_w
