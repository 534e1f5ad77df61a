"""Expert-parallel dispatch and combine over a process group: the all-to-all form of ``moe_dispatch`` /
``moe_combine`` (the Megatron / vllm-ascend "all-to-all-v" pattern, docs/ascend.md section 5, option 1).

Rank ``i`` of the group (size ``ep``) owns experts ``[i*E/ep, (i+1)*E/ep)``. Each rank brings its own
tokens ``x [T_i, H]`` with their routing ``ids [T_i, topk]``:

1. ``moe_dispatch`` (registry op) groups the local token copies by expert; experts of one rank are
   contiguous, so the rows for each destination rank are one contiguous block;
2. the per-expert counts are exchanged (``all_to_all_single``, E/ep counts to each rank) and the split
   sizes go to the host (one sync);
3. ``all_to_all_single`` moves the rows (and, if given, their routing weights) with those split sizes;
4. the received rows, ordered by (source rank, expert, token), are regrouped by local expert with
   ``moe_dispatch`` again (top-1 on the local expert id; stable, so inside an expert the order is source
   rank then token: the order of the single-device op on the ranks' tokens concatenated in rank order).

So on rank i, ``x_local`` and ``offsets`` are exactly the rows ``offsets[i*E/ep] : offsets[(i+1)*E/ep]`` of
the single-device ``moe_dispatch`` of all ranks' tokens, bitwise. ``ep_combine`` undoes the regrouping,
sends the rows back with the reverse all-to-all and reduces with ``moe_combine`` (registry op). Ranks that
send or receive nothing (zero-size splits, zero tokens) take part in every collective as usual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["EPHandle", "ep_dispatch", "ep_combine"]


@dataclass
class EPHandle:
    """What ``ep_combine`` needs from the matching ``ep_dispatch``."""

    src: Tensor          # [T*topk] int32: moe_dispatch's src of this rank's tokens
    send: list[int]      # rows sent to each rank of the group
    recv: list[int]      # rows received from each rank of the group
    order: Tensor | None  # [R] int32: x_local[r] = received row order[r] (None: no regrouping needed)
    tokens: int
    topk: int
    group: Any


def _call(ops: Any, name: str, *args: Any) -> Any:
    """A registry op, through the model's OpCaller when given (so its use is recorded), else dsv4rt.ops."""
    if ops is not None:
        return ops.call(name, *args)
    from .. import ops as registry_ops

    return getattr(registry_ops, name)(*args)


def _exchange(x: Tensor, recv: list[int], send: list[int], group: Any) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def ep_dispatch(x: Tensor, ids: Tensor, num_experts: int, group: Any = None, weights: Tensor | None = None,
                ops: Any = None) -> tuple[Tensor, Tensor, Tensor | None, EPHandle]:
    """(x_local [R, H], offsets [E/ep + 1] int32, w_local [R] float32 or None, handle).

    ``x`` [T, H] and ``ids`` [T, topk] int32 are this rank's tokens (T may be 0); ``weights`` [T, topk]
    float32 are carried with the rows when given (``w_local[r]`` = weight of the copy in row r). Rows of
    ``x_local`` are grouped by local expert (``offsets``, the fp4_grouped_gemm layout of this rank's
    ``E/ep`` experts)."""
    ep = dist.get_world_size(group)
    if num_experts % ep:
        raise ValueError(f"ep_dispatch: num_experts {num_experts} is not a multiple of the group size {ep}")
    local = num_experts // ep
    t, topk = ids.shape
    if t:
        xs, offsets, src = _call(ops, "moe_dispatch", x, ids, num_experts)
    else:
        xs, src = x.new_empty((0, x.shape[1])), ids.new_empty((0,))
        offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    got = torch.empty_like(counts)
    dist.all_to_all_single(got, counts, group=group)                  # got[s*local + e]: from rank s, expert e
    sizes = torch.stack([counts.view(ep, local).sum(1), got.view(ep, local).sum(1)]).tolist()  # one host sync
    send, recv = sizes
    x_recv = _exchange(xs, recv, send, group)
    w_recv = None
    if weights is not None:
        w_rows = weights.reshape(-1)[src.long()].float() if t else weights.new_empty((0,), dtype=torch.float32)
        w_recv = _exchange(w_rows, recv, send, group)
    per_expert = got.view(ep, local)
    loc_offsets = torch.zeros(local + 1, dtype=torch.int32, device=x.device)
    loc_offsets[1:] = torch.cumsum(per_expert.sum(0), 0)
    order = None
    if local > 1 and ep > 1 and x_recv.shape[0]:
        expert = torch.arange(local, device=x.device).repeat(ep)
        le = torch.repeat_interleave(expert, per_expert.reshape(-1)).to(torch.int32).view(-1, 1)
        x_recv, loc_offsets, order = _call(ops, "moe_dispatch", x_recv, le, local)
        if w_recv is not None:
            w_recv = w_recv[order.long()]
    handle = EPHandle(src, send, recv, order, t, topk, group)
    return x_recv, loc_offsets, w_recv, handle


def ep_combine(y_local: Tensor, handle: EPHandle, weights: Tensor | None = None, ops: Any = None) -> Tensor:
    """y [T, N] of this rank's tokens: ``y[t] = sum_j w[t, j] * (expert output of copy (t, j))`` (unweighted
    when ``weights`` is None), from the expert outputs ``y_local`` [R, N] in ``ep_dispatch``'s row order."""
    h = handle
    y = y_local
    if h.order is not None:
        y = torch.empty_like(y_local)
        y[h.order.long()] = y_local                       # back to the received order
    back = _exchange(y, h.send, h.recv, h.group)          # the reverse all-to-all: splits swapped
    if h.tokens == 0:
        return back.new_empty((0, y_local.shape[1]))
    return _call(ops, "moe_combine", back, h.src, weights, None if weights is not None else h.topk)
