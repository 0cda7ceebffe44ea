"""The gated delta rule (Yang, Kautz & Hatamizadeh, ICLR 2025, arXiv 2412.06464) in pure torch.

Per value head ``h`` with a (d_k, d_v) state, a decay ``exp(g_t)`` (one scalar per head, or one per key
channel as in Kimi Delta Attention, arXiv 2510.26692) and a write strength ``beta_t``::

    S'_t = diag(exp(g_t)) S_{t-1}                      decay (g_t <= 0, log space)
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T     delta rule: replace what S'_t predicts for k_t
    o_t  = S_t^T q_t

Training uses the chunked form (paper section 3.2; DeltaNet's WY representation, Yang et al. 2024,
arXiv 2406.06484). Inside a chunk of L tokens the updates ``delta_i = beta_i (v_i - S'_i^T k_i)`` solve
one unit lower-triangular system ``(I + A) delta = V_beta - (K_beta * Gamma) S_0`` with
``A_ij = beta_i k_i^T (Gamma_i / Gamma_j) k_j`` (j < i) and ``Gamma_i`` the decay since the chunk start,
so ``delta = U - W S_0`` (the UT transform: ``U``, ``W`` from one triangular solve for the whole chunk).
The output is then a masked attention over the chunk plus a read of the entering state, and the state
passes to the next chunk as ``S = Gamma_L S_0 + (K * Gamma_L / Gamma)^T delta``. Everything except the
chunk-to-chunk hand-over of ``S`` (two small matmuls per chunk) is batched over all chunks.

The UT transform forms ``T = (I + A)^-1`` by one ``torch.linalg.solve_triangular`` against the identity
and applies it by batched matmuls, forward and backward (:class:`_UnitLowerSolve`). On CPU, for 64-token
chunks, that is about 40% less time forward + backward than solving ``[V_beta | K_beta Gamma]`` directly
(whose backward is a second solve), 7x less than inverting row by row with matmuls (the papers' forward
substitution) and 3x less than the doubling product ``prod (I + (-A)^(2^m))``. The chunk-to-chunk loop is
one autograd node too (:class:`_StatePass`): its backward loop runs two small matmuls per chunk and
batches everything else over the chunks.

Shapes (``b`` batch, ``T`` time, ``Hk`` key heads, ``H = Hk R`` value heads, ``dk``/``dv`` head dims)::

    q, k (b, T, Hk, dk)   v (b, T, H, dv)   g (b, T, H) or (b, T, H, dk)   beta (b, T, H)
    state (b, H, dk, dv), fp32 (fp64 for fp64 inputs)

Value head ``h`` reads key head ``h // R`` (transformers' ``repeat_interleave`` of Qwen3-Next). q and k
arrive normalised and q scaled (the mixer's job); the kernel is the recurrence alone.

Packed documents (``seq_idx`` (b, T), non-decreasing document numbers, as :mod:`amer.ops.ssd` takes
them): a document start behaves as ``exp(g) = 0``, cutting the state. Every decay factor that would
cross a boundary is multiplied by a 0/1 "same document" mask instead, so shapes stay static.

Per-channel decays make ``Gamma_i / Gamma_j`` a vector, and the factorisation
``(k_i Gamma_i) . (k_j / Gamma_j)`` overflows once the decay over a chunk passes exp(-88). The
pairwise products are therefore taken against a reference point between j and i: within a sub-chunk
of 16 tokens as an explicit (16, 16, dk) product, across sub-chunks through the boundary of i's
sub-chunk, where both factors are decays (<= 1) (fla's KDA kernels split chunks the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["delta_rule_chunked", "delta_rule_step"]

# exp of log-decays below this floor is taken as exp(floor) ~ 1e-26: no fp32 difference against the
# undecayed terms, and no subnormals (which slow every later multiply on CPUs), as in amer.ops.ssd.
_LOG_DECAY_FLOOR = -60.0
SUB_CHUNK = 16  # sub-chunk of the per-channel pairwise decays (explicit (s, s, dk) products inside)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _exp(log_decay: Tensor) -> Tensor:
    """exp of a log-decay that should be <= 0, clamped to [floor, 0]: positions where it is not (the
    upper triangle, masked later) stay finite."""
    return torch.exp(log_decay.clamp(_LOG_DECAY_FLOOR, 0.0))


def _reduce_to(t: Tensor, like: Tensor) -> Tensor:
    """Sum ``t`` over the axes where ``like`` was broadcast (size 1), keeping them."""
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, like.shape)) if b == 1 and a != 1)
    return t.sum(dims, keepdim=True) if dims else t


class _HeadScores(torch.autograd.Function):
    """The two (L, L) score matrices of a chunk under a per-head decay, one autograd node:

        E = exp(G_i - G_j) * mask,   A = beta_i (k_i . k_j) E,   P = (q_i . k_j) E

    kk = K K^T and qk = Q K^T (..., 1, L, L) are shared by the R value heads of a key head; G (..., R, L),
    beta (..., R, L, 1), mask 0/1 (causal, same document). Autograd through the composite would store and
    revisit the (L, L)-per-head decay several times (sub, clamp, exp, mask, two products); here it is built
    in place once, saved, and the backward is a few elementwise passes and reductions:
    ``d(E)/dG_i = sum_j M_ij - sum_j M_ji`` with ``M = (dA beta kk + dP qk) E``.
    """

    @staticmethod
    def forward(ctx, kk: Tensor, qk: Tensor, G: Tensor, beta: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        E = (G.unsqueeze(-1) - G.unsqueeze(-2)).clamp_(_LOG_DECAY_FLOOR, 0.0).exp_().mul_(mask)
        ctx.save_for_backward(kk, qk, E, beta)
        return kk * E * beta, qk * E

    @staticmethod
    def backward(ctx, gA: Tensor, gP: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        kk, qk, E, beta = ctx.saved_tensors
        gAE = gA * E
        d_kk = _reduce_to(gAE * beta, kk)
        gakk = gAE.mul_(kk)  # gA kk E
        d_beta = gakk.sum(-1, keepdim=True)
        gPE = gP * E
        d_qk = _reduce_to(gPE, qk)
        M = gakk.mul_(beta).addcmul_(gPE, qk)  # d loss / d log E (gPE may be d_qk itself: not written)
        d_G = M.sum(-1) - M.sum(-2)
        return d_kk, d_qk, d_G, d_beta, None


class _SubChunkScores(torch.autograd.Function):
    """Scores of the pairs inside each sub-chunk under per-channel decays, one autograd node:

        Ek_ij = exp(G_i - G_j) * k_j   (..., n, s, s, dk),   Sk_ij = k_i . Ek_ij,   Sq_ij = q_i . Ek_ij

    The (s, s, dk) decays per sub-chunk are the largest tensors of the per-channel scan; autograd through
    the composite stores and revisits them about twenty-five times. Here Ek and the decays are built in
    place, both scores come from one batched product, and the backward reads them a handful of times.
    Pairs j > i get exp(0) (finite; the caller masks them).
    """

    @staticmethod
    def forward(ctx, k: Tensor, q: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        E = (G.unsqueeze(-2) - G.unsqueeze(-3)).clamp_(_LOG_DECAY_FLOOR, 0.0).exp_()  # (..., n, s, s, dk)
        Ek = E * k.unsqueeze(-3)
        x = torch.stack([k, q], dim=-1)  # (..., n, s, dk, 2)
        scores = torch.matmul(Ek, x)  # (..., n, s, s, 2): row i of Ek against x_i
        ctx.save_for_backward(x, E, Ek)
        return scores[..., 0], scores[..., 1]

    @staticmethod
    def backward(ctx, gk: Tensor, gq: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        x, E, Ek = ctx.saved_tensors
        g = torch.stack([gk, gq], dim=-1)  # (..., n, s, s, 2)
        dx = torch.matmul(g.transpose(-1, -2), Ek)  # (..., n, s, 2, dk): sum_j g_ij Ek_ij, the left operands
        dEk = torch.matmul(g, x.transpose(-1, -2))  # (..., n, s, s, dk): g_ij x_i
        dk = dx[..., 0, :] + (dEk * E).sum(-3)  # left operand, plus k_j inside Ek
        dlogE = dEk.mul_(Ek)  # d loss / d log E
        dG = dlogE.sum(-2) - dlogE.sum(-3)
        return dk, dx[..., 1, :], dG


class _UnitLowerSolve(torch.autograd.Function):
    """``Y = (I + A)^-1 X`` for each right-hand side X, A (..., L, L) read strictly below the diagonal.

    ``T = (I + A)^-1`` is formed once (a solve against the identity: L columns rather than the (dk + dv) of
    the right-hand sides) and applied by matmuls; the backward is matmuls as well, ``dX = T^T dY`` and
    ``dA = -sum dX Y^T`` strictly below the diagonal, where autograd through ``solve_triangular`` runs a
    second solve.
    """

    @staticmethod
    def forward(ctx, A: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
        T = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
        ys = tuple(torch.matmul(T, x) for x in xs)
        ctx.save_for_backward(T, *ys)
        return ys

    @staticmethod
    def backward(ctx, *gys: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        T, *ys = ctx.saved_tensors
        dxs = [torch.matmul(T.transpose(-1, -2), g) for g in gys]
        dA = None
        if ctx.needs_input_grad[0]:
            for dx, y in zip(dxs, ys):
                term = torch.matmul(dx, y.transpose(-1, -2))
                dA = term if dA is None else dA.add_(term)
            dA = dA.neg_().tril_(-1)
        return (dA, *(dx if need else None for dx, need in zip(dxs, ctx.needs_input_grad[1:])))


class _StatePass(torch.autograd.Function):
    """The chunk-to-chunk hand-over, for chunks n along dim 1, as one autograd node::

        delta_n = U_n - W_n S_n,    S_{n+1} = K_n^T delta_n + carry_n S_n

    Returns the state entering each chunk (b, c, ..., dk, dv), every delta and the final state. Autograd
    through the loop would record four matmuls per chunk and copy each chunk's slices in and out; here
    the backward loop carries only the state's gradient (two matmuls per chunk) and takes dU, dW, dK and
    d carry afterwards, batched over all chunks.
    """

    @staticmethod
    def forward(ctx, U: Tensor, W: Tensor, K: Tensor, carry: Tensor, S0: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        c = U.shape[1]
        prev = S0.new_empty(S0.shape[:1] + (c,) + S0.shape[1:])
        delta = torch.empty_like(U)
        S = S0
        for n in range(c):
            prev[:, n] = S
            d = U[:, n] - torch.matmul(W[:, n], S)
            delta[:, n] = d
            S = torch.matmul(K[:, n].transpose(-1, -2), d).addcmul_(carry[:, n], S)
        ctx.save_for_backward(W, K, carry, prev, delta)
        return prev, delta, S

    @staticmethod
    def backward(ctx, d_prev: Tensor, d_delta: Tensor, dS: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        W, K, carry, prev, delta = ctx.saved_tensors
        dd = torch.empty_like(d_delta)  # d loss / d delta_n, through every path
        d_next = torch.empty_like(prev)  # d loss / d S_{n+1}
        for n in reversed(range(W.shape[1])):
            d_next[:, n] = dS
            dd_n = torch.matmul(K[:, n], dS).add_(d_delta[:, n])
            dd[:, n] = dd_n
            dS = (carry[:, n] * dS).add_(d_prev[:, n]).sub_(torch.matmul(W[:, n].transpose(-1, -2), dd_n))
        need = ctx.needs_input_grad
        dW = torch.matmul(dd, prev.transpose(-1, -2)).neg_() if need[1] else None
        dK = torch.matmul(delta, d_next.transpose(-1, -2)) if need[2] else None
        d_carry = _reduce_to(d_next * prev, carry) if need[3] else None
        return dd if need[0] else None, dW, dK, d_carry, dS if need[4] else None


def _channel_scores(k: Tensor, q: Tensor, G: Tensor, mask: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """``sum_c x_i[c] k_j[c] exp(G_i[c] - G_j[c])`` masked, for x = k and x = q, without overflow.

    k, q, G (..., L, dk) with L a multiple of ``s``. Pairs in one sub-chunk: explicit (s, s, dk) decays
    (:class:`_SubChunkScores`). Pairs (i, j) in sub-chunks I > J: factored at ``r = I s - 1`` (j <= r < i)
    as ``(x_i exp(G_i - G_r)) . (k_j exp(G_r - G_j))``, one (s, dk) x (dk, L) matmul per sub-chunk I,
    both factors decays <= 1. The decays and the right factor serve both scores."""
    *lead, L, _ = k.shape
    n = L // s
    ks, qs, Gs = (t.unflatten(-2, (n, s)) for t in (k, q, G))  # (..., n, s, dk)
    eye = torch.eye(n, dtype=k.dtype, device=k.device).view(n, 1, n, 1)
    scores = [(d.unsqueeze(-2) * eye).reshape(*lead, L, L) for d in _SubChunkScores.apply(ks, qs, Gs)]
    if n > 1:
        Gr = Gs[..., :-1, -1:, :]  # (..., n-1, 1, dk): reference r_I for sub-chunks I = 1..n-1
        to_r = _exp(Gs[..., 1:, :, :] - Gr)  # (..., n-1, s, dk)
        right = k.unsqueeze(-3) * _exp(Gr - G.unsqueeze(-3))  # (..., n-1, L, dk); j > r clamped, masked below
        blocks = torch.arange(L, device=k.device) // s
        before = (blocks[None, :] < blocks[s:, None]).to(k.dtype)  # (L - s, L): j's sub-chunk before i's
        for i, x in enumerate((ks, qs)):
            off = torch.matmul(x[..., 1:, :, :] * to_r, right.transpose(-1, -2))  # (..., n-1, s, L)
            scores[i] = scores[i] + F.pad(off.reshape(*lead, L - s, L) * before, (0, 0, s, 0))
    return scores[0] * mask, scores[1] * mask


class _Docs:
    """0/1 masks of a chunked layout that cut every decay across a document start (see amer.ops.ssd's
    ``_DocumentMasks``; the same masks, shaped for the delta rule's terms). ``ends[n]`` is the document
    of the state entering chunk n (the row's first document for the initial state)."""

    def __init__(self, seq_idx: Tensor, b: int, c: int, L: int, dtype: torch.dtype) -> None:
        s = seq_idx.view(b, c, L)
        ends = torch.cat([s[:, :1, 0], s[:, :, -1]], dim=1)  # (b, c + 1)
        # (b, c, 1, 1, L, L) etc.: broadcast over (Hk, R)
        self.pair = (s[..., :, None] == s[..., None, :]).to(dtype)[:, :, None, None]
        self.segment = self.pair.tril()  # (b, c, 1, 1, L, L): j <= i in i's document
        self.from_start = (s == ends[:, :-1, None]).to(dtype)[:, :, None, None]  # (b, c, 1, 1, L)
        self.to_end = (s == s[..., -1:]).to(dtype)[:, :, None, None]  # (b, c, 1, 1, L)
        self.carry = (ends[:, 1:] == ends[:, :-1]).to(dtype)[:, :, None, None]  # (b, c, 1, 1)


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, chunk_size: int,
                       initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule over a sequence, chunk by chunk (module docstring for shapes and maths).

    ``g`` (b, T, H) is a per-head decay, (b, T, H, dk) a per-channel one. Returns o (b, T, H, dv) in v's
    dtype and the final state (b, H, dk, dv) in the accumulation dtype (fp32 at least).
    """
    b, T, Hk, dk = k.shape
    H, dv = v.shape[-2:]
    if H % Hk:
        raise ValueError(f"delta rule: value heads ({H}) must be a multiple of key heads ({Hk})")
    R = H // Hk
    channel = g.dim() == 4
    out_dtype, acc = v.dtype, _acc_dtype(v.dtype)
    if T == 0:  # nothing to scan: the state passes through
        S = torch.zeros(b, H, dk, dv, dtype=acc, device=v.device) if initial_state is None else initial_state.to(acc)
        return v.new_zeros(b, 0, H, dv), S
    L = min(chunk_size, T)
    if channel and L > SUB_CHUNK and L % SUB_CHUNK:
        L = L - L % SUB_CHUNK  # sub-chunks tile the chunk
    s = SUB_CHUNK if channel and L % SUB_CHUNK == 0 else L
    pad = (-T) % L
    q, k, v, g, beta = (t.to(acc) for t in (q, k, v, g, beta))
    if pad:
        # padded steps: g = 0 (no decay), beta = 0 (no write), so the final state is untouched
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g = F.pad(g, (0, 0) * (g.dim() - 2) + (0, pad))
        beta = F.pad(beta, (0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    c = (T + pad) // L
    docs = None if seq_idx is None else _Docs(seq_idx, b, c, L, acc)

    # chunked layouts: (b, c, Hk, R, L, .) per value head, (b, c, Hk, 1, L, dk) for the shared q and k
    qc = q.view(b, c, L, Hk, 1, dk).permute(0, 1, 3, 4, 2, 5)
    kc = k.view(b, c, L, Hk, 1, dk).permute(0, 1, 3, 4, 2, 5)
    vc = v.view(b, c, L, Hk, R, dv).permute(0, 1, 3, 4, 2, 5)
    bc = beta.view(b, c, L, Hk, R).permute(0, 1, 3, 4, 2).unsqueeze(-1)  # (b, c, Hk, R, L, 1)
    gc = (g.view(b, c, L, Hk, R, dk).permute(0, 1, 3, 4, 2, 5) if channel
          else g.view(b, c, L, Hk, R, 1).permute(0, 1, 3, 4, 2, 5))  # (b, c, Hk, R, L, dk or 1)
    # log-decay since the chunk start (since the document start in packed rows: a product with the
    # same-document causal mask, so no other document's gates enter even the rounding of a sum)
    G = gc.cumsum(-2) if docs is None else torch.matmul(docs.segment, gc)
    if not channel:
        G = G.squeeze(-1)  # (b, c, Hk, R, L)
    G_end = G[..., -1:, :] if channel else G[..., -1:]

    # causal (diagonal included) and same-document pairs; A's diagonal is never read (unit triangular solve)
    mask = torch.ones(L, L, dtype=acc, device=v.device).tril()
    if docs is not None:
        mask = mask * docs.pair
    if channel:
        kA, attn = _channel_scores(kc.expand(b, c, Hk, R, L, dk), qc.expand(b, c, Hk, R, L, dk), G, mask, s)
        A = kA * bc  # (b, c, Hk, R, L, L)
        decay_in = _exp(G)  # (b, c, Hk, R, L, dk): decay from the chunk start, per channel
        decay_out = _exp(G_end - G)  # (b, c, Hk, R, L, dk): decay to the chunk end
        carry = _exp(G_end).transpose(-1, -2)  # (b, c, Hk, R, dk, 1): scales rows of S
    else:
        kk = torch.matmul(kc, kc.transpose(-1, -2))  # (b, c, Hk, 1, L, L), shared by the R value heads
        qk = torch.matmul(qc, kc.transpose(-1, -2))
        A, attn = _HeadScores.apply(kk, qk, G, bc, mask)
        decay_in = _exp(G).unsqueeze(-1)  # (b, c, Hk, R, L, 1)
        decay_out = _exp(G_end - G).unsqueeze(-1)
        carry = _exp(G_end).unsqueeze(-1)  # (b, c, Hk, R, 1, 1)
    if docs is not None:
        decay_in = decay_in * docs.from_start.unsqueeze(-1)
        decay_out = decay_out * docs.to_end.unsqueeze(-1)
        carry = carry * docs.carry.unsqueeze(-1).unsqueeze(-1)

    # UT transform: U = T V_beta and W = T (K_beta Gamma), T = (I + A)^-1 (A read below the diagonal)
    U, W = _UnitLowerSolve.apply(A, vc * bc, kc * (bc * decay_in))  # (b, c, Hk, R, L, dv) and (..., dk)
    k_out = kc * decay_out  # (b, c, Hk, R, L, dk): keys decayed to the chunk end

    # the only sequential part: the state handed from chunk to chunk; prev (b, c, Hk, R, dk, dv) is the
    # state entering each chunk, delta (b, c, Hk, R, L, dv)
    S = (torch.zeros(b, Hk, R, dk, dv, dtype=acc, device=v.device) if initial_state is None
         else initial_state.to(acc).view(b, Hk, R, dk, dv))
    prev, delta, S = _StatePass.apply(U, W, k_out, carry, S)

    # outputs of all chunks at once: the read of the entering state plus the masked intra-chunk attention
    o = torch.matmul(qc * decay_in, prev) + torch.matmul(attn, delta)  # (b, c, Hk, R, L, dv)
    o = o.permute(0, 1, 4, 2, 3, 5).reshape(b, c * L, H, dv)
    if pad:
        o = o[:, :T]
    return o.to(out_dtype), S.reshape(b, H, dk, dv)


def delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token (decoding), O(1) in the context length: q, k (b, Hk, dk), v (b, H, dv), g (b, H) or
    (b, H, dk), beta (b, H), state (b, H, dk, dv). Returns o (b, H, dv) in v's dtype and the new state
    in the accumulation dtype."""
    Hk, H = k.shape[1], v.shape[1]
    acc = _acc_dtype(torch.promote_types(v.dtype, state.dtype))
    R = H // Hk
    q = q.to(acc).repeat_interleave(R, dim=1) if R > 1 else q.to(acc)
    k = k.to(acc).repeat_interleave(R, dim=1) if R > 1 else k.to(acc)
    decay = torch.exp(g.to(acc))
    S = state.to(acc) * (decay.unsqueeze(-1) if g.dim() == 3 else decay[..., None, None])  # (b, H, dk, dv)
    pred = torch.matmul(k.unsqueeze(-2), S).squeeze(-2)  # (b, H, dv): S'^T k
    delta = (v.to(acc) - pred) * beta.to(acc).unsqueeze(-1)
    S = S + k.unsqueeze(-1) * delta.unsqueeze(-2)
    o = torch.matmul(q.unsqueeze(-2), S).squeeze(-2)
    return o.to(v.dtype), S
