"""Triton kernels of the Engram family (DeepSeek-V4.1): the n-gram hash and the FP8 row gather + dequantisation.

Only ``@triton.jit`` code; the launchers are in ``backends/cuda/engram.py``. The hash runs in int64 (the
contract keeps every product below 2^63, so no lane wraps); the lookup decodes E4M3 and E8M0 bytes in
registers (``kernels.decode``) and reads only the requested table rows.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode import e4m3_to_f32, e8m0_to_f32
from .gemm import _out


@triton.jit
def engram_hash_kernel(win_ptr, mult_ptr, primes_ptr, off_ptr, out_ptr, T, H, pad_id,
                       s_wt, s_wk, s_m, s_pn, s_ph, s_o, s_ot, s_oc,
                       N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """BLOCK_T tokens per program: walk the N window slots (unrolled), a DEAD (-1) slot and every later one
    as ``pad_id``; the running XOR of ``tok_k * m_k`` is reduced modulo the H primes of each n-gram size and
    offset into its bucket range."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    rows = offs_t.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    dead = offs_t < 0
    h = tl.zeros([BLOCK_T], tl.int64)
    for k in tl.static_range(N):
        v = tl.load(win_ptr + rows * s_wt + k * s_wk, mask=t_ok, other=0)
        dead = dead | (v == -1)
        prod = tl.where(dead, pad_id, v).to(tl.int64) * tl.load(mult_ptr + k * s_m)
        if k == 0:
            h = prod
        else:
            h = h ^ prod
            cols = (k - 1) * H + offs_h
            p = tl.load(primes_ptr + (k - 1) * s_pn + offs_h * s_ph, mask=h_ok, other=1)
            o = tl.load(off_ptr + cols * s_o, mask=h_ok, other=0)
            tl.store(out_ptr + rows[:, None] * s_ot + cols[None, :] * s_oc, h[:, None] % p[None, :] + o[None, :],
                     mask=t_ok[:, None] & h_ok[None, :])


@triton.jit
def engram_lookup_kernel(ids_ptr, w_ptr, s_ptr, out_ptr, R, NCOL, D,
                         s_it, s_in, s_wr, s_wd, s_sr, s_sd, s_ot, s_on, s_od,
                         INTERP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_R requested rows (flat slot r = t * NCOL + i) x BLOCK_D columns per program: load the row ids,
    gather those rows' E4M3 bytes and E8M0 scales, ``value * 2^(scale - 127)`` in fp32 (exact), stored
    rounded to the output dtype. Rows not requested are never addressed."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    t = (offs_r // NCOL).to(tl.int64)
    i = (offs_r % NCOL).to(tl.int64)
    row = tl.load(ids_ptr + t * s_it + i * s_in, mask=r_ok, other=0).to(tl.int64)
    G: tl.constexpr = BLOCK_D // 32
    offs_g = tl.program_id(1) * G + tl.arange(0, G)
    sc = tl.load(s_ptr + row[:, None] * s_sr + offs_g[None, :] * s_sd,
                 mask=r_ok[:, None] & (offs_g[None, :] < D // 32), other=127).to(tl.int32)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = r_ok[:, None] & (offs_d[None, :] < D)
    bits = tl.load(w_ptr + row[:, None] * s_wr + offs_d[None, :] * s_wd, mask=ok, other=0)
    v = tl.reshape(e4m3_to_f32(bits), [BLOCK_R, G, 32]) * e8m0_to_f32(sc)[:, :, None]
    v = tl.reshape(v, [BLOCK_R, BLOCK_D])
    tl.store(out_ptr + t[:, None] * s_ot + i[:, None] * s_on + offs_d[None, :] * s_od, _out(v, out_ptr, INTERP),
             mask=ok)
