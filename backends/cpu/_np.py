"""Shared helpers of the NumPy CPU backend: zero-copy views of torch tensors and output allocation."""
from __future__ import annotations

import numpy as np
import torch

from dsv4rt import invariant
from dsv4rt.backend import new_output
from dsv4rt.formats import as_bytes

# Upper bound, in float32 elements, of each temporary an op materialises (one block of dequantised
# weights, one chunk of scores or gathered keys). 4 Mi elements = 16 MiB.
BUDGET = 1 << 22


def f32(t: torch.Tensor) -> np.ndarray:
    """t as a float32 NumPy array: a view (strides kept) when t is float32, else a float32 copy.

    bf16 is widened in NumPy from its bits (exact: bf16 is the top half of a float32) and fp16 by
    NumPy's own cast, not by a torch op: a parallel torch op here leaves torch's OpenMP workers
    spinning while OpenBLAS runs the next matmul, which made the following BLAS call ~3x slower on a
    2-core host.
    """
    t = t.detach()
    if t.dtype == torch.float32:
        return t.numpy()
    if t.dtype == torch.bfloat16:
        return widen_bf16(t.view(torch.int16).numpy())
    if t.dtype == torch.float16:
        return t.numpy().astype(np.float32)
    return t.to(torch.float32).numpy()


def widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bf16 values given as their 16-bit patterns (any strides) -> float32, exactly."""
    wide = bits.view(np.uint16).astype(np.uint32)
    np.left_shift(wide, 16, out=wide)
    return wide.view(np.float32)


def u8(t: torch.Tensor) -> np.ndarray:
    """A 1-byte tensor (uint8/int8/float4_e2m1fn_x2/float8_*) as uint8 NumPy, without copying."""
    return as_bytes(t.detach()).numpy()


def ints(t: torch.Tensor) -> np.ndarray:
    """An integer tensor as a NumPy view (int32 / int64 kept)."""
    return t.detach().numpy()


def matmul_into(x: np.ndarray, wt: np.ndarray, out: np.ndarray, add: bool) -> None:
    """``out = x @ wt`` (``out += x @ wt`` with ``add``) for float32 x [M, K], wt [K, N] (a view is fine).

    In the batch-invariant mode (:mod:`dsv4rt.invariant`) one row at a time, each copied first into the
    same 64-byte aligned buffer: every row is then the very same BLAS call whatever M (BLAS picks its
    kernel, and so its summation order, by M). Slow for many rows; a debugging path."""
    if not invariant.enabled():
        if add:
            out += x @ wt
        else:
            np.matmul(x, wt, out=out)
        return
    k = x.shape[1]
    raw = np.empty(k + 16, np.float32)
    row = raw[(-raw.ctypes.data // 4) % 16:][:k]    # 64-byte aligned
    y = np.empty(wt.shape[1], np.float32)
    for i in range(x.shape[0]):
        row[...] = x[i]
        np.matmul(row, wt, out=y)
        if add:
            out[i] += y
        else:
            out[i] = y


def alloc_f32(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """(out tensor of ``dtype``, float32 buffer to fill). For a float32 output the buffer is the output
    itself; otherwise it is scratch that :func:`finish` copies in."""
    out = new_output(shape, dtype, "cpu")
    if dtype == torch.float32:
        return out, out.numpy()
    return out, np.empty(shape, np.float32)


def finish(out: torch.Tensor, buf: np.ndarray) -> torch.Tensor:
    """Copy (and round) the float32 buffer into ``out`` unless it already is ``out``'s memory."""
    if out.dtype != torch.float32:
        out.copy_(torch.from_numpy(buf))
    return out


def bits_view(t: torch.Tensor) -> np.ndarray:
    """Any tensor as a same-width integer NumPy view (bit-exact moves of bf16 and other dtypes
    without a conversion)."""
    t = t.detach()
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width).numpy()


def gather_rows_f32(t: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """float32 ``t[rows]`` of a 2-D tensor: rows are gathered first (bit-exact, in the tensor's own
    width) and only the gathered rows are converted, so a bf16 KV cache is never converted whole."""
    if t.dtype == torch.float32:
        return t.detach().numpy()[rows]
    if t.dtype == torch.bfloat16:
        return widen_bf16(bits_view(t)[rows])
    return f32(t)[rows]
