"""NumPy FP4 / FP8 dequant GEMMs: fp4_gemm, fp4_grouped_gemm, fp8_gemm.

All three block over K: one block of weights is dequantised (by ``dsv4rt.formats``) to float32 at a
time and ``x_blk @ w_blk.T`` is accumulated in float32 by BLAS, so the whole dequantised weight never
exists. Block widths are multiples of 128, so act_quant blocks and FP8 scale tiles align. In the
batch-invariant mode the products run row by row (``_np.matmul_into``).
"""
from __future__ import annotations

import numpy as np
import torch

from dsv4rt.formats import act_quant_fp8, dequant_fp8_block, dequant_mxfp4

from ._np import BUDGET, alloc_f32, f32, finish, ints, matmul_into, u8

ACT_BLOCK = 128
MAX_K_BLOCK = 2048


def _k_block(n: int, k: int) -> int:
    """Width of one K block: a multiple of 128 keeping ``n * width`` float32 within BUDGET."""
    width = (BUDGET // max(n, 1)) // ACT_BLOCK * ACT_BLOCK
    return max(ACT_BLOCK, min(width, MAX_K_BLOCK, -(-k // ACT_BLOCK) * ACT_BLOCK))


def _activations(x: torch.Tensor, act_quant: str | None, block: int = ACT_BLOCK) -> np.ndarray:
    """x as float32 [M, K]; with act_quant='fp8', the E4M3 values times their power-of-two scales
    (one per 1 x block of K; exact in float32), exactly as the reference's ``act_quant``."""
    xf = f32(x)
    if act_quant is None:
        return xf
    q, s = act_quant_fp8(xf, block)
    return q * np.repeat(s, block, axis=1)[:, :xf.shape[1]]


def _fp4_matmul(xq: np.ndarray, wb: np.ndarray, sb: np.ndarray, acc: np.ndarray) -> None:
    """acc[M, N] = xq[M, K] @ dequant(wb, sb)[N, K]^T, one K block of weights at a time."""
    k = xq.shape[1]
    if k == 0 or xq.shape[0] == 0:
        acc[...] = 0.0
        return
    step = _k_block(wb.shape[0], k)
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        wk = dequant_mxfp4(wb, sb, np.float32, k_range=(k0, k1))  # [N, k1-k0]
        matmul_into(xq[:, k0:k1], wk.T, acc, add=k0 > 0)


def fp4_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             act_quant: str | None = None, act_block_size: int = ACT_BLOCK) -> torch.Tensor:
    """y[M, N] = q(x) @ dequant(w)^T: MXFP4 weights, float32 accumulation, output in x's dtype.

    Dequantises at most one [N, k-block] slice of w at a time (block width adapts to N, multiple of 128).
    ``act_block_size``: the K width of one activation scale with act_quant='fp8' (128 V4, 32 V4.1).
    """
    xq = _activations(x, act_quant, act_block_size)
    out, acc = alloc_f32((x.shape[0], w.shape[0]), x.dtype)
    _fp4_matmul(xq, u8(w), u8(w_scale), acc)
    return finish(out, acc)


def fp4_grouped_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor,
                     act_quant: str | None = None, act_block_size: int = ACT_BLOCK) -> torch.Tensor:
    """y[R, N]: rows offsets[e]:offsets[e+1] of x times expert e's MXFP4 weight, float32 accumulation.

    Loops over non-empty experts only; each expert is K-blocked like fp4_gemm. act_quant is per row, so
    x is quantised once for all experts.
    """
    xq = _activations(x, act_quant, act_block_size)
    n = w.shape[1]
    out, acc = alloc_f32((x.shape[0], n), x.dtype)
    wb, sb, off = u8(w), u8(w_scale), ints(offsets).astype(np.int64)
    for e in np.flatnonzero(off[1:] > off[:-1]):
        lo, hi = int(off[e]), int(off[e + 1])
        _fp4_matmul(xq[lo:hi], wb[e], sb[e], acc[lo:hi])
    return finish(out, acc)


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             act_quant: str | None = None, block_size: int = ACT_BLOCK) -> torch.Tensor:
    """y[M, N] = q(x) @ dequant(w)^T for E4M3 weights with bs x bs block scales (E8M0 or float32),
    bs = ``block_size`` (128 V4, 32 V4.1; also the act_quant block).

    K-blocked in multiples of 128: each step dequantises one [N, k-block] slice with its scale columns.
    """
    bs = block_size
    xq = _activations(x, act_quant, bs)
    m, k = xq.shape
    n = w.shape[0]
    out, acc = alloc_f32((m, n), x.dtype)
    wb = u8(w)
    sc = u8(w_scale) if w_scale.dtype != torch.float32 else f32(w_scale)
    if k == 0 or m == 0:
        acc[...] = 0.0
        return finish(out, acc)
    step = _k_block(n, k)
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        wk = dequant_fp8_block(wb[:, k0:k1], sc[:, k0 // bs:-(-k1 // bs)], bs, np.float32)
        matmul_into(xq[:, k0:k1], wk.T, acc, add=k0 > 0)
    return finish(out, acc)
