"""Plain-torch FP4 / FP8 dequant GEMMs: fp4_gemm, fp4_grouped_gemm, fp8_gemm (spec sections 1.3-1.5).

The weight is decoded one K block at a time (``K_BLOCK`` columns, through :mod:`dsv4rt.formats`) and
multiplied in float32 into a float32 accumulator, so the whole dequantised weight is never materialised
(peak extra memory ~ N * K_BLOCK * 4 bytes). Decoding uses table look-ups only (no float8 casts), so the
same code runs on every device torch supports. Output dtype = x dtype.

In the batch-invariant mode (:mod:`dsv4rt.invariant`, CPU tensors only) the products run one row at a
time, so a row's sums never depend on how many rows the call has (slow: a debugging path).

Note: the fp32 matmuls follow torch's global matmul precision; on CUDA, enabling TF32
(``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision``) trades accuracy here too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4rt.backend import new_output
from dsv4rt.formats import act_quant_fp8, dequant_fp8_block, dequant_mxfp4
from dsv4rt.invariant import active, rowwise_mm

__all__ = ["fp4_gemm", "fp4_grouped_gemm", "fp8_gemm", "quantize_activation", "K_BLOCK"]

K_BLOCK = 1024
"""Columns of the weight decoded per step; a multiple of 128 (the FP8 block) and so of 32 (the FP4 block)."""
ACT_BLOCK = 128


def quantize_activation(x: Tensor, act_quant: str | None, block: int = ACT_BLOCK) -> Tensor:
    """``q(x)`` as float32 [M, K]: x itself (upcast) for None, else the official per-1 x ``block``
    power-of-two E4M3 fake-quant (``q * s``; exact in float32 because ``s`` is a power of two)."""
    if act_quant is None:
        return x.float()
    if act_quant != "fp8":
        raise ValueError(f"composite: act_quant={act_quant!r} is not a v1 mode (None or 'fp8')")
    k = x.shape[-1]
    q, s = act_quant_fp8(x, block)
    return q * s.repeat_interleave(block, dim=-1)[..., :k]


def _addmm(acc: Tensor, x: Tensor, w: Tensor) -> None:
    """``acc += x @ w.T``; row by row in the batch-invariant mode."""
    if active(x):
        acc.add_(rowwise_mm(x, w))
    else:
        acc.addmm_(x, w.T)


def _fp4_matmul(xq: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
    """float32 ``xq[M, K] @ dequant(w)[N, K].T`` decoding K_BLOCK columns of w at a time."""
    m, k = xq.shape
    n = w.shape[0]
    acc = torch.zeros((m, n), dtype=torch.float32, device=xq.device)
    if m == 0:
        return acc
    for k0 in range(0, k, K_BLOCK):
        k1 = min(k, k0 + K_BLOCK)
        wb = dequant_mxfp4(w, w_scale, torch.float32, k_range=(k0, k1))  # [N, k1-k0]
        _addmm(acc, xq[:, k0:k1], wb)
    return acc


def fp4_gemm(x: Tensor, w: Tensor, w_scale: Tensor, act_quant: str | None = None,
             act_block_size: int = ACT_BLOCK) -> Tensor:
    """``y[M, N] = q(x) @ dequant(w).T`` in float32, returned in x's dtype.

    ``x`` [M, K], ``w`` [N, K/2] packed E2M1 (low nibble = even k), ``w_scale`` [N, K/32] E8M0.
    The weight is decoded in K blocks of ``K_BLOCK`` columns; no host synchronisation. ``act_block_size``:
    the K width of one activation scale with act_quant="fp8" (128 V4, 32 V4.1).
    """
    out = new_output((x.shape[0], w.shape[0]), x.dtype, x.device)
    out.copy_(_fp4_matmul(quantize_activation(x, act_quant, act_block_size), w, w_scale))
    return out


def fp4_grouped_gemm(x: Tensor, w: Tensor, w_scale: Tensor, offsets: Tensor,
                     act_quant: str | None = None, act_block_size: int = ACT_BLOCK) -> Tensor:
    """Rows ``offsets[e]:offsets[e+1]`` of x times expert e's MXFP4 weight; ``y[R, N]`` in x's dtype.

    The activation quantisation is per row, so it runs once over all rows. Each non-empty expert
    segment is an :func:`fp4_gemm`-style K-blocked product; empty experts cost nothing.

    HOST SYNC: ``offsets.tolist()`` copies the E+1 segment bounds to the host once per call (one
    device->host transfer). Plain torch has no ragged matmul, and slicing the segments needs host
    integers; the alternatives (multiplying every row by every expert and masking, or padding every
    expert to the largest segment) cost E times the FLOPs or a sync for the capacity anyway.
    Fused kernels (cuda/triton, ascend/fused) read the offsets on the device instead.
    """
    rows, n = x.shape[0], w.shape[1]
    out = new_output((rows, n), x.dtype, x.device)
    xq = quantize_activation(x, act_quant, act_block_size)
    bounds = offsets.tolist()  # host sync, see the docstring
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi].copy_(_fp4_matmul(xq[lo:hi], w[e], w_scale[e]))
    return out


def fp8_gemm(x: Tensor, w: Tensor, w_scale: Tensor, act_quant: str | None = None,
             block_size: int = ACT_BLOCK) -> Tensor:
    """``y[M, N] = q(x) @ dequant(w).T`` for E4M3 weights with bs x bs block scales, float32 accumulation.

    ``w`` [N, K] float8_e4m3fn, ``w_scale`` [ceil(N/bs), ceil(K/bs)] E8M0 or float32, bs = ``block_size``
    (128 V4, 32 V4.1; also the act_quant block). The weight is decoded (E4M3 look-up table, no float8
    cast) ``K_BLOCK`` columns at a time; no host synchronisation.
    """
    m, k = x.shape
    n = w.shape[0]
    bs = block_size
    out = new_output((m, n), x.dtype, x.device)
    xq = quantize_activation(x, act_quant, bs)
    acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    if m:
        for k0 in range(0, k, K_BLOCK):  # k0 is a multiple of 128 (and so of 32): scale columns line up
            k1 = min(k, k0 + K_BLOCK)
            sb = w_scale[:, k0 // bs:-(-k1 // bs)]
            wb = dequant_fp8_block(w[:, k0:k1], sb, bs, torch.float32)  # [N, k1-k0]
            _addmm(acc, xq[:, k0:k1], wb)
    out.copy_(acc)
    return out
