"""Batch-invariant mode: on the CPU, a row's result never depends on the rest of the batch.

With continuous batching a sequence shares every op call with whatever else runs. Kernels that choose their
algorithm by the number of rows (a GEMV below a few rows, a blocked GEMM above; the rows an expert gets
depend on who else routes to it), that split one row's reduction over threads by how many rows there are,
and torch's elementwise loops (the last < 64 elements of a call take scalar code that rounds some functions
differently) make the same prompt give different greedy text alone and in a batch. In this mode each row's
output is computed with a reduction order and rounding that depend only on that row's inputs:

* cpu/native: the FP4 GEMMs give every row the blocked AVX512-BF16 numerics (a kernel with the same bits
  serves few rows) or, per row, the GEMV; fp8_gemm gives every row the lane kernel's (vdpbf16ps with K in the
  lanes, one summation order per output for any M; CPUs without AVX512-VBMI: the blocked numerics as FP4) or,
  per row, the GEMV; sparse_attention splits a row's entries by its own count;
* cpu/numpy and cpu/torch: the GEMMs multiply row by row (slow: a debugging path);
* the model's torch glue multiplies through :func:`linear` (``dsv4rt._C.dense_gemm``, one summation order
  for every output) and evaluates the affected elementwise functions through :func:`pointwise`.

On for ``DSV4RT_BATCH_INVARIANT=1`` (the default) unless :func:`mode` says otherwise for the calling
thread (the engine thread, ``dsv4rt run``). Devices other than the CPU are not affected. The torch glue
must run on one torch thread (``dsv4rt run`` and ``dsv4rt serve`` do), as torch splits reductions and
elementwise loops by size across threads.
"""
from __future__ import annotations

import contextlib
import functools
from contextvars import ContextVar
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import env

__all__ = ["enabled", "mode", "active", "linear", "grouped_linear", "pack_dense", "unpack_dense", "DenseWeight",
           "pack_grouped", "rowwise_mm", "pointwise"]

_MODE: ContextVar[bool | None] = ContextVar("dsv4rt_batch_invariant", default=None)
_PAD = 64   # torch's vectorised loops take 2 vectors per step: 64 bf16 / 32 float32 elements on AVX-512


def enabled() -> bool:
    """Whether the mode is on for the calling thread: :func:`mode`'s setting, else DSV4RT_BATCH_INVARIANT."""
    on = _MODE.get()
    return env.flag("DSV4RT_BATCH_INVARIANT") if on is None else on


@contextlib.contextmanager
def mode(on: bool | None) -> Iterator[None]:
    """Within the block (in this thread), the mode is on (True) or off (False); None leaves it to
    DSV4RT_BATCH_INVARIANT."""
    token = _MODE.set(on)
    try:
        yield
    finally:
        _MODE.reset(token)


def active(t: Tensor) -> bool:
    """The mode applies to ``t``: it is on, and ``t`` lives on the CPU."""
    return t.device.type == "cpu" and enabled()


@functools.lru_cache(maxsize=1)
def _native() -> Callable[..., None] | None:
    try:
        from . import _C
    except ImportError:
        return None
    return getattr(_C, "dense_gemm", None)


def linear(x: Tensor, w: Tensor, packed: object = None) -> Tensor:
    """``x @ w.T`` for x [..., K] and w [N, K] of one dtype: float32 accumulation, x's dtype out.

    In the mode on the CPU every output is summed in one fixed order whatever the number of rows (the
    native ``dense_gemm`` for float32 / bf16, else :func:`rowwise_mm`); otherwise torch's matmul. ``packed``
    (:func:`pack_dense` of w) lets a float32 x read w's bf16 values in address order, with the same bits."""
    if x.dtype != w.dtype:
        raise TypeError(f"invariant.linear: x is {x.dtype} but w is {w.dtype}; expected one dtype")
    if x.shape[-1] != w.shape[-1] or w.dim() != 2:
        raise ValueError(f"invariant.linear: expected x [..., K] and w [N, K], got x {tuple(x.shape)} and "
                         f"w {tuple(w.shape)}")
    if x.device.type != "cpu" or not enabled():
        return x @ w.T
    x2 = x.reshape(-1, x.shape[-1])
    dense = _native()
    if dense is None or x.dtype not in _DENSE_DTYPES:
        y = rowwise_mm(x2, w)
    else:
        y = torch.empty((x2.shape[0], w.shape[0]), dtype=x.dtype)
        streamed = _kernel("dense_gemm_packed") if packed is not None and x.dtype == torch.float32 else None
        if streamed is not None:
            streamed(_np(x2), packed, w.shape[0], _np(y))
        else:
            dense(_np(x2), _np(w), _np(y))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], w.shape[0])


