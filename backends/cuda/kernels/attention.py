"""Triton kernels of the attention family: kv_compress (spec 3.2 / 4.1) and sparse_attention (spec 3.5).

Only ``@triton.jit`` code lives here; the launchers are in ``backends/cuda/attention.py``.
``INTERP`` (constexpr) is True under the Triton interpreter, whose ``tl.dot`` multiplies bfloat16 tiles as
their raw uint16 bits: there the MMA operands are upcast to float32 first (exact for bf16/fp16 values) and
P is rounded to its ``p_dtype`` in float32 registers. On a GPU the operands go to the tensor cores in the input dtype with fp32 accumulation.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode import e4m3_to_f32, e8m0_to_f32
from .rounding import round_to


@triton.jit
def kv_compress_kernel(kv_ptr, gate_ptr, ape_ptr, pkv_ptr, pgate_ptr, out_ptr, NB, D,
                       s_kb, s_ks, s_kc, s_gb, s_gs, s_gc, s_ar, s_ac,
                       s_pkb, s_pks, s_pkc, s_pgb, s_pgs, s_pgc, s_ob, s_oj, s_oc,
                       RATIO: tl.constexpr, OVERLAP: tl.constexpr, HAS_PREV: tl.constexpr,
                       HAS_GATE: tl.constexpr, HAS_APE: tl.constexpr,
                       BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per (entry block, channel block, b): a per-channel softmax over each entry's tokens.

    The tokens of an entry are a [BLOCK_J, BLOCK_R, BLOCK_C] tile (entries x position-in-block x channels),
    reduced along axis 1: the own block (channels ``c + D`` when OVERLAP) and, when OVERLAP, the previous
    block on channels ``c`` (``prev_*`` for entry 0 when HAS_PREV, else logit -inf). Without HAS_APE no
    position bias is added; without HAS_GATE (ratio 1) the entry is the token's kv row itself.
    """
    pid_j = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    j3 = offs_j[:, None, None]
    r3 = offs_r[None, :, None]
    c3 = offs_c[None, None, :]
    ok = (j3 < NB) & (r3 < RATIO) & (c3 < D)
    o_ok = (offs_j[:, None] < NB) & (offs_c[None, :] < D)
    o_ptr = out_ptr + b * s_ob + offs_j[:, None] * s_oj + offs_c[None, :] * s_oc
    own_c = c3 + D if OVERLAP else c3
    tok = j3 * RATIO + r3
    v = tl.load(kv_ptr + b * s_kb + tok * s_ks + own_c * s_kc, mask=ok, other=0.0).to(tl.float32)
    if not HAS_GATE:   # ratio 1: one token per entry, nothing to pool (masked lanes add 0)
        tl.store(o_ptr, tl.sum(v, axis=1), mask=o_ok)
        return
    g = tl.load(gate_ptr + b * s_gb + tok * s_gs + own_c * s_gc, mask=ok, other=0.0).to(tl.float32)
    # rows shared by every entry (ape, the previous call's block) are loaded once as [1, R, C] with a mask of
    # their own shape and broadcast by the arithmetic: a load whose mask is wider than its pointer is refused
    # by Triton 3.2's front end (triton-ascend), and one load per program is less traffic anyway
    rc_ok = (r3 < RATIO) & (c3 < D)
    if HAS_APE:
        g = g + tl.load(ape_ptr + r3 * s_ar + own_c * s_ac, mask=rc_ok, other=0.0).to(tl.float32)
    g = tl.where(ok, g, float("-inf"))
    m = tl.max(g, axis=1)
    if OVERLAP:
        first = j3 == 0
        tokp = tok - RATIO
        pg = tl.load(gate_ptr + b * s_gb + tokp * s_gs + c3 * s_gc, mask=ok & (j3 > 0), other=0.0).to(tl.float32)
        pv = tl.load(kv_ptr + b * s_kb + tokp * s_ks + c3 * s_kc, mask=ok & (j3 > 0), other=0.0).to(tl.float32)
        if HAS_PREV:
            p0_ok = rc_ok & ((r3 * 0 + pid_j) == 0)   # only the program holding entry 0 reads prev_*
            pg0 = tl.load(pgate_ptr + b * s_pgb + r3 * s_pgs + c3 * s_pgc, mask=p0_ok, other=0.0)
            pv0 = tl.load(pkv_ptr + b * s_pkb + r3 * s_pks + c3 * s_pkc, mask=p0_ok, other=0.0)
            pg = tl.where(first, pg0.to(tl.float32), pg)
            pv = tl.where(first, pv0.to(tl.float32), pv)
            pok = ok
        else:
            pok = ok & (j3 > 0)
        if HAS_APE:
            pg = pg + tl.load(ape_ptr + r3 * s_ar + c3 * s_ac, mask=rc_ok, other=0.0).to(tl.float32)
        pg = tl.where(pok, pg, float("-inf"))
        m = tl.maximum(m, tl.max(pg, axis=1))
    m = tl.where(m == float("-inf"), 0.0, m)  # only padded lanes; keeps exp() finite
    p = tl.exp(g - m[:, None, :])
    den = tl.sum(p, axis=1)
    num = tl.sum(p * v, axis=1)
    if OVERLAP:
        pp = tl.exp(pg - m[:, None, :])
        den += tl.sum(pp, axis=1)
        num += tl.sum(pp * pv, axis=1)
    # den = 0 (every logit -inf: an empty softmax) gives NaN as the contract says; padded lanes are not stored
    tl.store(o_ptr, num / den, mask=o_ok)


