"""NumPy lightning indexer: indexer_topk (V4.1's candidates and sorted output too), indexer_scores and
select_candidate_blocks. Keys: float, E4M3 times a per-key scale, or MXFP4 (E2M1 pairs times per-32 E8M0),
decoded to float32 a batch row at a time (dsv4rt.formats)."""
from __future__ import annotations

import numpy as np
import torch

from dsv4rt.backend import new_output
from dsv4rt.formats import ORDER_KEY_FLOOR, decode_e4m3, dequant_mxfp4, order_key, round_float

from ._np import BUDGET, f32, ints, u8


def _keys(k: torch.Tensor, k_scale: torch.Tensor | None, b: int, n: int) -> np.ndarray:
    """The first n keys of batch row b as float32 [n, D]; E4M3 keys are decoded (dsv4rt.formats) and
    multiplied by k_scale[b], MXFP4 keys (uint8 pairs) decoded and scaled per 32 elements. Keys no query of
    the call can see are never converted."""
    if k.dtype == torch.uint8:
        return dequant_mxfp4(u8(k[b, :n]), u8(k_scale[b, :n]))  # type: ignore[index]
    if k.dtype == torch.float8_e4m3fn:
        return decode_e4m3(u8(k[b, :n])) * f32(k_scale[b, :n])[:, None]  # type: ignore[index]
    return f32(k[b, :n])


