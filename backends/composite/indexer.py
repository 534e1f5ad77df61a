"""Plain-torch lightning indexer: indexer_topk (spec sections 2.5-2.7, V4.1's candidates and sorted output)
and select_candidate_blocks (V4.1's candidate blocks).

Scores are computed in float32, a chunk of queries at a time so that the per-head dot products
``[B, chunk, H, N]`` stay under ``CHUNK_ELEMS`` elements; the masked scores of the chunk go through
``torch.topk``. No host synchronisation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4rt.backend import new_output
from dsv4rt.formats import ORDER_KEY_FLOOR, decode_e4m3, order_key, round_float

__all__ = ["indexer_topk", "select_candidate_blocks", "CHUNK_ELEMS"]

CHUNK_ELEMS = 1 << 25
"""Upper bound on the elements of the largest float32 intermediate per query chunk (128 MiB)."""


def _keys(k: Tensor, k_scale: Tensor | None) -> Tensor:
    """Keys as float32 [B, N, D]; float8_e4m3fn keys are decoded by table look-up and scaled per key."""
    if k.dtype == torch.float8_e4m3fn:
        return decode_e4m3(k) * k_scale.float()[..., None]
    return k.float()


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int,
                 k_scale: Tensor | None = None, return_scores: bool = False, score_dtype: torch.dtype | None = None,
                 candidates: Tensor | None = None, sorted_output: bool = False):
    """``idx[B, S, topk]`` int32: per query, the ``topk`` selectable keys (visible, and candidates when
    ``candidates`` is given) with the largest score ``sum_h weights[h] * relu(q[h] . key[t])`` (float32), -1
    in the slots beyond them.

    ``torch.topk`` ranks int32 keys of the scores (:func:`dsv4rt.formats.order_key`, NaN mapped to -inf
    first) with the keys not selectable set to ``ORDER_KEY_FLOOR``, so a selectable key scoring -inf still
    ranks above every other one; any returned index not selectable (only when fewer than ``topk`` keys are)
    is then replaced by -1 (its score by -inf). ``sorted_output`` sorts each row by index, -1 last.
    With ``return_scores`` also returns ``scores[B, S, topk]`` float32. A 16-bit ``score_dtype`` (None =
    q's dtype) rounds the dot products, the weighted terms and the head sum, as the contract says.
    """
    b, s, h, d = q.shape
    n = k.shape[1]
    dev = q.device
    idx = new_output((b, s, topk), torch.int32, dev)
    idx.fill_(-1)
    scores = None
    if return_scores:
        scores = new_output((b, s, topk), torch.float32, dev)
        scores.fill_(float("-inf"))
    kk = min(topk, n)
    if kk == 0 or b * s == 0:
        return (idx, scores) if return_scores else idx

    sd = q.dtype if score_dtype is None else score_dtype
    rounded = sd in (torch.bfloat16, torch.float16)
    qf = q.float()
    kt = _keys(k, k_scale).transpose(1, 2)           # [B, D, N]
    w = weights.float()
    vis = visible.long().clamp(0, n)                  # [B, S]
    pos = torch.arange(n, device=dev)
    chunk = max(1, CHUNK_ELEMS // max(1, b * h * n))
    for s0 in range(0, s, chunk):
        s1 = min(s, s0 + chunk)
        c = s1 - s0
        dots = torch.matmul(qf[:, s0:s1].reshape(b, c * h, d), kt).view(b, c, h, n).relu_()
        if rounded:   # round(q.k), round(w * relu), round(sum over heads)
            terms = round_float(round_float(dots, sd) * w[:, s0:s1, :, None], sd)
            sc = round_float(terms.sum(dim=2), sd)
        else:
            sc = torch.matmul(w[:, s0:s1].unsqueeze(2), dots).squeeze(2)     # [B, c, N]: sum over heads
        vc = vis[:, s0:s1, None]                                          # [B, c, 1]
        sc.masked_fill_(torch.isnan(sc), float("-inf"))                   # a NaN score counts as -inf
        key = order_key(sc).masked_fill_(pos >= vc, ORDER_KEY_FLOOR)     # invisible: below -inf too
        if candidates is not None:
            cand = candidates[:, s0:s1]
            key.masked_fill_(~cand, ORDER_KEY_FLOOR)                     # not a candidate: as invisible
        ids = torch.topk(key, kk, dim=-1).indices
        vals = sc.gather(-1, ids)
        invalid = ids >= vc
        if candidates is not None:
            invalid |= ~cand.gather(-1, ids)
        if sorted_output:   # ascending index, the invalid ones (at n, above every index) last
            ids, perm = ids.masked_fill(invalid, n).sort(dim=-1)
            vals, invalid = vals.gather(-1, perm), ids == n
        idx[:, s0:s1, :kk].copy_(ids.masked_fill(invalid, -1))
        if scores is not None:
            scores[:, s0:s1, :kk].copy_(vals.masked_fill(invalid, float("-inf")))
    return (idx, scores) if return_scores else idx


def select_candidate_blocks(scores: Tensor, compress_len: Tensor, block_size: int = 8,
                            n_blocks: int = 2048) -> Tensor:
    """``mask[B, S, N]`` bool: per query, the ``min(n_blocks, live)`` blocks with the best max score among the
    ``live`` blocks above -inf, the block of position ``compress_len - 1`` pinned at +inf.

    A chunk of queries at a time (at most ``CHUNK_ELEMS`` float32 scores): NaN to -inf, the last block padded
    with -inf, block max by ``amax`` over a ``[.., blocks, block]`` view, ``torch.topk`` of the blocks, kept
    where the picked score is above -inf, expanded back to positions by a gather.
    """
    b, s, n = scores.shape
    dev = scores.device
    mask = new_output((b, s, n), torch.bool, dev)
    if n == 0 or b * s == 0:
        return mask
    nb = -(-n // block_size)
    width = min(block_size, n)                            # a block longer than N: one block of N positions
    kk = min(n_blocks, nb)
    block_of = torch.arange(n, device=dev) // width
    newest = torch.div(compress_len.long() - 1, block_size, rounding_mode="floor")   # -1: nothing pinned
    blocks = torch.arange(nb, device=dev)
    chunk = max(1, CHUNK_ELEMS // max(1, b * nb * width))
    for s0 in range(0, s, chunk):
        s1 = min(s, s0 + chunk)
        sc = torch.full((b, s1 - s0, nb * width), float("-inf"), device=dev)
        sc[..., :n] = scores[:, s0:s1]
        sc.masked_fill_(torch.isnan(sc), float("-inf"))
        best = sc.view(b, s1 - s0, nb, width).amax(dim=-1)
        best.masked_fill_(blocks == newest[:, s0:s1, None], float("inf"))
        top = torch.topk(best, kk, dim=-1)
        keep = torch.zeros_like(best, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf"))
        mask[:, s0:s1].copy_(keep[..., block_of])
    return mask
