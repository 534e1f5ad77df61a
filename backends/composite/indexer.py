"""Plain-torch lightning indexer: indexer_topk (spec sections 2.5-2.7, V4.1's candidates and sorted output),
indexer_scores (the whole score matrix) and select_candidate_blocks (V4.1's candidate blocks).

Keys are decoded to float32 once per call (E4M3 times the per-key scale, MXFP4 by
:func:`dsv4rt.formats.dequant_mxfp4`). Scores are computed in float32, a chunk of queries at a time so that the per-head dot products
``[B, chunk, H, N]`` stay under ``CHUNK_ELEMS`` elements; the masked scores of the chunk go through
``torch.topk``. No host synchronisation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4rt.backend import new_output
from dsv4rt.formats import ORDER_KEY_FLOOR, decode_e4m3, dequant_mxfp4, order_key, round_float

__all__ = ["indexer_topk", "indexer_scores", "topk_from_scores", "select_candidate_blocks", "CHUNK_ELEMS"]

CHUNK_ELEMS = 1 << 25
"""Upper bound on the elements of the largest float32 intermediate per query chunk (128 MiB)."""


def _keys(k: Tensor, k_scale: Tensor | None) -> Tensor:
    """Keys as float32 [B, N, D]; float8_e4m3fn keys are decoded by table look-up and scaled per key, MXFP4
    keys (uint8 [B, N, D/2] with E8M0 [B, N, D/32]) decoded and scaled per 32 elements."""
    if k.dtype == torch.uint8:
        return dequant_mxfp4(k, k_scale)
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
    b, s = q.shape[:2]
    idx, scores = _topk_outputs(b, s, topk, return_scores, q.device)
    if min(topk, k.shape[1]) and b * s:
        for s0, s1, sc in _score_chunks(q, k, weights, k_scale, score_dtype):
            _select_into(sc, visible[:, s0:s1], None if candidates is None else candidates[:, s0:s1],
                         sorted_output, idx[:, s0:s1], None if scores is None else scores[:, s0:s1])
    return (idx, scores) if return_scores else idx


def topk_from_scores(sc: Tensor, visible: Tensor, topk: int, candidates: Tensor | None = None,
                     sorted_output: bool = False, return_scores: bool = False):
    """:func:`indexer_topk`'s selection on a given float32 score matrix ``sc [B, S, N]`` (e.g. the all-reduced
    tensor-parallel scores): the same output, -1 padding, candidates and ``sorted_output`` semantics; NaN in
    ``sc`` counts as -inf."""
    b, s, n = sc.shape
    idx, scores = _topk_outputs(b, s, topk, return_scores, sc.device)
    if min(topk, n) and b * s:
        _select_into(sc.float().masked_fill(torch.isnan(sc), float("-inf")), visible, candidates, sorted_output,
                     idx, scores)
    return (idx, scores) if return_scores else idx


def _topk_outputs(b: int, s: int, topk: int, return_scores: bool, dev: torch.device):
    idx = new_output((b, s, topk), torch.int32, dev)
    idx.fill_(-1)
    scores = None
    if return_scores:
        scores = new_output((b, s, topk), torch.float32, dev)
        scores.fill_(float("-inf"))
    return idx, scores


def _select_into(sc: Tensor, visible: Tensor, cand: Tensor | None, sorted_output: bool, idx: Tensor,
                 scores: Tensor | None) -> None:
    """Top-k of scores ``sc [B, c, N]`` (no NaN) into ``idx [B, c, topk]`` (pre-filled -1) / ``scores``."""
    n = sc.shape[2]
    kk = min(idx.shape[2], n)
    vc = visible.long().clamp(0, n)[..., None]                            # [B, c, 1]
    pos = torch.arange(n, device=sc.device)
    key = order_key(sc).masked_fill_(pos >= vc, ORDER_KEY_FLOOR)         # invisible: below -inf too
    if cand is not None:
        key.masked_fill_(~cand, ORDER_KEY_FLOOR)                         # not a candidate: as invisible
    ids = torch.topk(key, kk, dim=-1).indices
    vals = sc.gather(-1, ids)
    invalid = ids >= vc
    if cand is not None:
        invalid |= ~cand.gather(-1, ids)
    if sorted_output:   # ascending index, the invalid ones (at n, above every index) last
        ids, perm = ids.masked_fill(invalid, n).sort(dim=-1)
        vals, invalid = vals.gather(-1, perm), ids == n
    idx[:, :, :kk].copy_(ids.masked_fill(invalid, -1))
    if scores is not None:
        scores[:, :, :kk].copy_(vals.masked_fill(invalid, float("-inf")))


def _score_chunks(q: Tensor, k: Tensor, weights: Tensor, k_scale: Tensor | None, score_dtype: torch.dtype | None):
    """Yields ``(s0, s1, sc)``: the float32 scores ``sc [B, s1 - s0, N]`` of query chunk ``[s0, s1)`` over every
    key (NaN as -inf, no visibility mask), chunks sized so the per-head products ``[B, c, H, N]`` stay under
    ``CHUNK_ELEMS``. A 16-bit ``score_dtype`` (None = q's dtype) rounds q.k, w * relu and the head sum."""
    b, s, h, d = q.shape
    n = k.shape[1]
    sd = q.dtype if score_dtype is None else score_dtype
    rounded = sd in (torch.bfloat16, torch.float16)
    qf = q.float()
    kt = _keys(k, k_scale).transpose(1, 2)           # [B, D, N]
    w = weights.float()
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
        yield s0, s1, sc.masked_fill_(torch.isnan(sc), float("-inf"))    # a NaN score counts as -inf


def indexer_scores(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, k_scale: Tensor | None = None,
                   score_dtype: torch.dtype | None = None) -> Tensor:
    """``scores[B, S, N]`` float32: ``sum_h weights[h] * relu(q[h] . key[t])`` for ``t < visible``, -inf beyond
    it and for NaN; computed a query chunk at a time as :func:`indexer_topk` scores them."""
    b, s = q.shape[:2]
    n = k.shape[1]
    out = new_output((b, s, n), torch.float32, q.device)
    if b * s * n == 0:
        return out
    pos = torch.arange(n, device=q.device)
    vis = visible.long().clamp(0, n)
    for s0, s1, sc in _score_chunks(q, k, weights, k_scale, score_dtype):
        out[:, s0:s1].copy_(sc.masked_fill_(pos >= vis[:, s0:s1, None], float("-inf")))
    return out


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
