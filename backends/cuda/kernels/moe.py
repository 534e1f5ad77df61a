"""Triton kernels of the MoE family: moe_route, moe_dispatch (counting sort), moe_combine.

Only ``@triton.jit`` code lives here; the launchers are in ``backends/cuda/moe.py``. Loops with a
run-time trip count come in two spellings selected by the ``INTERP`` constexpr: a ``while`` loop for the
Triton interpreter (Triton 3.6's cannot take run-time ``range`` bounds under NumPy 2) and a ``for`` loop
on the GPU. Data movement copies raw bits (the launcher views rows as integers of the element size).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sqrt_softplus(z):
    """(s, log s) for ``s = sqrt(softplus(z))``, softplus linear above 20; ``log1p`` by the
    ``log(u) * x / (u - 1)`` correction, and ``log s = z / 2`` below -20 (where s underflows)."""
    x = tl.exp(tl.minimum(z, 20.0))
    u = 1.0 + x
    lp = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))
    sp = tl.where(z > 20.0, z, lp)
    ls = tl.where(z < -20.0, 0.5 * z, 0.5 * tl.log(tl.where(sp > 0, sp, 1.0)))
    return tl.sqrt(sp), ls


@triton.jit
def moe_route_kernel(logits_ptr, bias_ptr, alt_ptr, use_ptr, hash_ptr, ids_ptr, w_ptr, T, E, route_scale,
                     log_eps, s_lt, s_le, s_b, s_a, s_u, s_ht, s_hk, s_it, s_ik, s_wt, s_wk,
                     TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALT: tl.constexpr, HASH: tl.constexpr,
                     HAS_EPS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """BLOCK_T tokens per program: top-k by ``s + b_t`` (``b_t`` = ``bias_alt`` for the tokens ``use_alt``
    marks (HAS_ALT), else ``bias``; by the logit itself without a bias: the same order, free of underflow
    ties) through TOPK rounds of row argmax, or the ids of ``hash_ids``; weights = softmax of ``log s``
    over the chosen (= s / sum s) times ``route_scale``, and with HAS_EPS times
    ``S / (S + eps) = 1 / (1 + exp(log_eps - log S))`` (finite where S underflows)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < TOPK
    ok2 = t_ok[:, None] & k_ok[None, :]
    if HASH:
        ids = tl.load(hash_ptr + offs_t[:, None] * s_ht + offs_k[None, :] * s_hk, mask=ok2, other=0).to(tl.int32)
        z = tl.load(logits_ptr + offs_t[:, None] * s_lt + ids * s_le, mask=ok2, other=0.0)
        _, lsel = _sqrt_softplus(z)
        lsel = tl.where(k_ok[None, :], lsel, float("-inf"))
    else:
        offs_e = tl.arange(0, BLOCK_E)
        e_ok = offs_e < E
        z = tl.load(logits_ptr + offs_t[:, None] * s_lt + offs_e[None, :] * s_le,
                    mask=t_ok[:, None] & e_ok[None, :], other=0.0)
        s, ls = _sqrt_softplus(z)
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_e * s_b, mask=e_ok, other=0.0)[None, :]
            if HAS_ALT:
                use = tl.load(use_ptr + offs_t * s_u, mask=t_ok, other=0) != 0
                alt = tl.load(alt_ptr + offs_e * s_a, mask=e_ok, other=0.0)[None, :]
                b = tl.where(use[:, None], alt, b)
            sel = s + b
        else:
            sel = z
        sel = tl.where(e_ok[None, :], sel, float("-inf"))
        ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
        lsel = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)
        for j in range(TOPK):
            best = tl.argmax(sel, axis=1).to(tl.int32)
            hit = offs_e[None, :] == best[:, None]
            lj = tl.sum(tl.where(hit, ls, 0.0), axis=1)
            ids = tl.where(offs_k[None, :] == j, best[:, None], ids)
            lsel = tl.where(offs_k[None, :] == j, lj[:, None], lsel)
            sel = tl.where(hit, float("-inf"), sel)
    mx = tl.max(lsel, axis=1)
    ex = tl.exp(lsel - mx[:, None])
    tot = tl.sum(ex, axis=1)
    w = ex / tot[:, None] * route_scale
    if HAS_EPS:
        w = w / (1.0 + tl.exp(log_eps - mx - tl.log(tot)))[:, None]
    tl.store(ids_ptr + offs_t[:, None] * s_it + offs_k[None, :] * s_ik, ids, mask=ok2)
    tl.store(w_ptr + offs_t[:, None] * s_wt + offs_k[None, :] * s_wk, w, mask=ok2)


