"""Golden lightning-indexer scores and top-k (spec sections 2.5-2.7), float64."""

import torch

from ._decode import F64, decode_e4m3, to_f64

_S_CHUNK = 64


def _keys_f64(k, k_scale):
    """Key values as float64 ``[B, N, D]``: bf16/fp32 keys as they are; float8_e4m3fn keys (or their
    uint8 bytes) times the per-key scale ``k_scale [B, N]`` when given."""
    if k.dtype in (torch.float8_e4m3fn, torch.uint8):
        kv = decode_e4m3(k)
    else:
        kv = to_f64(k)
    if k_scale is not None:
        kv = kv * to_f64(k_scale)[..., None]
    return kv


def indexer_scores(q, k, weights, visible, k_scale=None, score_dtype=None):
    """Indexer scores ``[B, S, N]`` float64 (spec 2.5/2.6).

    ``score[b, s, t] = sum_h weights[b, s, h] * relu(q[b, s, h, :] . key[b, t, :])`` for
    ``t < clamp(visible[b, s], 0, N)`` and ``-inf`` for the other (invisible) keys, with
    ``key = k`` (bf16 / fp32) or ``key = e4m3(k) * k_scale[b, t]`` (float8_e4m3fn keys).
    Everything is computed in float64 from the exact input values. ``score_dtype`` (None = q's dtype):
    when 16-bit, the three rounding points of the contract, each rounding an exact value once:
    ``round(q_h . key_t)``, ``round(weights[h] * relu(.))`` and ``round(sum_h .)``.
    """
    sd = q.dtype if score_dtype is None else score_dtype
    rnd = (lambda x: x.to(sd).to(F64)) if sd in (torch.bfloat16, torch.float16) else (lambda x: x)
    qd = to_f64(q)                                  # [B, S, H, D]
    kd = _keys_f64(k, k_scale)                      # [B, N, D]
    wd = to_f64(weights)                            # [B, S, H]
    b, s, n = qd.shape[0], qd.shape[1], kd.shape[1]
    score = torch.empty((b, s, n), dtype=F64)
    for bi in range(b):
        for s0 in range(0, s, _S_CHUNK):                    # chunked only to bound memory
            dots = rnd(torch.einsum("shd,td->sht", qd[bi, s0:s0 + _S_CHUNK], kd[bi]))  # q_h . k_t
            prods = rnd(wd[bi, s0:s0 + _S_CHUNK, :, None] * torch.relu(dots))
            score[bi, s0:s0 + _S_CHUNK] = rnd(prods.sum(dim=1))
    vis = torch.clamp(visible.to(torch.int64), 0, n)
    t = torch.arange(n)
    mask = t[None, None, :] < vis[:, :, None]
    return torch.where(mask, score, torch.full_like(score, float("-inf")))


def indexer_topk(q, k, weights, visible, topk, k_scale=None, return_scores=False, score_dtype=None):
    """Top-k key indices per query (spec 2.7): ``idx [B, S, topk]`` int32.

    Row ``(b, s)`` holds the ``min(topk, clamp(visible[b, s], 0, N))`` visible keys with the largest
    :func:`indexer_scores` (here sorted by descending score, ties by ascending t; the op contract
    leaves order and tie-break free), then ``-1`` for the remaining slots. The indices are the
    plain key positions ``t`` (no window offset).

    With ``return_scores=True`` returns ``(idx, scores)`` where ``scores [B, S, topk]`` float64 is
    the score of each returned index and ``-inf`` where ``idx == -1``.
    """
    scores = indexer_scores(q, k, weights, visible, k_scale, score_dtype)   # [B, S, N], -inf = invisible
    b, s, n = scores.shape
    vis = torch.clamp(visible.to(torch.int64), 0, n)
    idx = torch.full((b, s, topk), -1, dtype=torch.int32)
    out_scores = torch.full((b, s, topk), float("-inf"), dtype=F64)
    for bi in range(b):
        for si in range(s):
            count = min(topk, int(vis[bi, si]))
            if count == 0:
                continue
            row = scores[bi, si, :int(vis[bi, si])]
            order = torch.sort(row, descending=True, stable=True).indices[:count]
            idx[bi, si, :count] = order.to(torch.int32)
            out_scores[bi, si, :count] = row[order]
    if return_scores:
        return idx, out_scores
    return idx
