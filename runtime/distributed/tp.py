"""Tensor-parallel pieces that are not a plain all-reduce (spec 9.4): the vocab-parallel embedding and head,
and the lightning indexer split over its heads.

The indexer score is a sum over heads, ``score[t] = sum_h w[h] * relu(q[h] . k[t])``, and top-k is not: each
rank computes the fp32 partial score of its heads over every key, the partials are all-reduced (summed)
BEFORE the top-k, and each rank then takes the same top-k locally with the ``indexer_topk`` contract's
semantics (keys ``t >= visible`` never chosen; ``-1`` in the slots beyond ``min(topk, visible)``). The
registry op cannot be used for the partial step: it returns only its own top-k, never the full score row.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["vocab_parallel_embed", "gather_vocab", "indexer_partial_scores", "topk_from_scores", "indexer_topk"]


def vocab_parallel_embed(table: Tensor, ids: Tensor, part: tuple[int, int], group: Any = None) -> Tensor:
    """Rows ``ids`` of the embedding whose rows ``part = [a, b)`` this rank holds (``table`` [b - a, dim]):
    each rank fills the ids it owns, zeros elsewhere, then an all-reduce (sum) over the group. Exactly one
    rank contributes each row, so the sum is exact in any dtype."""
    a, b = part
    mine = (ids >= a) & (ids < b)
    local = torch.where(mine, ids - a, torch.zeros_like(ids))
    out = table[local] if table.shape[0] else table.new_zeros((ids.shape[0], table.shape[1]))
    out = out * mine.unsqueeze(-1).to(out.dtype)
    dist.all_reduce(out, group=group)
    return out


def gather_vocab(logits: Tensor, vocab: int, tp: int, group: Any = None) -> Tensor:
    """Logits over this rank's vocabulary part ``[..., V_local]`` -> all ``[..., vocab]`` on every rank (an
    all-gather; parts are padded to ``ceil(vocab / tp)`` columns, as :func:`split_range` cuts them)."""
    chunk = -(-vocab // tp)
    pad = chunk - logits.shape[-1]
    x = torch.nn.functional.pad(logits, (0, pad)) if pad else logits
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)[..., :vocab]


def indexer_partial_scores(q: Tensor, k: Tensor, weights: Tensor) -> Tensor:
    """``sum_h weights[b,s,h] * relu(q[b,s,h] . k[b,t])`` over this rank's heads: fp32 [B, S, N].

    One head at a time, so the memory is the score matrix itself, never [B, S, H, N]."""
    kf = k.float().transpose(1, 2)                       # [B, D, N]
    qf = q.float()
    out = torch.zeros((q.shape[0], q.shape[1], k.shape[1]), dtype=torch.float32, device=q.device)
    for h in range(q.shape[2]):
        out.add_(torch.relu(torch.bmm(qf[:, :, h], kf)) * weights[:, :, h, None])
    return out


def topk_from_scores(scores: Tensor, visible: Tensor, topk: int) -> Tensor:
    """idx [B, S, topk] int32 of the best keys ``t < visible[b, s]`` by ``scores`` [B, S, N]; -1 in the slots
    beyond ``min(topk, visible)`` (the ``indexer_topk`` output format)."""
    b, s, n = scores.shape
    k = min(topk, n)
    t = torch.arange(n, device=scores.device)
    masked = scores.masked_fill(t[None, None, :] >= visible[..., None], float("-inf"))
    idx = masked.topk(k, dim=-1).indices if k else masked.new_zeros((b, s, 0), dtype=torch.long)
    slot = torch.arange(k, device=scores.device)
    idx = torch.where(slot[None, None, :] < visible[..., None].long(), idx, -1).to(torch.int32)
    if k < topk:
        idx = torch.cat([idx, idx.new_full((b, s, topk - k), -1)], dim=-1)
    return idx.contiguous()


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int, group: Any = None) -> Tensor:
    """The tensor-parallel ``indexer_topk``: this rank's heads ``q`` [B, S, H/tp, D] and ``weights``
    [B, S, H/tp], the replicated keys ``k`` [B, N, D]; partial scores all-reduced in fp32, then a local top-k.
    Every rank of the group returns the same indices."""
    scores = indexer_partial_scores(q, k, weights)
    dist.all_reduce(scores, group=group)
    return topk_from_scores(scores, visible, topk)