@triton.jit
def _expert_of(ids_ptr, p, ok, K, s_it, s_ik):
    """Expert of the flat pairs ``p = t*K + j`` (0 where not ``ok``)."""
    t = p // K
    return tl.load(ids_ptr + t * s_it + (p - t * K) * s_ik, mask=ok, other=0)


@triton.jit
def _drop_sink(hist, bins, dead):
    """``hist`` less the ``dead`` lanes that were counted in bin 0. Masked lanes are redirected to bin 0 and
    taken out here instead of passing ``mask=`` to ``tl.histogram``, which older front ends (Triton 3.2,
    triton-ascend) do not take; one scalar per call, nothing per lane."""
    return hist - tl.where(bins == 0, dead, 0)


@triton.jit
def dispatch_count_kernel(ids_ptr, counts_ptr, R, K, E, s_it, s_ik,
                          BLOCK_R: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    """counts[blk, e]: pairs of block ``blk`` (BLOCK_R consecutive pairs) routed to expert e."""
    blk = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    cnt = tl.zeros([BLOCK_E], tl.int32)
    dead = blk * 0
    for c in range(0, BLOCK_R, SUB):
        p = blk * BLOCK_R + c + tl.arange(0, SUB)
        ok = p < R
        cnt += tl.histogram(_expert_of(ids_ptr, p, ok, K, s_it, s_ik), BLOCK_E)
        dead += SUB - tl.sum(ok.to(tl.int32), axis=0)
    tl.store(counts_ptr + blk * E + offs_e, _drop_sink(cnt, offs_e, dead), mask=offs_e < E)


@triton.jit
def _scan_chunk(c0, run, counts_ptr, base_ptr, NBLK, E, NBC: tl.constexpr, BLOCK_E: tl.constexpr):
    """base[c0:c0+NBC, :] = ``run`` + exclusive scan of those blocks' counts; returns the new ``run``."""
    rows = c0 + tl.arange(0, NBC)
    offs_e = tl.arange(0, BLOCK_E)
    ok = (rows[:, None] < NBLK) & (offs_e[None, :] < E)
    tile = tl.load(counts_ptr + rows[:, None] * E + offs_e[None, :], mask=ok, other=0)
    tl.store(base_ptr + rows[:, None] * E + offs_e[None, :], tl.cumsum(tile, axis=0) - tile + run[None, :], mask=ok)
    return run + tl.sum(tile, axis=0)


@triton.jit
def dispatch_scan_kernel(counts_ptr, base_ptr, offsets_ptr, NBLK, E,
                         NBC: tl.constexpr, BLOCK_E: tl.constexpr, INTERP: tl.constexpr):
    """One program: base[blk, e] = pairs of expert e in blocks before blk (exclusive scan over blocks,
    NBC blocks at a time), offsets[e] = pairs of experts < e, offsets[E] = all pairs."""
    run = tl.zeros([BLOCK_E], tl.int32)
    if INTERP:
        c0 = 0
        while c0 < NBLK:
            run = _scan_chunk(c0, run, counts_ptr, base_ptr, NBLK, E, NBC, BLOCK_E)
            c0 += NBC
    else:
        for c0 in range(0, NBLK, NBC):
            run = _scan_chunk(c0, run, counts_ptr, base_ptr, NBLK, E, NBC, BLOCK_E)
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(offsets_ptr + offs_e, tl.cumsum(run, axis=0) - run, mask=offs_e < E)
    tl.store(offsets_ptr + E, tl.sum(run, axis=0))


@triton.jit
def dispatch_scatter_kernel(ids_ptr, base_ptr, offsets_ptr, src_ptr, dst_ptr, R, K, E, s_it, s_ik,
                            FUSED: tl.constexpr, BLOCK_R: tl.constexpr, SUB: tl.constexpr,
                            BLOCK_E: tl.constexpr):
    """Stable destinations of the pairs of block ``blk``: ``pos = offsets[e] + base[blk, e] + (pairs of e
    earlier in the block)``, the last term from running per-expert counts over SUB-pair sub-tiles plus a
    [SUB, SUB] earlier-and-equal count. Writes ``src[pos] = p`` and ``dst[p] = pos``. FUSED (one program,
    all pairs in one block) computes the offsets itself and needs no count / scan kernels."""
    blk = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    lane = tl.arange(0, SUB)
    if FUSED:
        tot = tl.zeros([BLOCK_E], tl.int32)
        for c in range(0, BLOCK_R, SUB):
            p = c + lane
            tot += tl.histogram(_expert_of(ids_ptr, p, p < R, K, s_it, s_ik), BLOCK_E)   # lanes >= R in bin 0
        tot = _drop_sink(tot, offs_e, tl.maximum(BLOCK_R - R, 0))
        run = tl.cumsum(tot, axis=0) - tot
        tl.store(offsets_ptr + offs_e, run, mask=e_ok)
        tl.store(offsets_ptr + E, tl.sum(tot, axis=0))
    else:
        run = tl.load(base_ptr + blk * E + offs_e, mask=e_ok, other=0)
        run += tl.load(offsets_ptr + offs_e, mask=e_ok, other=0)
    for c in range(0, BLOCK_R, SUB):
        p = blk * BLOCK_R + c + lane
        ok = p < R
        e = _expert_of(ids_ptr, p, ok, K, s_it, s_ik)
        hit = (e[:, None] == offs_e[None, :]) & ok[:, None]
        start = tl.sum(tl.where(hit, run[None, :], 0), axis=1)
        earlier = (e[:, None] == e[None, :]) & (lane[None, :] < lane[:, None]) & ok[None, :]
        pos = start + tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(src_ptr + pos, p, mask=ok)
        tl.store(dst_ptr + p, pos, mask=ok)
        run += tl.sum(hit.to(tl.int32), axis=0)


@triton.jit
def dispatch_copy_kernel(x_ptr, dst_ptr, out_ptr, T, Hd, s_xt, s_xh, s_or, s_oh,
                         TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Reads each x tile once and writes it to the TOPK destination rows of its tokens."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = offs_t < T
    ok = t_ok[:, None] & (offs_h[None, :] < Hd)
    tile = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * s_xt + offs_h[None, :] * s_xh, mask=ok)
    for j in range(TOPK):
        pos = tl.load(dst_ptr + offs_t * TOPK + j, mask=t_ok, other=0).to(tl.int64)
        tl.store(out_ptr + pos[:, None] * s_or + offs_h[None, :] * s_oh, tile, mask=ok)


@triton.jit
def invert_perm_kernel(src_ptr, dst_ptr, R, s_src, BLOCK: tl.constexpr):
    """dst[src[r]] = r (src is a permutation, so no two programs write one element)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < R
    p = tl.load(src_ptr + r * s_src, mask=ok, other=0)
    tl.store(dst_ptr + p, r, mask=ok)


@triton.jit
def combine_kernel(y_ptr, dst_ptr, w_ptr, out_ptr, T, Hd, s_yr, s_yh, s_wt, s_wk, s_ot, s_oh,
                   TOPK: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum_j w[t, j] * y_sorted[dst[t*TOPK + j]] in fp32: a gather, no atomics."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = offs_t < T
    ok = t_ok[:, None] & (offs_h[None, :] < Hd)
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for j in range(TOPK):
        r = tl.load(dst_ptr + offs_t * TOPK + j, mask=t_ok, other=0).to(tl.int64)
        y = tl.load(y_ptr + r[:, None] * s_yr + offs_h[None, :] * s_yh, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            y *= tl.load(w_ptr + offs_t * s_wt + j * s_wk, mask=t_ok, other=0.0)[:, None]
        acc += y
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * s_ot + offs_h[None, :] * s_oh,
             acc.to(out_ptr.dtype.element_ty), mask=ok)