_DENSE_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _kernel(name: str) -> Callable[..., object] | None:
    """``dsv4rt._C.<name>``, or None when the extension is not built (or older than the kernel)."""
    try:
        from . import _C
    except ImportError:
        return None
    return getattr(_C, name, None)


def pack_dense(w: Tensor) -> object:
    """``_C.dense_pack`` of a CPU weight w [N, K] whose values are all bf16 (bf16, or float32 holding bf16
    values: the checkpoint's bf16 weights widened at load): :func:`linear`'s ``packed``, half the bytes of a
    float32 w, read in address order; ``dense_gemm_packed`` gives ``dense_gemm``'s bits for float32 x (bf16
    weights are widened exactly). None where that does not apply. A copy: the caller keeps it with w."""
    pack = _kernel("dense_pack")
    if pack is None or w.device.type != "cpu" or w.dim() != 2 or w.dtype not in _DENSE_DTYPES:
        return None
    wb = w.to(torch.bfloat16)
    if w.dtype == torch.float32 and not torch.equal(wb.float(), w):
        return None
    return pack(_np(wb))


def unpack_dense(packed: np.ndarray, n: int, k: int) -> Tensor:
    """The bf16 [n, k] weight that :func:`pack_dense` packed into ``packed`` (a new tensor)."""
    p = torch.from_numpy(packed).view(torch.bfloat16)
    return p.permute(0, 2, 1, 3).reshape(p.shape[0] * p.shape[2], p.shape[1] * p.shape[3])[:n, :k].contiguous()


class DenseWeight:
    """A [N, K] weight used in float32 (for float32 x), given as bf16 (the checkpoint's, packed as it is: no
    float32 temporaries at load) or as float32, kept in one form. Built in the mode on the CPU (with
    ``dense_pack`` / ``dense_gemm_packed`` and bf16 values), only :func:`pack_dense`'s layout is kept (half the
    bytes of the float32 copy, packed once here rather than on a first call); otherwise the float32 tensor.
    Called in the other mode (the mode is per call), the float32 values are unpacked from the packed form
    once and kept from then on (an exact copy: the same bits as before, paid only by the model that mixes
    the modes)."""

    def __init__(self, w: Tensor) -> None:
        if w.dim() != 2 or w.dtype not in _DENSE_DTYPES:
            raise ValueError(f"invariant.DenseWeight: expected a float32 or bf16 [N, K] weight, got {w.dtype} "
                             f"{tuple(w.shape)}")
        self.shape: tuple[int, int] = (int(w.shape[0]), int(w.shape[1]))
        fast = active(w) and _kernel("dense_gemm_packed") is not None
        self.packed = pack_dense(w) if fast else None
        self._plain: Tensor | None = None if self.packed is not None else w.float()

    def plain(self) -> Tensor:
        """The float32 [N, K] weight (unpacked once when only the packed form was kept)."""
        if self._plain is None:
            self._plain = unpack_dense(self.packed, *self.shape).float()
        return self._plain

    @property
    def nbytes(self) -> int:
        """Bytes held (the packed form and / or the float32 tensor)."""
        held = 0 if self.packed is None else int(self.packed.nbytes)
        return held + (0 if self._plain is None else self._plain.numel() * 4)

    def __call__(self, x: Tensor) -> Tensor:
        """:func:`linear` of float32 ``x [..., K]``: the packed weight streamed in the mode on the CPU
        (``dense_gemm``'s bits), else :func:`linear` on the float32 weight."""
        n, k = self.shape
        if self.packed is None or x.dtype != torch.float32 or not active(x):
            return linear(x, self.plain())
        if x.shape[-1] != k:
            raise ValueError(f"invariant.DenseWeight: expected x [..., {k}], got x {tuple(x.shape)}")
        x2 = x.reshape(-1, k)
        y = torch.empty((x2.shape[0], n), dtype=torch.float32)
        _kernel("dense_gemm_packed")(_np(x2), self.packed, n, _np(y))
        return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


