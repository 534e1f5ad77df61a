"""Tensor-parallel pieces that are not a plain all-reduce (spec 9.4; V4.1 spec 2.2 (c), (f)): the
vocab-parallel embedding and head, the lightning indexer split over its heads, and the row-sharded Engram
table.

The indexer score is a sum over heads, ``score[t] = sum_h w[h] * relu(q[h] . k[t])``, and top-k is not: each
rank computes the partial score matrix of its heads with the registry's ``indexer_scores`` (any backend:
float, E4M3 or MXFP4 keys, -inf beyond ``visible``), the partials are all-reduced (summed) in fp32 BEFORE the
top-k, and each rank then takes the same top-k locally with exactly the ``indexer_topk`` contract's selection
(``candidates``, ``sorted_output``, -1 padding; the composite backend's selection on the reduced matrix).
V4.1's candidate source (layer 20) takes the reduced matrix itself (:func:`indexer_scores`) to
``select_candidate_blocks``.

Engram (official ``ParallelEngramEmbedding``): each rank holds rows ``[a, b)`` of a table, looks up the ids
it owns with the registry's ``engram_lookup``, zeros elsewhere; the all-reduce is exact (one rank
contributes each row).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["vocab_parallel_embed", "gather_vocab", "indexer_partial_scores", "indexer_scores", "topk_from_scores",
           "indexer_topk", "engram_parallel_lookup"]


def _ops(ops: Any) -> Any:
    """The op namespace to call (``dsv4rt.ops`` unless the caller passes its own, e.g. a recording one)."""
    if ops is not None:
        return ops
    from .. import ops as registry_ops

    return registry_ops


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


def indexer_partial_scores(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor | None = None,
                           k_scale: Tensor | None = None, score_dtype: torch.dtype | None = torch.float32,
                           ops: Any = None) -> Tensor:
    """This rank's partial score matrix ``sum_h weights[b,s,h] * relu(q[b,s,h] . key[b,t])`` over its heads:
    fp32 [B, S, N] from the registry's ``indexer_scores`` (-inf at ``t >= visible``; ``visible`` None = all N
    keys). Never [B, S, H, N]. ``score_dtype`` float32 by default (the rounding of a 16-bit one applies to
    this rank's head sum)."""
    if visible is None:
        visible = torch.full(tuple(q.shape[:2]), k.shape[1], dtype=torch.int32, device=q.device)
    return _ops(ops).indexer_scores(q, k, weights, visible, k_scale, score_dtype)


def indexer_scores(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, group: Any = None, *,
                   k_scale: Tensor | None = None, score_dtype: torch.dtype | None = torch.float32,
                   ops: Any = None) -> Tensor:
    """The tensor-parallel ``indexer_scores``: this rank's heads ``q`` [B, S, H/tp, D] and ``weights``
    [B, S, H/tp], the replicated keys ``k`` (float, E4M3 + ``k_scale`` [B, N], or MXFP4 uint8 [B, N, D/2] +
    E8M0 ``k_scale`` [B, N, D/32]); the per-rank partial matrices all-reduced (summed) in fp32. Returns fp32
    [B, S, N], the same on every rank: -inf at ``t >= visible`` and where the sum is NaN.

    ``score_dtype``: float32 (default: every step fp32, as the V4 tensor-parallel indexer always was), None
    (= q's dtype) or a 16-bit dtype: each rank rounds as ``indexer_scores`` does (q.k, w * relu, its head
    sum), and the reduced sum is rounded once more to ``score_dtype`` (the release all-reduces its bf16
    partials, which for 2 ranks is exactly this: one rounding of the sum of two bf16 values)."""
    sd = q.dtype if score_dtype is None else score_dtype
    scores = indexer_partial_scores(q, k, weights, visible, k_scale, sd, ops).contiguous()
    dist.all_reduce(scores, group=group)
    if sd in (torch.bfloat16, torch.float16):
        scores = scores.to(sd).float()
    return scores.masked_fill_(torch.isnan(scores), float("-inf"))


def topk_from_scores(scores: Tensor, visible: Tensor, topk: int, candidates: Tensor | None = None,
                     sorted_output: bool = False, return_scores: bool = False):
    """``indexer_topk``'s selection on a score matrix ``scores`` [B, S, N]: idx [B, S, topk] int32 of the
    ``min(topk, selectable)`` best keys selectable by each query (``t < visible[b, s]`` and, when given,
    ``candidates[b, s, t]``; a key scoring -inf or NaN still fills a slot), -1 in the other slots; in
    ascending key order with ``sorted_output``; ``return_scores`` also returns their scores (float32)."""
    from ..backends.composite.indexer import topk_from_scores as select

    return select(scores, visible, topk, candidates, sorted_output, return_scores)


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int, group: Any = None, *,
                 k_scale: Tensor | None = None, score_dtype: torch.dtype | None = torch.float32,
                 candidates: Tensor | None = None, sorted_output: bool = False, return_scores: bool = False,
                 ops: Any = None):
    """The tensor-parallel ``indexer_topk``: :func:`indexer_scores` (partial scores of this rank's heads,
    all-reduced in fp32), then a local top-k with the ``indexer_topk`` contract (``candidates``,
    ``sorted_output``, ``return_scores``). Every rank of the group returns the same indices."""
    scores = indexer_scores(q, k, weights, visible, group, k_scale=k_scale, score_dtype=score_dtype, ops=ops)
    return topk_from_scores(scores, visible, topk, candidates, sorted_output, return_scores)


def engram_parallel_lookup(ids: Tensor, weight_part: Tensor, scale_part: Tensor, part: tuple[int, int],
                           group: Any = None, out_dtype: torch.dtype = torch.bfloat16, ops: Any = None) -> Tensor:
    """Rows ``ids`` [T, n] of a row-sharded Engram table, dequantised: out [T, n, D] in ``out_dtype`` on every
    rank (official ``ParallelEngramEmbedding``). This rank holds rows ``part = [a, b)`` as ``weight_part``
    [>= b - a, D] E4M3 and ``scale_part`` [same rows, D/32] E8M0 (rows beyond ``b - a`` are padding, as the
    release allocates ``ceil(rows / world)`` per rank); it looks up the ids it owns with the registry's
    ``engram_lookup``, writes zeros for the others, and the group all-reduces (sums) the result: exact in any
    dtype, since exactly one rank contributes each row."""
    a, b = part
    if not 0 <= a <= b or weight_part.shape[0] < b - a:
        raise ValueError(f"engram_parallel_lookup: part must be [a, b) with 0 <= a <= b and b - a <= the "
                         f"{weight_part.shape[0]} rows of weight_part, got {part}")
    mine = (ids >= a) & (ids < b)
    if b > a:
        out = _ops(ops).engram_lookup(torch.where(mine, ids - a, torch.zeros_like(ids)), weight_part, scale_part,
                                      out_dtype)
        out = out.masked_fill(~mine.unsqueeze(-1), 0).contiguous()
    else:   # this rank holds no row
        out = torch.zeros((*ids.shape, weight_part.shape[1]), dtype=out_dtype, device=ids.device)
    dist.all_reduce(out, group=group)
    return out
