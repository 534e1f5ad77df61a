"""Small torch glue shared by the layers: RMSNorm, the Hadamard rotation and the reference's fake-quant
points (spec 2.2, 2.3, 3.1). Computed in float32 and returned in the input dtype, except the release-precision
per-head q norm (``head_rms_norm``). Nothing depends on torch's default dtype."""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

import torch
from torch import Tensor

from ..formats import _INV6, fp4_fake_quant, fp8_fake_quant
from ..invariant import linear

__all__ = ["rms_norm", "head_rms_norm", "hadamard", "fp8_sim_nope", "fp4_sim", "hadamard_matrix", "PRECISIONS",
           "check_precision"]


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, in float32 (reference RMSNorm);
    ``weight=None`` is the weightless per-head norm of the queries."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y.to(x.dtype)


PRECISIONS = ("release", "fp32")
"""Precision modes of the model: ``release`` rounds where the released inference code computes in bf16
(the per-head q norm here; P before P.V in sparse_attention; the indexer scores), ``fp32`` keeps fp32 there."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def head_rms_norm(q: Tensor, eps: float, precision: str) -> Tensor:
    """The weightless per-head RMS norm of the queries (spec 3.1), ``q * rsqrt(mean(q^2) + eps)``.

    ``release``: computed on q's own dtype, step by step, as the released code does on its bf16 tensor
    (``q *= torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)``); ``fp32``: in float32, rounded once.
    The rsqrt is taken in float32 and rounded once, as a GPU does: torch's CPU bf16 rsqrt rounds the
    sqrt first in the scalar remainder of its loop, so a row's value depended on how many rows were there."""
    if check_precision(precision) == "fp32":
        return rms_norm(q, None, eps)
    r = q.square().mean(-1, keepdim=True) + eps
    return q * torch.rsqrt(r.float()).to(q.dtype)


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float32)  # explicit: never the process's default dtype
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * (1.0 / math.sqrt(n))


_DEVICE_H: dict[tuple[int, torch.device], Tensor] = {}


def hadamard_matrix(n: int, device: torch.device) -> Tensor:
    """The normalised Sylvester-Hadamard matrix ``H_n / sqrt(n)`` (symmetric), float32 on ``device``."""
    if n & (n - 1):
        raise ValueError(f"hadamard: size {n} is not a power of two")
    key = (n, torch.device(device))
    if key not in _DEVICE_H:
        _DEVICE_H[key] = _hadamard_cpu(n).to(device)
    return _DEVICE_H[key]


def hadamard(x: Tensor) -> Tensor:
    """``rotate_activation``: the normalised Walsh-Hadamard transform over the last dim (the
    ``fast_hadamard_transform`` ordering, scale ``n^-0.5``), float32 math, x's dtype out (the matrix is
    symmetric: ``x @ H = x @ H.T``, a batch-invariant :func:`~dsv4rt.invariant.linear`)."""
    return linear(x.float(), hadamard_matrix(x.shape[-1], x.device)).to(x.dtype)


def fp8_sim_nope(x: Tensor, rope_dim: int) -> Tensor:
    """FP8 E4M3 fake-quant of the leading (nope) dims in blocks of 64 with power-of-two scales; the
    trailing ``rope_dim`` dims stay as they are (spec 3.1 step 3, the FP8 behaviour of section 10.2). On the
    CPU one native call (``_C.fp8_sim_prefix``, the GEMMs' act_quant kernel) gives the same bits as the
    :func:`~dsv4rt.formats.fp8_fake_quant` steps."""
    nope = x.shape[-1] - rope_dim
    kernel = _native("fp8_sim_prefix")
    if kernel is not None and x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES and x.dim() >= 1:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty_like(x2)
        kernel(_bits(x2), _bits(out), nope, 64)
        return out.view(x.shape)
    return torch.cat([fp8_fake_quant(x[..., :nope].contiguous(), 64), x[..., nope:]], dim=-1)


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _native(name: str) -> Callable[..., None] | None:
    """``dsv4rt._C.<name>``, or None when the extension is not built (or older than the kernel)."""
    try:
        from .. import _C
    except ImportError:
        return None
    return getattr(_C, name, None)


def _bits(t: Tensor) -> np.ndarray:
    """A contiguous float32 / bf16 CPU tensor as a NumPy array (bf16 as its 16-bit patterns), no copy."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def fp4_sim(x: Tensor) -> Tensor:
    """MXFP4 fake-quant in blocks of 32 along the last dim (the indexer's q and k, spec 2.2). On the CPU one
    native call (``_C.mx_sim``) gives the same bits as the :func:`~dsv4rt.formats.fp4_fake_quant` steps."""
    kernel = _native("mx_sim")
    if (kernel is not None and x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES and x.dim() >= 1
            and x.shape[-1] % 32 == 0 and x.numel()):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty_like(x2)
        kernel(_bits(x2), _bits(out), 32, _INV6)
        return out.view(x.shape)
    return fp4_fake_quant(x.contiguous(), 32)

