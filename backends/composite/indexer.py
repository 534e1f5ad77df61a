"""Plain-torch lightning-indexer top-k: indexer_topk (spec sections 2.5-2.7).

Scores are computed in float32, a chunk of queries at a time so that the per-head dot products
``[B, chunk, H, N]`` stay under ``CHUNK_ELEMS`` elements; the masked scores of the chunk go through
``torch.topk``. No host synchronisation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4rt.backend import new_output
from dsv4rt.formats import ORDER_KEY_FLOOR, decode_e4m3, order_key, round_float

__all__ = ["indexer_topk", "CHUNK_ELEMS"]

CHUNK_ELEMS = 1 << 25
"""Upper bound on the elements of the largest float32 intermediate per query chunk (128 MiB)."""


def _keys(k: Tensor, k_scale: Tensor | None) -> Tensor:
    """Keys as float32 [B, N, D]; float8_e4m3fn keys are decoded by table look-up and scaled per key."""
    if k.dtype == torch.float8_e4m3fn:
        return decode_e4m3(k) * k_scale.float()[..., None]
    return k.float()


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int,
                 k_scale: Tensor | None = None, return_scores: bool = False, score_dtype: torch.dtype | None = None):
    """``idx[B, S, topk]`` int32: per query, the ``topk`` visible keys with the largest score
    ``sum_h weights[h] * relu(q[h] . key[t])`` (float32), -1 in the slots beyond ``visible``.

    ``torch.topk`` ranks int32 keys of the scores (:func:`dsv4rt.formats.order_key`, NaN mapped to -inf
    first) with the keys ``t >= visible[b, s]`` set to ``ORDER_KEY_FLOOR``, so a visible key scoring -inf still ranks
    above every invisible one; any returned index at or beyond ``visible`` (only when fewer than ``topk``
    keys are visible) is then replaced by -1 (its score by -inf).
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
        ids = torch.topk(key, kk, dim=-1).indices
        vals = sc.gather(-1, ids)
        invalid = ids >= vc
        idx[:, s0:s1, :kk].copy_(ids.masked_fill(invalid, -1))
        if scores is not None:
            scores[:, s0:s1, :kk].copy_(vals.masked_fill(invalid, float("-inf")))
    return (idx, scores) if return_scores else idx