def _scores(qb: np.ndarray, kb: np.ndarray, wb: np.ndarray, n: int, rnd: torch.dtype | None) -> np.ndarray:
    """score[s, t] = sum_h w[s, h] * relu(q[s, h] . k[t]) for t < n, float32 [S', n], computed in key
    chunks so the per-head products stay within BUDGET; ``rnd`` (a 16-bit dtype or None) rounds the dot
    products, the weighted terms and the head sum (the contract's ``score_dtype``)."""
    sc, h, d = qb.shape
    out = np.empty((sc, n), np.float32)
    step = max(1, BUDGET // max(sc * h, 1))
    q2 = qb.reshape(sc * h, d)
    w3 = wb[:, None, :]                                   # [S', 1, H]
    for t0 in range(0, n, step):
        t1 = min(n, t0 + step)
        dots = (q2 @ kb[t0:t1].T).reshape(sc, h, t1 - t0)  # [S', H, t]
        np.maximum(dots, 0.0, out=dots)
        if rnd is None:
            out[:, t0:t1] = np.matmul(w3, dots)[:, 0, :]
        else:
            terms = round_float(round_float(dots, rnd) * wb[:, :, None], rnd)
            out[:, t0:t1] = round_float(terms.sum(axis=1), rnd)
    return out


def _select(scores: np.ndarray, vis: np.ndarray, topk: int, idx: np.ndarray,
            best: np.ndarray | None, cand: np.ndarray | None = None, in_order: bool = False) -> None:
    """Write the top-k selectable keys of each row (descending score, or ascending index with ``in_order``;
    -1 after) into idx / best. Rows rank on :func:`dsv4rt.formats.order_key` of the scores, the keys beyond
    ``vis`` or outside ``cand`` (bool [rows, n], when given) at ``ORDER_KEY_FLOOR``, so a selectable key
    scoring -inf (or NaN, counted as -inf) is taken before any other one."""
    sc, n = scores.shape
    idx[...] = -1
    if best is not None:
        best[...] = -np.inf
    kk = min(topk, n)
    if kk == 0:
        return
    scores[np.isnan(scores)] = -np.inf                                # a NaN score counts as -inf
    key = order_key(scores)                                           # invisible: below every score
    off = np.arange(n)[None, :] >= vis[:, None]
    if cand is not None:
        off |= ~cand
    key[off] = ORDER_KEY_FLOOR
    if kk < n:
        sel = np.argpartition(key, n - kk, axis=1)[:, n - kk:]        # the kk largest, unordered
    else:
        sel = np.broadcast_to(np.arange(n), (sc, n))
    valid = ~np.take_along_axis(off, sel, axis=1)
    if in_order:    # ascending index, the invalid ones (at n) last
        order = np.argsort(np.where(valid, sel, n), axis=1, kind="stable")
    else:           # descending score; kk per row
        order = np.argsort(~np.take_along_axis(key, sel, axis=1), axis=1, kind="stable")
    sel = np.take_along_axis(sel, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    val = np.take_along_axis(scores, sel, axis=1)
    idx[:, :kk] = np.where(valid, sel, -1)
    if best is not None:
        best[:, :kk] = np.where(valid, val, -np.inf)


def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor, topk: int,
                 k_scale: torch.Tensor | None = None, return_scores: bool = False,
                 score_dtype: torch.dtype | None = None, candidates: torch.Tensor | None = None,
                 sorted_output: bool = False):
    """idx[B, S, topk] int32 (+ scores float32): top-k selectable keys by the lightning-indexer score.

    Float32 scores per batch row and query chunk (keys beyond the chunk's largest ``visible`` are never
    scored); ``np.argpartition`` picks the top-k, which are then ordered by descending score (by index with
    ``sorted_output``), so valid indices come first and -1 fills the rest.
    """
    bsz, s, h, _ = q.shape
    n = k.shape[1]
    sd = q.dtype if score_dtype is None else score_dtype
    rnd = sd if sd in (torch.bfloat16, torch.float16) else None
    idx = new_output((bsz, s, topk), torch.int32, "cpu")
    scores_t = new_output((bsz, s, topk), torch.float32, "cpu") if return_scores else None
    idx_np = idx.numpy()
    sc_np = scores_t.numpy() if scores_t is not None else None
    vis = np.clip(ints(visible).astype(np.int64), 0, n)
    w_all = f32(weights)
    cand_all = candidates.detach().numpy() if candidates is not None else None
    # query rows per chunk: the [rows, N] score buffer and a [rows*H, >=1024 keys] product fit BUDGET
    rows = max(1, min(s, BUDGET // max(n, 1), BUDGET // max(h * min(max(n, 1), 1024), 1)))
    for b in range(bsz):
        kb = _keys(k, k_scale, b, int(vis[b].max()) if s else 0)
        qb = f32(q[b])
        for s0 in range(0, s, rows):
            s1 = min(s, s0 + rows)
            vrow = vis[b, s0:s1]
            nmax = int(vrow.max()) if s1 > s0 else 0
            scores = _scores(qb[s0:s1], kb, w_all[b, s0:s1], nmax, rnd)
            _select(scores, vrow, topk, idx_np[b, s0:s1], None if sc_np is None else sc_np[b, s0:s1],
                    None if cand_all is None else cand_all[b, s0:s1, :nmax], sorted_output)
    if return_scores:
        return idx, scores_t
    return idx


def indexer_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor,
                   k_scale: torch.Tensor | None = None, score_dtype: torch.dtype | None = None) -> torch.Tensor:
    """scores[B, S, N] float32: the float32 scores of :func:`indexer_topk` (same query chunks, keys beyond a
    chunk's largest ``visible`` never scored), -inf for ``t >= visible`` and for NaN."""
    bsz, s, h, _ = q.shape
    n = k.shape[1]
    sd = q.dtype if score_dtype is None else score_dtype
    rnd = sd if sd in (torch.bfloat16, torch.float16) else None
    out_t = new_output((bsz, s, n), torch.float32, "cpu")
    out = out_t.numpy()
    out[...] = -np.inf
    vis = np.clip(ints(visible).astype(np.int64), 0, n)
    w_all = f32(weights)
    rows = max(1, min(s, BUDGET // max(n, 1), BUDGET // max(h * min(max(n, 1), 1024), 1)))
    for b in range(bsz):
        if s == 0 or int(vis[b].max()) == 0:
            continue
        kb = _keys(k, k_scale, b, int(vis[b].max()))
        qb = f32(q[b])
        for s0 in range(0, s, rows):
            s1 = min(s, s0 + rows)
            vrow = vis[b, s0:s1]
            nmax = int(vrow.max())
            sc = _scores(qb[s0:s1], kb, w_all[b, s0:s1], nmax, rnd)
            sc[np.isnan(sc) | (np.arange(nmax)[None, :] >= vrow[:, None])] = -np.inf
            out[b, s0:s1, :nmax] = sc
    return out_t


def select_candidate_blocks(scores: torch.Tensor, compress_len: torch.Tensor, block_size: int = 8,
                            n_blocks: int = 2048) -> torch.Tensor:
    """mask[B, S, N] bool: per query, the ``min(n_blocks, live)`` best blocks by max score among the ``live``
    ones above -inf, the block of position ``compress_len - 1`` pinned at +inf.

    Query rows in chunks of at most BUDGET scores: NaN to -inf, the last block padded with -inf, block max
    over a ``[rows, blocks, block]`` view, ``np.argpartition`` for the kept blocks (unordered), expanded back
    to positions by indexing.
    """
    bsz, s, n = scores.shape
    mask = new_output((bsz, s, n), torch.bool, "cpu")
    if n == 0 or bsz * s == 0:
        return mask
    out = mask.numpy()
    nb = -(-n // block_size)
    width = min(block_size, n)                            # a block longer than N: one block of N positions
    kk = min(n_blocks, nb)
    block_of = np.arange(n) // width
    newest = (ints(compress_len).astype(np.int64) - 1) // block_size         # -1: nothing pinned
    rows = max(1, BUDGET // (nb * width))
    for b in range(bsz):
        for s0 in range(0, s, rows):
            s1 = min(s, s0 + rows)
            buf = np.full((s1 - s0, nb * width), -np.inf, np.float32)
            buf[:, :n] = f32(scores[b, s0:s1])
            buf[np.isnan(buf)] = -np.inf
            best = buf.reshape(s1 - s0, nb, width).max(axis=2)
            best[np.arange(nb)[None, :] == newest[b, s0:s1, None]] = np.inf
            sel = np.argpartition(best, nb - kk, axis=1)[:, nb - kk:] if kk < nb else \
                np.broadcast_to(np.arange(nb), (s1 - s0, nb))
            keep = np.zeros((s1 - s0, nb), dtype=bool)
            np.put_along_axis(keep, sel, np.take_along_axis(best, sel, axis=1) > -np.inf, axis=1)
            out[b, s0:s1] = keep[:, block_of]
    return mask
