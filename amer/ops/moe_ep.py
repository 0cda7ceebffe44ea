"""Expert-parallel MoE dispatch: the experts of one layer live on the ``ep`` ranks of a process group, rank ``r``
holding experts ``r * E_l : (r + 1) * E_l`` (``E_l = E / ep``), and tokens travel to them by all-to-all
(GShard, Lepikhin et al. 2020, arXiv 2006.16668; DeepSpeed-MoE, Rajbhandari et al. 2022, arXiv 2201.05596).

Routing is unchanged and stays on the token's rank (the router, the load statistics and the capacity rule
are exactly one process's); only the expert computation moves. Both dispatches of :mod:`amer.ops.moe` have an
expert-parallel form here:

* :func:`dropless_ep` - the token-slots, sorted by expert as :func:`amer.ops.moe.dispatch_dropless` sorts them,
  are already grouped by the rank that owns their expert: the slot counts go out first (one small
  all-to-all), then the rows (an all-to-all with those split sizes); each rank regroups what it received by
  local expert, runs :func:`~amer.ops.moe.grouped_swiglu` (with the block's activation), and the results travel
  back the same way.
* :func:`padded_ep` - the capacity dispatch's ``(E, R, D)`` expert buffer has the same shape on every rank, so
  one all-to-all with equal splits sends each rank the rows of its experts from every rank: static shapes.

Both all-to-alls are ``torch.distributed.nn.functional.all_to_all_single``, whose backward is the reverse
all-to-all: a token's gradient comes home from the rank that ran its expert, and an expert's weight
gradient sums the contributions of every rank's tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
from torch import Tensor

from amer.ops.moe import grouped_swiglu, swiglu_expert

__all__ = ["dropless_ep", "padded_ep"]

# Tests flip this to show that the all-to-all's backward is what brings the tokens' gradients home (the
# negative control of the gradient-parity check).
_RETURN_GRADIENTS = True


def _home(t: Tensor) -> Tensor:
    return t if _RETURN_GRADIENTS else t.detach()


def _regroup(recv: Tensor) -> Tensor:
    """Rows received as (source rank, local expert) blocks of ``recv[r, e]`` rows -> the permutation that
    orders them (local expert, source rank), so each local expert's rows are contiguous."""
    lens = recv.reshape(-1)
    starts = torch.cumsum(lens, 0) - lens  # start of block (r, e) in arrival order
    lens_t, starts_t = recv.t().reshape(-1), starts.reshape(recv.shape).t().reshape(-1)  # in (e, r) order
    total = int(lens.sum())
    offsets = torch.cumsum(lens_t, 0) - lens_t
    return torch.repeat_interleave(starts_t - offsets, lens_t, output_size=total) + torch.arange(total)


def dropless_ep(x: Tensor, expert_idx: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor,
                act: str = "silu", *, n_experts: int, group: Any) -> Tensor:
    """Dropless top-k dispatch with the experts split over ``group``: ``y[n] = sum_j weights[n, j] *
    expert_{expert_idx[n, j]}(x[n])``, the same as :func:`amer.ops.moe.dispatch_dropless` with every expert here.

    x (..., D); expert_idx, weights (..., k) (global expert ids); w_gate_up (E_l, D, 2F) (ungated ``act``:
    (E_l, D, F)) and w_down (E_l, F, D): this rank's experts; ``act`` their activation.
    """
    ep = dist.get_world_size(group)
    e_local = n_experts // ep
    D = x.shape[-1]
    xf = x.reshape(-1, D)
    k = expert_idx.shape[-1]
    flat_e = expert_idx.reshape(-1)
    w = weights.reshape(-1).to(x.dtype)
    sorted_e, order = torch.sort(flat_e, stable=True)  # slots grouped by expert, hence by owning rank
    token = order // k
    counts = torch.bincount(sorted_e, minlength=n_experts)  # (E,)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)  # recv[r * E_l + e]: slots rank r sends to my expert e
    recv = recv.reshape(ep, e_local)
    send_splits = counts.reshape(ep, e_local).sum(1).tolist()  # host reads: the split sizes
    recv_splits = recv.sum(1).tolist()
    xs = xf.index_select(0, token)
    got = dnn.all_to_all_single(xs.new_empty(sum(recv_splits), D), xs, recv_splits, send_splits, group=group)
    perm = _regroup(recv.cpu()).to(x.device)
    ys = grouped_swiglu(got.index_select(0, perm), w_gate_up, w_down, recv.sum(0).tolist(), act)
    ys = ys.index_select(0, torch.argsort(perm))  # back to arrival order
    back = _home(dnn.all_to_all_single(ys.new_empty(xs.shape[0], D), ys, send_splits, recv_splits, group=group))
    back = back * w.index_select(0, order).unsqueeze(-1)
    y = xf.new_zeros(xf.shape[0], D, dtype=back.dtype).index_add_(0, token, back)
    return y.reshape(x.shape)


def padded_ep(buf: Tensor, w_gate_up: Tensor, w_down: Tensor, act: str = "silu", *, group: Any) -> Tensor:
    """The experts of a static ``(E, R, D)`` buffer (expert ``e``'s rows in ``buf[e]``) with the experts split
    over ``group``; returns the ``(E, R, D)`` outputs, as ``swiglu_expert(buf, all experts' weights, act)``."""
    ep = dist.get_world_size(group)
    E, R, D = buf.shape
    e_local = E // ep
    flat = buf.reshape(E * R, D).contiguous()
    got = dnn.all_to_all_single(torch.empty_like(flat), flat, group=group)  # (ep * E_l * R, D): (src, e, r)
    local = got.reshape(ep, e_local, R, D).transpose(0, 1).reshape(e_local, ep * R, D)
    out = swiglu_expert(local, w_gate_up.to(buf.dtype), w_down.to(buf.dtype), act)  # (E_l, ep R, D)
    out = out.reshape(e_local, ep, R, D).transpose(0, 1).reshape(E * R, D).contiguous()
    back = _home(dnn.all_to_all_single(torch.empty_like(out), out, group=group))
    return back.reshape(E, R, D)
