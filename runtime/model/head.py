"""The output head (spec 9.1): ``logits = y @ head.T`` in float32 from the vocabulary projection.

The checkpoint stores ``head.weight`` in bf16. On the CPU with the native extension the weight stays bf16
(half the bytes of a float32 copy: 1.06 GB instead of 2.1 GB at V4-Flash widths, and a decode step reads
all of it) and the logits come from ``dsv4rt._C.dense_gemm`` with float32 activations: every bf16 weight
is widened exactly, every product and sum is float32, so the logits equal the float32 head's up to the
float32 summation order, and that order is fixed per output whatever the number of rows (so the
batch-invariant mode holds). The kernel runs on every core (:func:`dsv4rt.model.cores.native`), though the
glue holds torch on one thread. Elsewhere (GPUs, no extension) the weight is widened to float32 once at load and the
product is :func:`dsv4rt.invariant.linear`, as before.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..invariant import linear
from .cores import native
from .weights import Loader

__all__ = ["OutputHead"]


def _dense() -> Callable[..., None] | None:
    try:
        from .. import _C
    except ImportError:
        return None
    return getattr(_C, "dense_gemm", None)


class OutputHead:
    """``OutputHead(ld, "head.weight", tp_dim=0)(y)``: y [..., dim] (any float dtype) -> float32 logits
    [..., V] (this rank's vocabulary part under tensor parallelism)."""

    def __init__(self, ld: Loader, name: str, tp_dim: int | None = 0) -> None:
        self._dense = _dense() if ld.device.type == "cpu" else None
        w = ld.raw(name, tp_dim=tp_dim) if self._dense is not None else ld.f32(name, tp_dim=tp_dim)
        if w.dtype not in (torch.bfloat16, torch.float32):   # a source in another float dtype: widen at load
            w = w.float()
        self.weight = w
        self._w_np = _bits(w) if self._dense is not None else None

    def __call__(self, y: Tensor) -> Tensor:
        w = self.weight
        if w.shape[-1] != y.shape[-1]:
            raise ValueError(f"output head: y has {y.shape[-1]} features but head.weight is {tuple(w.shape)}")
        y32 = y.float()
        if self._dense is None or y.device.type != "cpu":
            return linear(y32, w if w.dtype == torch.float32 else w.float())
        x2 = y32.reshape(-1, y32.shape[-1]).contiguous()
        out = torch.empty((x2.shape[0], w.shape[0]), dtype=torch.float32)
        native(self._dense, x2.numpy(), self._w_np, out.numpy())
        return out.view(*y.shape[:-1], w.shape[0])

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def _bits(w: Tensor) -> Any:
    """The weight as the extension takes it: float32, or bf16 as its int16 bits."""
    return (w.view(torch.int16) if w.dtype == torch.bfloat16 else w).numpy()
