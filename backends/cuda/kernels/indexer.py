"""Triton kernels of the lightning indexer: fused logits (spec 2.5; float, E4M3 or MXFP4 keys, the score
matrix of indexer_scores too) and a per-row radix top-k select.

Only ``@triton.jit`` code lives here; the launcher is ``backends/cuda/indexer.py``. ``INTERP`` (constexpr)
is True under the Triton interpreter: MMA operands are upcast to fp32 there (its ``tl.dot`` multiplies
bf16 tiles as raw uint16 bits), and run-time-bounded loops are ``while`` loops (Triton 3.6's interpreter
cannot take run-time ``range`` bounds under NumPy 2); on a GPU they are ``for`` loops.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode import e2m1_to_f32, e4m3_to_f32, e8m0_to_f32
from .rounding import round_to


@triton.jit
def _key_tile(k_ptr, b, offs_n, n_ok, offs_d, d_ok, s_kb, s_kn, s_kd, KFMT: tl.constexpr):
    """Keys ``[BLOCK_N, BLOCK_D]``: as stored (KFMT 0: q's float dtype), E4M3 bytes decoded to float32 (KFMT 1;
    the per-key scale applied later), or (KFMT 2, MXFP4) the E2M1 values of the packed pairs (byte ``d // 2``,
    low nibble = even d) as float32; the per-32 E8M0 scale is applied to the chunk's product."""
    if KFMT == 2:
        byte = tl.load(k_ptr + b * s_kb + offs_n[:, None] * s_kn + (offs_d // 2)[None, :] * s_kd,
                       mask=n_ok[:, None] & d_ok[None, :], other=0).to(tl.int32)
        kt = e2m1_to_f32((byte >> ((offs_d & 1) * 4)[None, :]) & 15)
    elif KFMT == 1:   # E4M3 bytes, decoded from the bits (no FP8 type: sm_80 and triton-ascend compile it)
        kt = e4m3_to_f32(tl.load(k_ptr + b * s_kb + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                                 mask=n_ok[:, None] & d_ok[None, :], other=0))
    else:
        kt = tl.load(k_ptr + b * s_kb + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    return kt


@triton.jit
def indexer_logits_kernel(q_ptr, k_ptr, ks_ptr, w_ptr, vis_ptr, sc_ptr, S, H, N, D,
                          s_qb, s_qs, s_qh, s_qd, s_kb, s_kn, s_kd, s_ksb, s_ksn, s_ksc, s_wb, s_ws, s_wh,
                          s_vb, s_vs, s_cb, s_cs, s_cn,
                          KFMT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DC: tl.constexpr,
                          INTERP: tl.constexpr, RND: tl.constexpr, MASK_VIS: tl.constexpr):
    """Grid (key blocks, query blocks, B): ``score[s, t] = sum_h w[s, h] relu(q[s, h] . key[t])``.

    KFMT (key format): 0 float keys of q's dtype; 1 E4M3 keys, the per-key scale ``ks[b, t]`` applied to the
    fp32 accumulator; 2 MXFP4 keys (uint8 E2M1 pairs ``[B, N, D/2]``), decoded in registers, one D chunk of
    BLOCK_D = 32 per E8M0 scale ``ks[b, t, chunk]`` (bytes), which multiplies that chunk's fp32 product.
    RND (``score_dtype``): 0 keeps fp32; 1 / 2 round ``q . key``, ``w * relu(.)`` and the head sum to bf16 /
    fp16 in registers (the release's bf16 indexer).
    MASK_VIS (indexer_scores): every tile is written, -inf at ``t >= visible[s]``; otherwise (indexer_topk)
    key blocks at or beyond every query's ``visible`` are skipped and left unwritten.

    The MMA's M dimension is (BLOCK_S queries x BLOCK_H heads) against BLOCK_N keys; ReLU, the key scale
    and the head weights are applied to the fp32 accumulator and the heads summed in registers, so only
    [BLOCK_S, BLOCK_N] scores reach memory.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    vis = tl.load(vis_ptr + b * s_vb + offs_s * s_vs, mask=s_ok, other=0)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    out_ptr = sc_ptr + b * s_cb + offs_s[:, None] * s_cs + offs_n[None, :] * s_cn
    if n0 < tl.max(vis, axis=0):
        offs_m = tl.arange(0, BLOCK_S * BLOCK_H)
        ms = pid_s * BLOCK_S + offs_m // BLOCK_H
        mh = offs_m % BLOCK_H
        m_ok = (ms < S) & (mh < H)
        acc = tl.zeros([BLOCK_S * BLOCK_H, BLOCK_N], tl.float32)
        for i in range(NUM_DC):
            offs_d = i * BLOCK_D + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            q = tl.load(q_ptr + b * s_qb + ms[:, None] * s_qs + mh[:, None] * s_qh + offs_d[None, :] * s_qd,
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            if INTERP:
                q = q.to(tl.float32)
            kt = _key_tile(k_ptr, b, offs_n, n_ok, offs_d, d_ok, s_kb, s_kn, s_kd, KFMT).to(q.dtype)
            if KFMT == 2:
                e8 = tl.load(ks_ptr + b * s_ksb + offs_n * s_ksn + i * s_ksc, mask=n_ok, other=127).to(tl.int32)
                acc += tl.dot(q, tl.trans(kt)) * e8m0_to_f32(e8)[None, :]
            else:
                acc += tl.dot(q, tl.trans(kt))
        if KFMT == 1:
            acc *= tl.load(ks_ptr + b * s_ksb + offs_n * s_ksn, mask=n_ok, other=0.0)[None, :]
        w = tl.load(w_ptr + b * s_wb + ms * s_ws + mh * s_wh, mask=m_ok, other=0.0)
        acc = round_to(acc, RND)
        acc = round_to(tl.where(acc < 0.0, 0.0, acc) * w[:, None], RND)   # ReLU that keeps NaN (as torch.relu)
        acc = tl.where(m_ok[:, None], acc, 0.0)   # pad heads (q = 0, w = 0): an infinite key's 0 * inf is NaN
        sc = round_to(tl.sum(tl.reshape(acc, [BLOCK_S, BLOCK_H, BLOCK_N]), axis=1), RND)
        sc = tl.where(sc != sc, float("-inf"), sc)   # a NaN score counts as -inf (the contract)
        if MASK_VIS:
            sc = tl.where(offs_n[None, :] < vis[:, None], sc, float("-inf"))
        tl.store(out_ptr, sc, mask=s_ok[:, None] & n_ok[None, :])
    if MASK_VIS:
        if n0 >= tl.max(vis, axis=0):
            tl.store(out_ptr, tl.full([BLOCK_S, BLOCK_N], float("-inf"), tl.float32), mask=s_ok[:, None] & n_ok[None, :])


@triton.jit
def _ordered_key(x):
    """int32 key with the order of the float32 values (signed compare)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _selectable(offs, vis, cand_row, s_mn, HAS_CAND: tl.constexpr):
    """Keys ``offs`` the row may select: below ``vis`` and, with a candidate mask, marked in it."""
    ok = offs < vis
    if HAS_CAND:
        ok = ok & (tl.load(cand_row + offs * s_mn, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _hist_chunk(c0, hist, row_ptr, s_cn, vis, prefix, cand_row, s_mn, SHIFT: tl.constexpr, FIRST: tl.constexpr,
                HAS_CAND: tl.constexpr, BLOCK_N: tl.constexpr):
    """Adds the 8-bit digit at SHIFT of the (sign-flipped) keys of one chunk's selectable keys whose higher
    digits equal ``prefix``'s to ``hist`` [256]."""
    offs = c0 + tl.arange(0, BLOCK_N)
    ok = _selectable(offs, vis, cand_row, s_mn, HAS_CAND)
    u = _ordered_key(tl.load(row_ptr + offs * s_cn, mask=ok, other=0.0)) ^ (-2147483648)
    if not FIRST:
        ok = ok & ((u >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    # the lanes not counted go to bin 0 and are taken out again (no ``mask=``: Triton 3.2 / triton-ascend)
    h = tl.histogram(tl.where(ok, (u >> SHIFT) & 255, 0), 256)
    return hist + h - tl.where(tl.arange(0, 256) == 0, BLOCK_N - tl.sum(ok.to(tl.int32), axis=0), 0)


@triton.jit
def _compact_chunk(c0, run_gt, run_eq, row_ptr, s_cn, vis, thr, n_gt, need, idx_row, s_ik, val_row, s_vk,
                   cand_row, s_mn, HAS_VAL: tl.constexpr, HAS_CAND: tl.constexpr, SORTED: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Writes this chunk's selectable keys above ``thr`` to slots ``run_gt...`` and its keys equal to
    ``thr`` to slots ``n_gt + run_eq...`` while fewer than ``need`` were taken (in index order); with
    SORTED both kinds go, in index order, to the slots after the ``run_gt + min(run_eq, need)`` taken."""
    offs = c0 + tl.arange(0, BLOCK_N)
    ok = _selectable(offs, vis, cand_row, s_mn, HAS_CAND)
    x = tl.load(row_ptr + offs * s_cn, mask=ok, other=0.0)
    key = _ordered_key(x)
    gt = ok & (key > thr)
    eq = ok & (key == thr)
    gt_i = gt.to(tl.int32)
    eq_i = eq.to(tl.int32)
    r_eq = run_eq + tl.cumsum(eq_i, axis=0) - 1
    take = eq & (r_eq < need)
    if SORTED:
        pos = run_gt + tl.minimum(run_eq, need) + tl.cumsum((gt | take).to(tl.int32), axis=0) - 1
    else:
        pos = tl.where(gt, run_gt + tl.cumsum(gt_i, axis=0) - 1, n_gt + r_eq)
    tl.store(idx_row + pos * s_ik, offs, mask=gt | take)
    if HAS_VAL:
        tl.store(val_row + pos * s_vk, x, mask=gt | take)
    return run_gt + tl.sum(gt_i, axis=0), run_eq + tl.sum(eq_i, axis=0)


@triton.jit
def topk_select_kernel(sc_ptr, vis_ptr, idx_ptr, val_ptr, cand_ptr, S, N,
                       s_cb, s_cs, s_cn, s_vb, s_vs, s_ib, s_is, s_ik, s_xb, s_xs, s_xk, s_mb, s_ms, s_mn,
                       TOPK: tl.constexpr, HAS_VAL: tl.constexpr, HAS_CAND: tl.constexpr, SORTED: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """One program per row: exactly ``kk = min(TOPK, selectable)`` distinct indices, -1 in the other slots.

    A key is selectable below ``visible`` and, with HAS_CAND, where the candidate mask (bool bytes) is set
    (one counting pass first). Radix select on order-preserving int32 keys, 8 bits per pass (4 histogram
    passes) finds the kk-th largest key ``thr`` and how many of the row's ties at ``thr`` to take; one
    compaction pass then writes the keys above ``thr`` and the first ``need`` ties (SORTED: all in index
    order). No sort of the row.
    """
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    s = (row % S).to(tl.int64)
    vis = tl.minimum(tl.maximum(tl.load(vis_ptr + b * s_vb + s * s_vs), 0), N)
    idx_row = idx_ptr + b * s_ib + s * s_is
    val_row = val_ptr + b * s_xb + s * s_xs
    row_ptr = sc_ptr + b * s_cb + s * s_cs
    cand_row = cand_ptr + b * s_mb + s * s_ms
    if HAS_CAND:
        count = vis * 0
        if INTERP:
            c0 = 0
            while c0 < vis:
                count += tl.sum(_selectable(c0 + tl.arange(0, BLOCK_N), vis, cand_row, s_mn, HAS_CAND).to(tl.int32))
                c0 += BLOCK_N
        else:
            for c0 in range(0, vis, BLOCK_N):
                count += tl.sum(_selectable(c0 + tl.arange(0, BLOCK_N), vis, cand_row, s_mn, HAS_CAND).to(tl.int32))
        kk = tl.minimum(count, TOPK)
    else:
        kk = tl.minimum(vis, TOPK)
    for c0 in range(0, TOPK, BLOCK_K):
        slots = c0 + tl.arange(0, BLOCK_K)
        tail = (slots >= kk) & (slots < TOPK)
        tl.store(idx_row + slots * s_ik, tl.full([BLOCK_K], -1, tl.int32), mask=tail)
        if HAS_VAL:
            tl.store(val_row + slots * s_xk, tl.full([BLOCK_K], float("-inf"), tl.float32), mask=tail)
    if kk > 0:
        need = kk
        prefix = kk * 0
        bins = tl.arange(0, 256)
        for p in tl.static_range(4):
            hist = tl.zeros([256], tl.int32)
            if INTERP:
                c0 = 0
                while c0 < vis:
                    hist = _hist_chunk(c0, hist, row_ptr, s_cn, vis, prefix, cand_row, s_mn, 24 - 8 * p, p == 0,
                                       HAS_CAND, BLOCK_N)
                    c0 += BLOCK_N
            else:
                for c0 in range(0, vis, BLOCK_N):
                    hist = _hist_chunk(c0, hist, row_ptr, s_cn, vis, prefix, cand_row, s_mn, 24 - 8 * p, p == 0,
                                       HAS_CAND, BLOCK_N)
            ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist      # candidates with digit >= d
            digit = tl.sum((ge >= need).to(tl.int32), axis=0) - 1
            need -= tl.sum(tl.where(bins > digit, hist, 0), axis=0)
            prefix = prefix | (digit << (24 - 8 * p))
        thr = prefix ^ (-2147483648)
        n_gt = kk - need
        run_gt = kk * 0
        run_eq = kk * 0
        if INTERP:
            c0 = 0
            while c0 < vis:
                run_gt, run_eq = _compact_chunk(c0, run_gt, run_eq, row_ptr, s_cn, vis, thr, n_gt, need, idx_row,
                                                s_ik, val_row, s_xk, cand_row, s_mn, HAS_VAL, HAS_CAND, SORTED,
                                                BLOCK_N)
                c0 += BLOCK_N
        else:
            for c0 in range(0, vis, BLOCK_N):
                run_gt, run_eq = _compact_chunk(c0, run_gt, run_eq, row_ptr, s_cn, vis, thr, n_gt, need, idx_row,
                                                s_ik, val_row, s_xk, cand_row, s_mn, HAS_VAL, HAS_CAND, SORTED,
                                                BLOCK_N)


@triton.jit
def block_scores_kernel(sc_ptr, len_ptr, best_ptr, keep_ptr, S, N, NB, BS, s_cb, s_cs, s_cn, s_lb, s_ls,
                        ALL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr):
    """Grid (rows, block chunks) of select_candidate_blocks: ``best[r, j]`` = the max score of block j's
    positions (NaN as -inf), +inf for the block of position ``compress_len - 1``; ``keep[r, j]`` = best > -inf
    when ALL (every live block is kept), else 0 (``keep_blocks_kernel`` sets the chosen ones)."""
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    s = (row % S).to(tl.int64)
    j = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    w = tl.arange(0, BLOCK_W)
    t = j.to(tl.int64)[:, None] * BS + w[None, :]
    ok = (j[:, None] < NB) & (w[None, :] < BS) & (t < N)
    x = tl.load(sc_ptr + b * s_cb + s * s_cs + t * s_cn, mask=ok, other=float("-inf")).to(tl.float32)
    best = tl.max(tl.where(x != x, float("-inf"), x), axis=1)
    ln = tl.load(len_ptr + b * s_lb + s * s_ls)
    best = tl.where((ln > 0) & (j == (tl.maximum(ln, 1) - 1) // BS), float("inf"), best)
    out = row.to(tl.int64) * NB + j
    tl.store(best_ptr + out, best, mask=j < NB)
    keep = best > float("-inf")
    if not ALL:
        keep = keep & (j < 0)
    tl.store(keep_ptr + out, keep.to(tl.uint8), mask=j < NB)


@triton.jit
def keep_blocks_kernel(idx_ptr, val_ptr, keep_ptr, NB, TOPK: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: ``keep[r, idx]`` = 1 for the selected blocks whose score is above -inf."""
    row = tl.program_id(0).to(tl.int64)
    for c0 in range(0, TOPK, BLOCK_K):
        k = c0 + tl.arange(0, BLOCK_K)
        ok = k < TOPK
        i = tl.load(idx_ptr + row * TOPK + k, mask=ok, other=-1)
        v = tl.load(val_ptr + row * TOPK + k, mask=ok, other=float("-inf"))
        sel = ok & (i >= 0) & (v > float("-inf"))
        tl.store(keep_ptr + row * NB + i, tl.full([BLOCK_K], 1, tl.uint8), mask=sel)


@triton.jit
def expand_blocks_kernel(keep_ptr, mask_ptr, N, NB, BS, BLOCK_T: tl.constexpr):
    """Grid (rows, position chunks): ``mask[r, t] = keep[r, t // BS]``."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < N
    kb = tl.load(keep_ptr + row * NB + t // BS, mask=ok, other=0)
    tl.store(mask_ptr + row * N + t, kb, mask=ok)
