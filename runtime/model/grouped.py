"""The grouped low-rank output projection ``wo_a`` of V4 and V4.1: ``z[:, g*R:(g+1)*R] = o[:, g] @ wo_a[g].T``.

The release stores ``wo_a`` in FP8 (E4M3 with E8M0 block scales; V4.1 may store bf16) and the reference
computes it in BF16 from the dequantised weight. Where the model runs in bf16 on the CPU and the native
kernel runs (AVX512-BF16 + AVX512-VBMI, ``_C.dense_fp8_packed``), the weight stays FP8: half the bytes of the
bf16 copy (32 instead of 64 MiB per layer at V4-Flash widths), and the result is bit for bit ``dense_gemm``
on the bf16 dequantisation, i.e. the batch-invariant mode's numerics, which it then gives in both modes. It
falls back to the bf16 weight wherever that dequantisation would not be exact (a NaN byte, a scale byte
outside [10, 246]), the scales are float32, a group does not start on a scale block, or the kernel does not
run. Otherwise: the dequantised (or stored) weight in the model's dtype, run per group by
:func:`dsv4rt.invariant.grouped_linear` in the batch-invariant mode and by torch's einsum in the plain mode;
a bf16 weight built in the batch-invariant mode on the CPU is kept only in grouped_linear's packed layout.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..invariant import active, grouped_linear, pack_grouped, unpack_dense
from .cores import all_cores

__all__ = ["GroupedProjection"]


@functools.lru_cache(maxsize=None)
def _fp8_kernels() -> Any:
    """``dsv4rt._C`` where ``dense_fp8_packed`` runs on this CPU, else None."""
    try:
        from dsv4rt import _C
    except ImportError:
        return None
    if not hasattr(_C, "dense_fp8_packed"):
        return None
    packed = _C.dense_fp8_pack(np.zeros((8, 32), np.uint8), np.full((1, 1), 127, np.uint8), 128)
    ok = _C.dense_fp8_packed(np.zeros((1, 32), np.int16), *packed, 8, np.zeros((1, 8), np.int16))
    return _C if ok else None


class GroupedProjection:
    """``wo_a`` of one layer (this rank's groups): ``weight`` [G, R, K] in the model's dtype, or None where
    it is kept as FP8 tiles for the native kernel (``fp8``: per group ``(w_packed, offsets)``)."""

    def __init__(self, groups: int, rank: int, weight: Tensor | None = None,
                 fp8: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        if (weight is None) == (fp8 is None):
            raise ValueError("GroupedProjection: give exactly one of weight and fp8")
        self.groups, self.rank, self.fp8 = groups, rank, fp8
        self._k = 0 if weight is None else int(weight.shape[-1])
        # a bf16 weight built in the batch-invariant mode on the CPU: only grouped_linear's packed layout is
        # kept (made here, not on a first call); the plain tensor is unpacked from it if the mode is switched off
        self._packed: tuple = pack_grouped(weight) if weight is not None and active(weight) else ()
        self._weight = None if self._packed else weight

    @property
    def weight(self) -> Tensor | None:
        """The [G, R, K] weight in the model's dtype (unpacked once from the packed layout where only that was
        kept); None where it is kept as FP8."""
        if self._weight is None and self._packed:
            self._weight = torch.stack([unpack_dense(p, self.rank, self._k) for p in self._packed])
        return self._weight

    @classmethod
    def from_fp8(cls, w: Tensor, s: Tensor, block: int, groups: int, dtype: torch.dtype) -> "GroupedProjection":
        """From the stored FP8 weight [G * R, K] and its scales: kept FP8 where the module doc allows, else
        dequantised to ``dtype``."""
        from ..formats import dequant_fp8_block

        rank = w.shape[0] // groups
        c = _fp8_kernels() if (w.device.type == "cpu" and dtype == torch.bfloat16 and rank % block == 0 and
                               s.dtype != torch.float32) else None
        if c is not None:
            wb, sb = w.contiguous().view(torch.uint8).numpy(), s.contiguous().view(torch.uint8).numpy()
            rb = rank // block
            tiles = [c.dense_fp8_pack(wb[g * rank:(g + 1) * rank], sb[g * rb:(g + 1) * rb], block)
                     for g in range(groups)]
            if all(t is not None for t in tiles):
                return cls(groups, rank, fp8=tiles)
        full = dequant_fp8_block(w, s, block, torch.float32).to(dtype)
        return cls(groups, rank, weight=full.view(groups, rank, -1))

    @classmethod
    def from_weight(cls, weight: Tensor, groups: int) -> "GroupedProjection":
        """From a weight already in the model's dtype, [G * R, K]."""
        return cls(groups, weight.shape[0] // groups, weight=weight.view(groups, weight.shape[0] // groups, -1))

    def __call__(self, o: Tensor) -> Tensor:
        """o [T, G, K] -> z [T, G * R] (o's dtype)."""
        t = o.shape[0]
        if self.fp8 is not None:
            if o.dtype != torch.bfloat16:
                raise TypeError(f"GroupedProjection: the FP8 wo_a of a bf16 model got {o.dtype} activations")
            c = _fp8_kernels()
            z = torch.empty((self.groups, t, self.rank), dtype=o.dtype)
            xa, za = o.contiguous().view(torch.int16).numpy(), z.view(torch.int16).numpy()
            with all_cores():
                for g, (wp, off) in enumerate(self.fp8):
                    xg = xa[:, g] if t == 1 else np.ascontiguousarray(xa[:, g])
                    c.dense_fp8_packed(xg, wp, off, self.rank, za[g])
            return z.transpose(0, 1).reshape(t, -1)
        if active(o):   # batch-invariant: one fixed-order GEMM per group instead of torch's batched GEMM
            with all_cores():
                if self._packed and o.dtype == torch.bfloat16:
                    return self._packed_call(o)
                return grouped_linear(o, self.weight)
        return torch.einsum("tgd,grd->tgr", o, self.weight).reshape(t, -1)

    def _packed_call(self, o: Tensor) -> Tensor:
        """grouped_linear's bits from the packed bf16 layout alone (dense_bf16_packed per group)."""
        from dsv4rt import _C

        t = o.shape[0]
        z = torch.empty((self.groups, t, self.rank), dtype=o.dtype)
        xa, za = o.contiguous().view(torch.int16).numpy(), z.view(torch.int16).numpy()
        for g, p in enumerate(self._packed):
            xg = xa[:, g] if t == 1 else np.ascontiguousarray(xa[:, g])
            if not _C.dense_bf16_packed(xg, p, self.rank, za[g]):
                return grouped_linear(o, self.weight)      # declined (no AVX512-BF16): dense_gemm's same bits
        return z.transpose(0, 1).reshape(t, -1)
