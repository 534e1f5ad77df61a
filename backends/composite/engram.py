"""Plain-torch Engram ops of DeepSeek-V4.1: engram_hash (int64 arithmetic) and engram_lookup (row gather +
per-32 dequantisation). Only torch ops every device has; no host synchronisation."""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4rt.backend import new_output
from dsv4rt.formats import as_bytes, decode_e4m3, e8m0_to_float

__all__ = ["engram_hash", "engram_lookup"]


def engram_hash(window: Tensor, multipliers: Tensor, primes: Tensor, offsets: Tensor, pad_id: int) -> Tensor:
    """``rows[T, (N-1)*H]`` int64: a running count of DEAD (-1) slots along the window marks the look-back
    cut (those slots hash as ``pad_id``); the products XOR into the running n-gram hash, which each head
    reduces modulo its prime (``torch.remainder``: non-negative operands), plus the bucket offsets."""
    t, n = window.shape
    dead = torch.cumsum((window == -1).to(torch.int32), dim=1) > 0
    prod = torch.where(dead, torch.full_like(window, pad_id), window) * multipliers[None, :]
    h = prod[:, 0]
    parts = []
    for k in range(1, n):
        h = torch.bitwise_xor(h, prod[:, k])
        parts.append(torch.remainder(h[:, None], primes[k - 1][None, :]))
    out = new_output((t, offsets.shape[0]), torch.int64, window.device)
    out.copy_(torch.cat(parts, dim=1) + offsets[None, :])
    return out


def engram_lookup(ids: Tensor, weight: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``out[T, n, D]``: ``index_select`` of the requested rows of the E4M3 table and its E8M0 scales (as
    bytes: nothing else of a memory-mapped table is read), decoded by table look-up in float32 (exact:
    E4M3 times a power of two), rounded once to ``out_dtype``."""
    t, n = ids.shape
    d = weight.shape[1]
    flat = ids.reshape(-1).long()
    rows = as_bytes(weight).index_select(0, flat)
    scales = as_bytes(scale).index_select(0, flat)
    vals = decode_e4m3(rows).view(t * n, d // 32, 32) * e8m0_to_float(scales)[..., None]
    out = new_output((t, n, d), out_dtype, ids.device)
    out.copy_(vals.view(t, n, d))
    return out
