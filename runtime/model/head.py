"""The output head (spec 9.1): ``logits = y @ head.T`` in float32 from the vocabulary projection.

The checkpoint stores ``head.weight`` in bf16. On the CPU with the native extension the weight stays bf16
(half the bytes of a float32 copy: 1.06 GB instead of 2.1 GB at V4-Flash widths, and a decode step reads
all of it) and the logits come from ``dsv4rt._C.dense_gemm`` with float32 activations: every bf16 weight
is widened exactly, every product and sum is float32, so the logits equal the float32 head's up to the
float32 summation order, and that order is fixed per output whatever the number of rows (so the
batch-invariant mode holds). The kernel runs on every core (:func:`dsv4rt.model.cores.native`), though the
glue holds torch on one thread. The weight is kept in ``dense_pack``'s layout (``[N/8, K/16, 8, 16]``, built
once at load straight from the checkpoint, no other copy), which ``dense_gemm_packed`` streams in address order
with ``dense_gemm``'s bits: a decode step reads the 1.06 GB at the memory's streaming rate instead of 8 row
streams side by side. Elsewhere (GPUs, no extension) the weight is widened to float32 once at load and the
product is :func:`dsv4rt.invariant.linear`, as before.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..invariant import linear
from .cores import native
from .functional import _bits, _native
from .weights import Loader

__all__ = ["OutputHead"]


class OutputHead:
    """``OutputHead(ld, "head.weight", tp_dim=0)(y)``: y [..., dim] (any float dtype) -> float32 logits
    [..., V] (this rank's vocabulary part under tensor parallelism)."""

    def __init__(self, ld: Loader, name: str, tp_dim: int | None = 0) -> None:
        self._packed: Any = None   # dense_pack's layout of a bf16 weight (CPU, extension built), else None
        pack = _native("dense_pack") if ld.device.type == "cpu" else None
        if pack is not None:
            w = ld.stored(name, tp_dim=tp_dim)   # packed straight from the checkpoint: the one copy
            if w.dtype == torch.bfloat16:
                self._shape = tuple(w.shape)
                self._packed = pack(_bits(w.contiguous()))
                return
        w = ld.f32(name, tp_dim=tp_dim)
        self._shape = tuple(w.shape)
        self._w32 = w if w.dtype == torch.float32 else w.float()

    @property
    def weight(self) -> Tensor:
        """The [V, dim] weight as stored (bf16 unpacked from the kernel's layout: a copy, for inspection)."""
        if self._packed is None:
            return self._w32
        n, k = self._shape
        p = torch.from_numpy(self._packed).view(torch.bfloat16)
        return p.permute(0, 2, 1, 3).reshape(p.shape[0] * 8, p.shape[1] * 16)[:n, :k]

    def __call__(self, y: Tensor) -> Tensor:
        n, k = self._shape
        if k != y.shape[-1]:
            raise ValueError(f"output head: y has {y.shape[-1]} features but head.weight is {self._shape}")
        y32 = y.float()
        if self._packed is None or y.device.type != "cpu":
            return linear(y32, self.weight.float())
        x2 = y32.reshape(-1, k).contiguous()
        out = torch.empty((x2.shape[0], n), dtype=torch.float32)
        native(_native("dense_gemm_packed"), x2.numpy(), self._packed, n, out.numpy())
        return out.view(*y.shape[:-1], n)

    @property
    def nbytes(self) -> int:
        """Bytes the head keeps (the packed bf16 weight, padded to 8 rows x 16 columns)."""
        return int(self._packed.nbytes) if self._packed is not None else self._w32.numel() * 4
