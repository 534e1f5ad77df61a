"""Golden lightning-indexer scores and top-k (spec sections 2.5-2.7; V4.1's candidate mask and sorted
output) and V4.1's candidate blocks, float64."""

import torch

from ._decode import F64, decode_e4m3, dequant_fp4, to_f64

_S_CHUNK = 64


def _keys_f64(k, k_scale):
    """Key values as float64 ``[B, N, D]``: bf16/fp32 keys as they are; MXFP4 keys (uint8 ``[B, N, D/2]``
    packed E2M1 with E8M0 ``k_scale [B, N, D/32]``) as ``e2m1 * 2^(scale - 127)``; float8_e4m3fn keys (or
    their uint8 bytes) times the per-key scale ``k_scale [B, N]`` when given."""
    if k.dtype == torch.uint8 and k_scale is not None and k_scale.dim() == 3:
        return dequant_fp4(k, k_scale)
    if k.dtype in (torch.float8_e4m3fn, torch.uint8):
        kv = decode_e4m3(k)
    else:
        kv = to_f64(k)
    if k_scale is not None:
        kv = kv * to_f64(k_scale)[..., None]
    return kv


def selectable(visible, n, candidates=None):
    """bool ``[B, S, N]``: key ``t`` is selectable by query ``(b, s)`` (``t < clamp(visible, 0, N)`` and, when
    given, ``candidates[b, s, t]``)."""
    vis = torch.clamp(visible.to(torch.int64), 0, n)
    ok = torch.arange(n)[None, None, :] < vis[:, :, None]
    return ok & candidates.to(torch.bool) if candidates is not None else ok


def indexer_scores(q, k, weights, visible, k_scale=None, score_dtype=None, candidates=None):
    """Indexer scores ``[B, S, N]`` float64 (spec 2.5/2.6).

    ``score[b, s, t] = sum_h weights[b, s, h] * relu(q[b, s, h, :] . key[b, t, :])`` for
    ``t < clamp(visible[b, s], 0, N)`` and ``-inf`` for the other (invisible) keys and for NaN scores, with
    ``key = k`` (bf16 / fp32), ``key = e4m3(k) * k_scale[b, t]`` (float8_e4m3fn keys) or
    ``key = e2m1(k) * 2^(k_scale[b, t, d // 32] - 127)`` (MXFP4 keys). Also the golden ``indexer_scores`` op.
    Keys outside ``candidates`` (bool ``[B, S, N]``, when given) score ``-inf`` like invisible ones.
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
    mask = selectable(visible, n, candidates) & ~torch.isnan(score)    # a NaN score counts as -inf
    return torch.where(mask, score, torch.full_like(score, float("-inf")))


def indexer_topk(q, k, weights, visible, topk, k_scale=None, return_scores=False, score_dtype=None,
                 candidates=None, sorted_output=False):
    """Top-k key indices per query (spec 2.7): ``idx [B, S, topk]`` int32.

    Row ``(b, s)`` holds the ``min(topk, number of selectable keys)`` selectable keys (visible and, when
    ``candidates`` is given, candidates) with the largest :func:`indexer_scores` (here sorted by descending
    score, ties by ascending t; the op contract leaves the tie-break free, and the order too unless
    ``sorted_output``, which orders them by ascending t), then ``-1`` for the remaining slots. The indices
    are the plain key positions ``t`` (no window offset).

    With ``return_scores=True`` returns ``(idx, scores)`` where ``scores [B, S, topk]`` float64 is
    the score of each returned index and ``-inf`` where ``idx == -1``.
    """
    scores = indexer_scores(q, k, weights, visible, k_scale, score_dtype, candidates)   # -inf: not selectable
    b, s, n = scores.shape
    ok = selectable(visible, n, candidates)
    idx = torch.full((b, s, topk), -1, dtype=torch.int32)
    out_scores = torch.full((b, s, topk), float("-inf"), dtype=F64)
    for bi in range(b):
        for si in range(s):
            keys = ok[bi, si].nonzero().flatten()
            count = min(topk, keys.numel())
            if count == 0:
                continue
            row = scores[bi, si, keys]
            chosen = keys[torch.sort(row, descending=True, stable=True).indices[:count]]
            if sorted_output:
                chosen = chosen.sort().values
            idx[bi, si, :count] = chosen.to(torch.int32)
            out_scores[bi, si, :count] = scores[bi, si, chosen]
    if return_scores:
        return idx, out_scores
    return idx


def candidate_block_scores(scores, compress_len, block_size):
    """Block scores ``[B, S, ceil(N / block_size)]`` float64 of :func:`select_candidate_blocks`: the max of
    each block's scores (NaN counted as -inf, the last block padded with -inf), +inf for the block holding
    position ``compress_len - 1`` (none where ``compress_len == 0``)."""
    sd = to_f64(scores)
    sd = torch.where(torch.isnan(sd), torch.full_like(sd, float("-inf")), sd)
    b, s, n = sd.shape
    width = min(block_size, max(n, 1))           # a block longer than N is one block of the N positions
    nb = -(-n // width)
    padded = torch.full((b, s, nb * width), float("-inf"), dtype=F64)
    padded[..., :n] = sd
    blocks = padded.view(b, s, nb, width).amax(dim=-1) if nb else padded.view(b, s, 0)
    newest = torch.div(compress_len.to(torch.int64) - 1, block_size, rounding_mode="floor")   # -1: none
    pinned = torch.arange(nb)[None, None, :] == newest[:, :, None]
    return torch.where(pinned, torch.full_like(blocks, float("inf")), blocks)


def select_candidate_blocks(scores, compress_len, block_size=8, n_blocks=2048):
    """V4.1's candidate mask ``[B, S, N]`` bool: per query, the ``min(n_blocks, count)`` blocks with the
    largest :func:`candidate_block_scores` among the ``count`` blocks scoring above -inf (ties: the lower
    block first), each kept block's positions True."""
    bscore = candidate_block_scores(scores, compress_len, block_size)
    b, s, nb = bscore.shape
    keep = torch.zeros((b, s, nb), dtype=torch.bool)
    for bi in range(b):
        for si in range(s):
            live = (bscore[bi, si] > float("-inf")).nonzero().flatten()
            order = torch.sort(bscore[bi, si, live], descending=True, stable=True).indices
            keep[bi, si, live[order[:min(n_blocks, live.numel())]]] = True
    n = scores.shape[2]
    return keep[..., torch.arange(n) // min(block_size, max(n, 1))]
