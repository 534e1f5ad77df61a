"""``cuda/triton`` launchers of the Engram family (DeepSeek-V4.1): engram_hash, engram_lookup.

Kernels are in :mod:`dsv4rt.backends.cuda.kernels.engram`, imported (with Triton) on the first launch. Every
launch parameter comes from shapes; inputs are passed by strides (no copies: a table that lives in host
memory or is memory-mapped is addressed row by row, under the interpreter too).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from dsv4rt.backend import Registrar, new_output
from ._launch import device_guard, kernels, next_pow2, on_interpreter

__all__ = ["register", "engram_hash", "engram_lookup", "supports_hash", "MAX_WINDOW", "MAX_HEADS"]

MAX_WINDOW = 16
"""Window slots (engram_max_ngram_size) the hash kernel unrolls (V4.1: 4)."""
MAX_HEADS = 1024
"""Heads per n-gram size held in one register vector (V4.1: 8)."""


def engram_hash(window: Tensor, multipliers: Tensor, primes: Tensor, offsets: Tensor, pad_id: int) -> Tensor:
    """``rows[T, (N-1)*H]`` int64: one kernel, BLOCK_T tokens per program, the window unrolled."""
    t, n = window.shape
    h = primes.shape[1]
    out = new_output((t, offsets.shape[0]), torch.int64, window.device)
    if t == 0 or h == 0:
        return out
    block_t = min(next_pow2(t), 256 if on_interpreter(window) else 128)
    with device_guard(window):
        kernels("engram").engram_hash_kernel[(-(-t // block_t),)](
            window, multipliers, primes, offsets, out, t, h, int(pad_id), *window.stride(), multipliers.stride(0),
            *primes.stride(), offsets.stride(0), *out.stride(), N=n, BLOCK_T=block_t, BLOCK_H=next_pow2(h),
            num_warps=4)
    return out


def engram_lookup(ids: Tensor, weight: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``out[T, n, D]``: one kernel over (blocks of requested rows, blocks of 32-multiples of D)."""
    t, n = ids.shape
    d = weight.shape[1]
    out = new_output((t, n, d), out_dtype, ids.device)
    r = t * n
    if r == 0 or d == 0:
        return out
    interp = on_interpreter(ids)
    wb, sb = weight.view(torch.uint8), scale.view(torch.uint8)
    block_d = min(next_pow2(d), 256)
    block_r = 32 if interp else 16
    with device_guard(ids):
        kernels("engram").engram_lookup_kernel[(-(-r // block_r), -(-d // block_d))](
            ids, wb, sb, out, r, n, d, *ids.stride(), *wb.stride(), *sb.stride(), *out.stride(),
            INTERP=interp, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out


def supports_hash(a: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot take this engram_hash call."""
    n, h = a["window"].shape[1], a["primes"].shape[1]
    if n > MAX_WINDOW:
        return f"cuda/triton unrolls the window: N <= {MAX_WINDOW} (got {n})"
    if h > MAX_HEADS:
        return f"cuda/triton keeps the heads of an n-gram size in one tile: H <= {MAX_HEADS} (got {h})"
    return None


def register(registrar: Registrar, device_type: str, priority: int) -> None:
    """Register ``cuda/triton`` engram_hash and engram_lookup (no Triton import here)."""
    registrar.implement("engram_hash", "triton", engram_hash, priority=priority, device_type=device_type,
                        supports=supports_hash)
    registrar.implement("engram_lookup", "triton", engram_lookup, priority=priority, device_type=device_type)
