"""``cpu/native`` Engram ops: the C++ kernels ``_C.engram_hash`` / ``_C.engram_lookup`` (csrc/engram.cpp).

The table of ``engram_lookup`` goes to the kernel as a NumPy view of its bytes with its strides (never a
copy, so a memory-mapped table stays on disk but for the rows the kernel reads, and a strided view is read
in place).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from dsv4rt import _C
from dsv4rt.backend import new_output

__all__ = ["engram_hash", "engram_lookup", "SUPPORTS"]

_BUILT = hasattr(_C, "engram_hash") and hasattr(_C, "engram_lookup")


def _np(t: torch.Tensor) -> np.ndarray:
    """A small tensor as C-contiguous NumPy (a view when it already is)."""
    a = t.detach().numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def engram_hash(window: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, offsets: torch.Tensor,
                pad_id: int) -> torch.Tensor:
    """rows[T, (N-1)*H] int64: the n-gram hash per token in uint64 arithmetic, tokens split over threads."""
    out = new_output((window.shape[0], offsets.shape[0]), torch.int64, "cpu")
    _C.engram_hash(_np(window), _np(multipliers), _np(primes), _np(offsets), int(pad_id), out.numpy())
    return out


def engram_lookup(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """out[T, n, D]: the requested rows gathered and dequantised in C++ (float32, or bf16 rounded to nearest
    even in the kernel), rows split over threads."""
    out = new_output((ids.shape[0], ids.shape[1], weight.shape[1]), out_dtype, "cpu")
    buf = out.numpy() if out_dtype == torch.float32 else out.view(torch.int16).numpy()
    _C.engram_lookup(_np(ids), weight.detach().view(torch.uint8).numpy(), scale.detach().view(torch.uint8).numpy(),
                     buf)
    return out


def _strided(args: Mapping[str, Any]) -> str | None:
    if not _BUILT:
        return "this dsv4rt._C build has no Engram kernels (built before csrc/engram.cpp); rebuild it"
    for name, v in args.items():
        if isinstance(v, torch.Tensor) and v.layout != torch.strided:
            return f"cpu/native needs strided tensors; '{name}' has layout {v.layout}"
    return None


SUPPORTS = {"engram_hash": _strided, "engram_lookup": _strided}