@triton.jit
def _rows_v41(ids, valid, kv_ptr, kv_base, g_ptr, g_base, N, D, s_kn, s_kd, s_gn, s_gd, BLOCK_D: tl.constexpr,
              MASKED_GATHER: tl.constexpr):
    """Decoded float32 [BLOCK_K, BLOCK_D] rows of the V4.1 packed cache: ids < N from the FP8 window rows
    (E4M3 codes, then a UE8M0 byte per 32), ids >= N from the FP4 global rows (E2M1 pairs, low nibble =
    even element, then an E4M3 byte per 16). One code-byte and one scale-byte gather per element (each
    row's own addresses; repeated bytes come from L1), an E2M1 nibble turned into the E4M3 byte of the
    same value, then one E4M3 decode times the scale: elementwise, so the compiler keeps one tile live.
    Skipped entries and padding lanes read 0. The gather: one load through a select of the two row pointers
    (NVIDIA, the interpreter), or with MASKED_GATHER (Ascend: triton-ascend's adapter cannot lower a load from
    ``tl.where(c, ptr_a, ptr_b)``) one masked load per kind and a select of the values; the same bytes either
    way (the pointer select keeps sm_90a free of spills, where the two loads spilled up to 128 B)."""
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    g = (ids >= N)[:, None]
    ok = valid[:, None] & (offs_d < D)
    wrow = kv_ptr + kv_base + ids.to(tl.int64)[:, None] * s_kn
    grow = g_ptr + g_base + (ids - N).to(tl.int64)[:, None] * s_gn
    if MASKED_GATHER:
        gok = ok & g
        wok = ok & (ids < N)[:, None]
        byte = tl.where(g, tl.load(grow + (offs_d // 2) * s_gd, mask=gok, other=0),
                        tl.load(wrow + offs_d * s_kd, mask=wok, other=0)).to(tl.int32)
        sb = tl.where(g, tl.load(grow + (D // 2 + offs_d // 16) * s_gd, mask=gok, other=0),
                      tl.load(wrow + (D + offs_d // 32) * s_kd, mask=wok, other=0))
    else:
        byte = tl.load(tl.where(g, grow + (offs_d // 2) * s_gd, wrow + offs_d * s_kd), mask=ok,
                       other=0).to(tl.int32)
        sb = tl.load(tl.where(g, grow + (D // 2 + offs_d // 16) * s_gd, wrow + (D + offs_d // 32) * s_kd),
                     mask=ok, other=0)
    nib = tl.where((offs_d & 1) == 1, byte >> 4, byte & 15)
    e = (nib >> 1) & 3
    mt = nib & 1
    as_e4m3 = tl.where(e == 0, mt * 0x30, ((e + 6) << 3) | (mt << 2)) | ((nib & 8) << 4)   # 0.5 = 0x30
    return e4m3_to_f32(tl.where(g, as_e4m3, byte)) * tl.where(g, e4m3_to_f32(sb), e8m0_to_f32(sb))


@triton.jit
def _attend_block(k0, k_hi, q, m, l, acc, kv_ptr, idx_ptr, row_idx, kv_base, D, scale, s_kn, s_kd, s_ik,
                  g_ptr, g_base, N, s_gn, s_gd,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr,
                  P_MODE: tl.constexpr, P_MMA: tl.constexpr, KV41: tl.constexpr, ROWS_BF16: tl.constexpr,
                  MASKED_GATHER: tl.constexpr):
    """One online-softmax step over entries ``[k0, min(k0 + BLOCK_K, k_hi))``: gathers the kv rows once
    ([BLOCK_K, D]) and feeds them to every head of the block through two MMAs.

    P for the P.V product (``p_dtype``): P_MMA (P's dtype is the kv dtype, on a GPU) casts P to it and
    multiplies on the tensor cores; otherwise P is rounded to bf16 (P_MODE 1) / fp16 (2) or kept (0) and
    multiplied in fp32. The denominator always sums the fp32 P. KV41: the rows are decoded from the packed
    V4.1 cache (:func:`_rows_v41`), then cast to bf16 for the MMAs when ROWS_BF16 (exact)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    ids = tl.load(idx_ptr + row_idx + offs_k * s_ik, mask=offs_k < k_hi, other=-1)
    valid = ids >= 0
    if KV41:
        rows = _rows_v41(ids, valid, kv_ptr, kv_base, g_ptr, g_base, N, D, s_kn, s_kd, s_gn, s_gd, BLOCK_D,
                         MASKED_GATHER)
        if ROWS_BF16:
            rows = rows.to(tl.bfloat16)
    else:
        rows = tl.load(kv_ptr + kv_base + ids.to(tl.int64)[:, None] * s_kn + offs_d[None, :] * s_kd,
                       mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    if INTERP:
        rows = rows.to(tl.float32)
    s = tl.dot(q, tl.trans(rows)) * scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_use)
    p = tl.exp(s - m_use[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if P_MMA:
        pv = tl.dot(p.to(rows.dtype), rows)
    else:
        pv = tl.dot(round_to(p, P_MODE), rows.to(tl.float32))
    acc = acc * alpha[:, None] + pv
    return m_new, l, acc


@triton.jit
def _attend(q_ptr, kv_ptr, idx_ptr, row_q, row_idx, kv_base, k_lo, k_hi, H, D, scale,
            s_qh, s_qd, s_kn, s_kd, s_ik, g_ptr, g_base, N, s_gn, s_gd,
            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, INTERP: tl.constexpr,
            P_MODE: tl.constexpr, P_MMA: tl.constexpr, KV41: tl.constexpr, ROWS_BF16: tl.constexpr,
            MASKED_GATHER: tl.constexpr):
    """Online softmax of one head block over entries ``[k_lo, k_hi)`` of one query row.

    Returns (m, l, acc): running max (-inf where nothing valid), sum of exp(logit - m) and the
    unnormalised [BLOCK_H, BLOCK_D] fp32 output. Under the interpreter the loop is a ``while`` (Triton
    3.6's interpreter cannot take run-time ``range`` bounds with NumPy 2); on a GPU a pipelined ``for``.
    """
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + row_q + offs_h[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=(offs_h[:, None] < H) & (offs_d[None, :] < D), other=0.0)
    if INTERP or (KV41 and not ROWS_BF16):   # decoded fp32 rows: the q.k MMA in fp32 (exact for fp16 q)
        q = q.to(tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    if INTERP:
        k0 = k_lo
        while k0 < k_hi:
            m, l, acc = _attend_block(k0, k_hi, q, m, l, acc, kv_ptr, idx_ptr, row_idx, kv_base, D, scale,
                                      s_kn, s_kd, s_ik, g_ptr, g_base, N, s_gn, s_gd,
                                      BLOCK_K, BLOCK_D, INTERP, P_MODE, P_MMA, KV41, ROWS_BF16, MASKED_GATHER)
            k0 += BLOCK_K
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            m, l, acc = _attend_block(k0, k_hi, q, m, l, acc, kv_ptr, idx_ptr, row_idx, kv_base, D, scale,
                                      s_kn, s_kd, s_ik, g_ptr, g_base, N, s_gn, s_gd,
                                      BLOCK_K, BLOCK_D, INTERP, P_MODE, P_MMA, KV41, ROWS_BF16, MASKED_GATHER)
    return m, l, acc


@triton.jit
def _finish(m, l, acc, sink_ptr, o_ptr, lse_ptr, row_o, row_lse, H, D, s_oh, s_od, s_lh,
            HAS_SINK: tl.constexpr, HAS_LSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Adds the sink to the denominator, normalises and stores o (and lse) for one head block."""
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    mx = m
    if HAS_SINK:
        sink = tl.load(sink_ptr + offs_h, mask=h_ok, other=float("-inf"))
        mx = tl.maximum(mx, sink)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    den = l * tl.exp(m - mx)
    if HAS_SINK:
        den += tl.exp(sink - mx)
    factor = tl.where(den > 0, tl.exp(m - mx) / tl.where(den > 0, den, 1.0), 0.0)
    o = acc * factor[:, None]
    tl.store(o_ptr + row_o + offs_h[:, None] * s_oh + offs_d[None, :] * s_od, o.to(o_ptr.dtype.element_ty),
             mask=h_ok[:, None] & (offs_d[None, :] < D))
    if HAS_LSE:
        lse = tl.where(den > 0, mx + tl.log(tl.where(den > 0, den, 1.0)), float("-inf"))
        lse = tl.where((den != den) | (mx != mx), float("nan"), lse)          # a NaN row: NaN, not -inf
        tl.store(lse_ptr + row_lse + offs_h * s_lh, lse, mask=h_ok)


@triton.jit
def sparse_attn_kernel(q_ptr, kv_ptr, idx_ptr, sink_ptr, o_ptr, lse_ptr, ws_ptr, wsml_ptr, g_ptr,
                       S, H, D, K, k_per_split, scale, N,
                       s_qb, s_qs, s_qh, s_qd, s_kb, s_kn, s_kd, s_ib, s_is, s_ik,
                       s_ob, s_os, s_oh, s_od, s_lb, s_ls, s_lh, s_gb, s_gn, s_gd,
                       SPLIT: tl.constexpr, HAS_SINK: tl.constexpr, HAS_LSE: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       INTERP: tl.constexpr, P_MODE: tl.constexpr, P_MMA: tl.constexpr,
                       KV41: tl.constexpr = False, ROWS_BF16: tl.constexpr = False,
                       MASKED_GATHER: tl.constexpr = False):
    """Grid (B*S, head blocks, splits). SPLIT=False (prefill): all K entries, writes o and lse.
    SPLIT=True (decode): entries ``[split*k_per_split, ...)`` only; writes the unnormalised partial
    output to ``ws[row, h, split, :]`` and (m, l) to ``wsml[row, h, split, 0:2]`` for the combine kernel.
    KV41: ``kv`` holds the packed FP8 window rows (N of them) and ``g`` the packed FP4 global rows;
    MASKED_GATHER: how their bytes are gathered (:func:`_rows_v41`; set on Ascend)."""
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    s = (row % S).to(tl.int64)
    split = tl.program_id(2)
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    m, l, acc = _attend(q_ptr, kv_ptr, idx_ptr, b * s_qb + s * s_qs, b * s_ib + s * s_is, b * s_kb, k_lo, k_hi,
                        H, D, scale, s_qh, s_qd, s_kn, s_kd, s_ik, g_ptr, b * s_gb, N, s_gn, s_gd,
                        BLOCK_H, BLOCK_K, BLOCK_D, INTERP, P_MODE, P_MMA, KV41, ROWS_BF16, MASKED_GATHER)
    if SPLIT:
        nsplit = tl.num_programs(2)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        h_ok = offs_h < H
        base = (row.to(tl.int64) * H + offs_h) * nsplit + split           # [BLOCK_H] rows of the workspace
        tl.store(ws_ptr + base[:, None] * D + offs_d[None, :], acc, mask=h_ok[:, None] & (offs_d[None, :] < D))
        tl.store(wsml_ptr + base * 2, m, mask=h_ok)
        tl.store(wsml_ptr + base * 2 + 1, l, mask=h_ok)
    else:
        _finish(m, l, acc, sink_ptr, o_ptr, lse_ptr, b * s_ob + s * s_os, b * s_lb + s * s_ls, H, D,
                s_oh, s_od, s_lh, HAS_SINK, HAS_LSE, BLOCK_H, BLOCK_D)


@triton.jit
def sparse_attn_combine_kernel(ws_ptr, wsml_ptr, sink_ptr, o_ptr, lse_ptr, S, H, D,
                               s_ob, s_os, s_oh, s_od, s_lb, s_ls, s_lh,
                               NSPLIT: tl.constexpr, HAS_SINK: tl.constexpr, HAS_LSE: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B*S, head blocks): merges the NSPLIT partial (m, l, acc) of each head with its sink."""
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    s = (row % S).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < H
    ok2 = h_ok[:, None] & (offs_d[None, :] < D)
    base = (row.to(tl.int64) * H + offs_h) * NSPLIT
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for i in range(NSPLIT):
        m = tl.maximum(m, tl.load(wsml_ptr + (base + i) * 2, mask=h_ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for i in range(NSPLIT):
        w = tl.exp(tl.load(wsml_ptr + (base + i) * 2, mask=h_ok, other=float("-inf")) - m_use)
        l += w * tl.load(wsml_ptr + (base + i) * 2 + 1, mask=h_ok, other=0.0)
        acc += w[:, None] * tl.load(ws_ptr + (base + i)[:, None] * D + offs_d[None, :], mask=ok2, other=0.0)
    # (m_use, l, acc) is a valid online-softmax state: finish it exactly like the single-pass path.
    m_state = tl.where(l > 0, m_use, float("-inf"))
    _finish(m_state, l, acc, sink_ptr, o_ptr, lse_ptr, b * s_ob + s * s_os, b * s_lb + s * s_ls, H, D,
            s_oh, s_od, s_lh, HAS_SINK, HAS_LSE, BLOCK_H, BLOCK_D)
