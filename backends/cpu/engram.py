"""NumPy Engram ops of DeepSeek-V4.1: engram_hash, engram_lookup."""
from __future__ import annotations

import numpy as np
import torch

from dsv4rt.backend import new_output
from dsv4rt.formats import decode_e4m3, e8m0_to_float

from ._np import alloc_f32, finish, ints, u8

__all__ = ["engram_hash", "engram_lookup"]


def engram_hash(window: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, offsets: torch.Tensor,
                pad_id: int) -> torch.Tensor:
    """rows[T, (N-1)*H] int64 in NumPy int64 arithmetic: ``logical_or.accumulate`` of the DEAD slots gives
    the pad mask; each n-gram's running XOR hash is reduced modulo the H primes straight into its columns."""
    w = ints(window)
    t, n = w.shape
    p, off = ints(primes), ints(offsets)
    heads = p.shape[1]
    out_t = new_output((t, off.shape[0]), torch.int64, "cpu")
    out = out_t.numpy()
    dead = np.logical_or.accumulate(w == -1, axis=1)
    prod = np.where(dead, np.int64(pad_id), w) * ints(multipliers)[None, :]
    h = prod[:, 0].copy()
    for k in range(1, n):
        np.bitwise_xor(h, prod[:, k], out=h)
        cols = slice((k - 1) * heads, k * heads)
        np.remainder(h[:, None], p[k - 1][None, :], out=out[:, cols])
        out[:, cols] += off[cols]
    return out_t


def engram_lookup(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """out[T, n, D]: ``np.take`` of the requested rows (a memory-mapped table is read only there), decoded
    through the E4M3 / E8M0 byte tables in float32 (exact), rounded once to ``out_dtype``."""
    t, n = ids.shape
    d = weight.shape[1]
    flat = ints(ids).reshape(-1)
    out, acc = alloc_f32((t, n, d), out_dtype)
    rows = np.take(u8(weight), flat, axis=0)
    scales = np.take(u8(scale), flat, axis=0)
    with np.errstate(over="ignore"):   # 448 x 2^127 and the like: +-inf, the defined result
        np.multiply(decode_e4m3(rows).reshape(t, n, d // 32, 32), e8m0_to_float(scales).reshape(t, n, d // 32, 1),
                    out=acc.reshape(t, n, d // 32, 32))
    return finish(out, acc)
