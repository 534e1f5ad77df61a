"""MXFP4 weights packed once, in place, for ``cpu/native``'s kernels: :class:`PackedMXFP4`.

The released layout (``w [.., N, K/2]``, a row's bytes in K order) makes a kernel with the output columns
in the vector lanes (the layout whose sums are the same for every row count: the batch-invariant mode)
transpose every 16 rows x 128 K block and shift each pair out of its byte. The packed layout (csrc/
fp4_gemm.h: per 16 rows and 128-wide K block, the rows' dwords side by side, a dword's even codes in its low
word and odd codes in its high word) is a permutation of each 16 rows' bytes: the same size, made in place
(no second copy of the experts), read with one lookup per 32 weights. Decode-size calls (1-8 rows per
expert) run ~3x faster on it (one core, V4-Flash expert shapes, 2-core EPYC, 2026-12-07); the results are
bit for bit the released layout's in the batch-invariant mode, in both modes.

A :class:`PackedMXFP4` *is* the weight as far as anyone else can tell: the same shape, dtype and device,
and every torch operation on it (indexing, ``.numpy()``, ``.to()``, comparisons, printing) sees the
released values, computed from an unpacked copy (slow, but never a wrong value). ``cpu/native`` takes
the packed bytes as they are (:func:`packed_bytes`). Packed only where the kernels run (AVX512-BF16 and
AVX512-VBMI), the shape allows (N % 16 == 0, K % 128 == 0) and every scale keeps the folded bf16 decode
exact (E8M0 bytes in [2, 252]); ``DSV4RT_CPU_PACK_FP4=0`` keeps the released layout.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PackedMXFP4", "pack_mxfp4", "packed_bytes", "packable", "FP4_OPS"]

FP4_OPS = ("fp4_gemm", "fp4_grouped_gemm")   # the ops whose weights this module packs

# metadata reads that never look at the values: answered from the packed tensor itself
_METADATA = {
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.ndim.__get__,
    Tensor.requires_grad.__get__, Tensor.is_cpu.__get__, Tensor.layout.__get__, Tensor.is_sparse.__get__,
    Tensor.dim, Tensor.size, Tensor.numel, Tensor.stride, Tensor.is_contiguous, Tensor.element_size,
    Tensor.data_ptr, Tensor.storage_offset, Tensor.nbytes.__get__, Tensor.itemsize.__get__,
    Tensor.is_floating_point, Tensor.is_complex, Tensor.__len__,
}


class PackedMXFP4(Tensor):
    """An MXFP4 weight (``[.., N, K/2]`` bytes) whose storage holds the packed layout (module doc).

    Not built directly: :func:`pack_mxfp4` permutes a released weight in place and returns one."""

    _plain: Tensor   # the same storage as a plain tensor (the packed bytes)

    @staticmethod
    def __new__(cls, plain: Tensor) -> "PackedMXFP4":
        obj = Tensor._make_subclass(cls, plain)
        obj._plain = plain
        return obj

    def unpacked(self) -> Tensor:
        """A plain copy in the released layout."""
        out = self._plain.clone()
        _C().fp4_pack(out.view(torch.uint8).view(-1).numpy(), 2 * out.shape[-1], False)
        return out

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        return func(*_released(args), **_released(kwargs))

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"PackedMXFP4({self.unpacked()!r})"

    def __reduce_ex__(self, proto: Any) -> Any:
        return (_from_released, (self.unpacked(),))


def _from_released(t: Tensor) -> Tensor:
    return t


def _released(obj: Any) -> Any:
    """obj with every PackedMXFP4 in it (also inside lists, tuples, dicts) replaced by its released copy."""
    if isinstance(obj, PackedMXFP4):
        return obj.unpacked()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_released(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _released(v) for k, v in obj.items()}
    return obj


def _C() -> Any:
    from dsv4rt import _C as c

    return c


def packable(op: str, w: Tensor, w_scale: Tensor) -> str | None:
    """None when :func:`pack_mxfp4` would pack ``w`` for ``op``, else why not (for the log)."""
    from dsv4rt import env

    if op not in FP4_OPS:
        return f"{op} weights keep their layout"
    if env.get("DSV4RT_CPU_PACK_FP4") == "0":
        return "DSV4RT_CPU_PACK_FP4=0"
    if isinstance(w, PackedMXFP4):
        return "already packed"
    try:
        c = _C()
    except ImportError:
        return "the native kernels (dsv4rt._C) did not build"
    if not hasattr(c, "fp4_packed_fast") or not c.fp4_packed_fast():
        return "the packed kernels need AVX512-BF16 and AVX512-VBMI"
    if w.device.type != "cpu" or w.element_size() != 1 or not w.is_contiguous() or w.dim() < 2:
        return "not a contiguous 1-byte CPU tensor"
    if w.data_ptr() % 4 or w.requires_grad:
        return "not 4-byte aligned, or requires grad"
    if not c.fp4_packable(w.shape[-2], 2 * w.shape[-1]):
        return f"shape {tuple(w.shape)}: packing needs N % 16 == 0 and K % 128 == 0"
    s = w_scale.view(torch.uint8) if w_scale.dtype != torch.uint8 else w_scale
    if s.numel() and (int(s.min()) < 2 or int(s.max()) > 252):
        return "a scale byte outside [2, 252] (the packed kernels would unpack on every call)"
    return None


def pack_mxfp4(w: Tensor) -> PackedMXFP4:
    """Permute ``w``'s bytes in place into the packed layout and return it as a :class:`PackedMXFP4` (``w``
    itself must not be used as a released weight afterwards). Check :func:`packable` first."""
    _C().fp4_pack(w.view(torch.uint8).view(-1).numpy(), 2 * w.shape[-1], True)
    return PackedMXFP4(w)


def packed_bytes(w: PackedMXFP4) -> np.ndarray:
    """The packed bytes as a uint8 NumPy view (no copy), for ``cpu/native``."""
    return w._plain.view(torch.uint8).numpy()
