"""The expert-parallel MoE layer.

Tokens arrive replicated on every rank of the EP group (attention is replicated or tensor-parallel, and
both leave every rank with all tokens). Rank ``i`` takes its slice ``split_range(T, ep, i)`` of them, routes
it (``moe_route``), sends the token copies to the experts' owners (:func:`ep_dispatch`), runs its own
experts on what it receives (``fp4_grouped_gemm`` over its local experts, SwiGLU scaled by the routing
weight that travelled with each row), gets its tokens' expert outputs back (:func:`ep_combine`), adds the
shared expert (replicated weights, computed on its slice only) and all-gathers the slices, so every rank
leaves with all T tokens again. Per layer: 3 all-to-alls (counts, rows + weights, rows back; the weights
are a 4th, small one) and 1 all-gather. A rank whose slice is empty (decode with T < ep), or whose experts
receive no row, takes part with zero-size splits.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .ep import ep_combine, ep_dispatch
from .layout import split_range

__all__ = ["ep_moe_forward", "gather_rows"]


def gather_rows(y: Tensor, total: int, parts: int, group: Any = None) -> Tensor:
    """Every rank's slice ``split_range(total, parts, i)`` of rows -> all ``total`` rows on every rank."""
    chunk = -(-total // parts)
    pad = y.new_zeros((chunk, *y.shape[1:]))
    pad[:y.shape[0]] = y
    out = [torch.empty_like(pad) for _ in range(parts)]
    dist.all_gather(out, pad, group=group)
    return torch.cat([o[:b - a] for o, (a, b) in zip(out, (split_range(total, parts, i) for i in range(parts)))])


def ep_moe_forward(moe: Any, ops: Any, x: Tensor, token_ids: Tensor, ep: int, ep_rank: int,
                   group: Any = None) -> Tensor:
    """``moe(x, token_ids)`` of a :class:`dsv4rt.model.moe.MoE` that holds experts
    ``ep_rank * E/ep ..`` only; x [T, dim] replicated over the group -> [T, dim] on every rank."""
    t = x.shape[0]
    a, b = split_range(t, ep, ep_rank)
    xl, tl = x[a:b], token_ids[a:b]
    if b > a:
        ids, weights = moe.route(ops, xl, tl)
    else:
        ids = torch.empty((0, moe.topk), dtype=torch.int32, device=x.device)
        weights = torch.empty((0, moe.topk), dtype=torch.float32, device=x.device)
    xs, offsets, w_rows, handle = ep_dispatch(xl, ids, moe.n_experts, group, weights, ops)
    # expert rows travel back in fp32 and are summed in fp32 until the shared expert is added: one rounding,
    # as the one-process layer and the release (which all-reduces its fp32 partial sums)
    if xs.shape[0]:
        ys = moe.expert_rows(ops, xs, offsets, w_rows).float()
    else:
        ys = torch.empty((0, x.shape[1]), dtype=torch.float32, device=x.device)
    y = ep_combine(ys, handle, None, ops)
    y = moe.add_shared(ops, xl, y) if b > a else y.to(x.dtype)
    return gather_rows(y, t, ep, group)