def pack_grouped(w: Tensor) -> tuple:
    """The per-group ``_C.dense_bf16_pack`` layouts of a bf16 CPU weight w [G, R, K] that
    :func:`grouped_linear` streams in address order (same bits as ``dense_gemm``); () where they do not
    apply (another dtype or device, no such kernel). A copy of w: the caller keeps it with w."""
    pack = _kernel("dense_bf16_pack")
    if pack is None or w.device.type != "cpu" or w.dtype != torch.bfloat16 or w.dim() != 3:
        return ()
    wa = _np(w)
    return tuple(pack(wa[i]) for i in range(w.shape[0]))


def grouped_linear(x: Tensor, w: Tensor, packed: tuple = ()) -> Tensor:
    """``z [T, G * R]`` with ``z[:, g*R:(g+1)*R] = linear(x[:, g], w[g])`` for x [T, G, K] and w [G, R, K] of
    one dtype (the grouped low-rank output projection): :func:`linear` group by group, the same bits, with
    the per-call checks and array views done once for all groups (one native call per group, written into
    one buffer). Only for the mode on the CPU; elsewhere (and without the native kernel) the groups go
    through :func:`linear` and are stacked. ``packed``: :func:`pack_grouped` of w (bf16), read in address order
    with the same bits where the CPU has AVX512-BF16 (``_C.dense_bf16_packed`` declines elsewhere)."""
    if x.dim() != 3 or w.dim() != 3 or x.shape[1] != w.shape[0] or x.shape[2] != w.shape[2] or x.dtype != w.dtype:
        raise ValueError(f"invariant.grouped_linear: expected x [T, G, K] and w [G, R, K] of one dtype, got x "
                         f"{tuple(x.shape)} {x.dtype} and w {tuple(w.shape)} {w.dtype}")
    t, g = x.shape[:2]
    dense = _native()
    if x.device.type != "cpu" or not enabled() or dense is None or x.dtype not in _DENSE_DTYPES:
        return torch.stack([linear(x[:, i], w[i]) for i in range(g)], dim=1).reshape(t, -1)
    z = torch.empty((g, t, w.shape[1]), dtype=x.dtype)
    xa, wa, za = _np(x), _np(w), _np(z)
    fast = _kernel("dense_bf16_packed") if len(packed) == g and x.dtype == torch.bfloat16 else None
    n = w.shape[1]
    for i in range(g):
        xi = xa[:, i] if t == 1 else np.ascontiguousarray(xa[:, i])
        if fast is None or not fast(xi, packed[i], n, za[i]):
            dense(xi, wa[i], za[i])
    return z.transpose(0, 1).reshape(t, -1)


def _np(t: Tensor):
    """t as a C-contiguous NumPy array (bf16 as its 16-bit patterns); a view when t is contiguous (called
    three times per :func:`linear`, so nothing is done that the tensor does not need)."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def rowwise_mm(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` (x [M, K], w [N, K]) one row at a time, each row copied to a fresh buffer first: every
    row is the same BLAS call whatever M (the mode's plain-torch matmul; slow for many rows)."""
    out = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    for i in range(x.shape[0]):
        out[i] = torch.mv(w, x[i].clone())
    return out


def pointwise(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` for an elementwise torch function. In the mode on the CPU, x is padded to a multiple of 64
    elements first: torch computes the remainder of a vectorised loop with scalar code, which rounds
    float32 sigmoid / silu / softplus differently, so an element's value would depend on the tensor's size."""
    if not active(x):
        return fn(x)
    flat = x.contiguous().view(-1)
    n = flat.numel()
    if n % _PAD:
        flat = F.pad(flat, (0, _PAD - n % _PAD))     # zeros: one step (a cat of zeros was two)
    return fn(flat)[:n].view(x.shape)
