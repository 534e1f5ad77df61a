"""Manifold-constrained hyper-connections (spec 6): ``hc_pre`` with the Sinkhorn split, ``hc_post`` and the
output head's ``hc_head``. Tokens are flattened: the residual state is ``X [T, hc, dim]``."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..invariant import active, linear, pointwise
from .cores import native
from .functional import _NATIVE_DTYPES, _bits, _native

__all__ = ["HcParams", "hc_mixes", "sinkhorn_split", "hc_split", "hc_collapse", "hc_pre", "hc_post", "hc_head"]


@dataclass
class HcParams:
    """``fn [mix, hc*dim]``, ``base [mix]``, ``scale [3]`` (or ``[1]`` for a head), all float32."""

    fn: Tensor
    base: Tensor
    scale: Tensor
    _row: Tensor | None = field(default=None, repr=False, compare=False)

    def scale_row(self, hc: int) -> Tensor:
        """``scale`` spread over the mixes [2 hc + hc^2]: scale[0] for pre, scale[1] for post, scale[2] for comb."""
        if self._row is None or self._row.device != self.scale.device:
            s = self.scale
            self._row = torch.cat([s[0].expand(hc), s[1].expand(hc), s[2].expand(hc * hc)])
        return self._row


def hc_mixes(x: Tensor, p: HcParams, norm_eps: float) -> tuple[Tensor, Tensor]:
    """(xf [T, hc*dim] float32, mixes [T, mix] = (xf @ fn^T) * rsqrt(mean(xf^2) + eps))."""
    xf = x.flatten(1).float()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    if active(xf) and _native("dense_gemm") is not None:   # the native kernel (fn: 6 MiB at V4-Flash widths)
        return xf, native(linear, xf, p.fn) * r              # on every core; its sums never depend on threads
    return xf, linear(xf, p.fn) * r


def sinkhorn_split(mixes: Tensor, p: HcParams, hc: int, iters: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """pre [T, hc] = sigmoid + eps, post [T, hc] = 2 sigmoid, comb [T, hc, hc] (row i = source stream):
    softmax over j + eps, then column / row normalisation, ``iters`` column passes in total."""
    z = mixes * p.scale_row(hc) + p.base      # the three groups' scale and bias in one step
    sig = pointwise(torch.sigmoid, z[:, :2 * hc])
    pre = sig[:, :hc] + eps
    post = 2 * sig[:, hc:]
    comb = torch.softmax(z[:, 2 * hc:].contiguous().view(-1, hc, hc), dim=-1) + eps
    return pre, post, _normalise(comb, iters, eps)


def _normalise(comb: Tensor, iters: int, eps: float) -> Tensor:
    """Sinkhorn's alternating column / row normalisation of comb [T, hc, hc] (starting and ending with the
    columns). On the CPU the ~4 * iters tiny steps run in place, in one native call (``_C.mhc_sinkhorn``) or
    on a NumPy view: the very same float32 operations in the same order (sums of hc terms left to right; NumPy
    sums fewer than 8 terms that way), at a fraction of torch's per-op cost."""
    if comb.device.type != "cpu":
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + eps)
            comb = comb / (comb.sum(-2, keepdim=True) + eps)
        return comb
    c = comb.contiguous()
    a = c.numpy()
    kernel = _native("mhc_sinkhorn")
    if kernel is not None and c.dtype == torch.float32 and c.shape[-1] < 8:
        kernel(a, iters, eps)
        return c
    _normalise_numpy(a, iters, eps)
    return c


def _normalise_numpy(a: np.ndarray, iters: int, eps: float) -> None:
    """:func:`_normalise` in place on a float32 array [T, hc, hc], NumPy step by step."""
    e = np.float32(eps)
    a /= a.sum(-2, keepdims=True) + e
    for _ in range(iters - 1):
        a /= a.sum(-1, keepdims=True) + e
        a /= a.sum(-2, keepdims=True) + e


def hc_split(x: Tensor, p: HcParams, hc: int, iters: int, eps: float, norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(pre [T, hc], post [T, hc], comb [T, hc, hc]) of the streams x [T, hc, dim] (V4.1's single pass keeps
    ``pre`` for the next sub-layer)."""
    return sinkhorn_split(hc_mixes(x, p, norm_eps)[1], p, hc, iters, eps)


def hc_collapse(x: Tensor, pre: Tensor) -> Tensor:
    """``u [T, dim] = sum_i pre_i X_i`` in float32, returned in x's dtype."""
    return (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)


def hc_pre(x: Tensor, p: HcParams, hc: int, iters: int, eps: float, norm_eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(u [T, dim] in x's dtype = sum_i pre_i X_i, post, comb) for one sub-layer."""
    xf, mixes = hc_mixes(x, p, norm_eps)
    pre, post, comb = sinkhorn_split(mixes, p, hc, iters, eps)
    u = (pre.unsqueeze(-1) * xf.view(x.shape)).sum(1)
    return u.to(x.dtype), post, comb


def hc_post(f: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """``X'_j = post_j * f + sum_i comb[i, j] * X_i`` in float32, returned in f's dtype ([T, hc, dim]). In the
    batch-invariant mode the sum over i runs elementwise in order i = 0, 1, .. (an einsum is a batched GEMM
    whose kernel torch picks by T); on the CPU one native call (``_C.mhc_post``) gives the same bits."""
    if active(residual):
        kernel = _native("mhc_post")
        if (kernel is not None and f.dtype in _NATIVE_DTYPES and residual.dtype in _NATIVE_DTYPES and f.dim() == 2
                and residual.dim() == 3):
            out = torch.empty(residual.shape, dtype=f.dtype)
            kernel(_bits(f.contiguous()), _bits(residual.contiguous()), post.float().contiguous().numpy(),
                   comb.float().contiguous().numpy(), _bits(out))
            return out
    return _post_torch(f, residual, post, comb)


def _post_torch(f: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """:func:`hc_post` in torch (the batch-invariant loop over i, or an einsum outside the mode)."""
    r = residual.float()
    if active(r):
        mixed = comb[:, 0, :, None] * r[:, 0, None, :]
        term = torch.empty_like(mixed)
        for i in range(1, comb.shape[1]):
            mixed += torch.mul(comb[:, i, :, None], r[:, i, None, :], out=term)
    else:
        mixed = torch.einsum("tij,tid->tjd", comb, r)
    return (post.unsqueeze(-1) * f.float().unsqueeze(1) + mixed).to(f.dtype)


def hc_head(x: Tensor, p: HcParams, eps: float, norm_eps: float) -> Tensor:
    """The output head's merge: ``pre = sigmoid(mixes * scale + base) + eps``, ``y = sum_i pre_i X_i``."""
    xf, mixes = hc_mixes(x, p, norm_eps)
    pre = pointwise(torch.sigmoid, mixes * p.scale + p.base) + eps
    return (pre.unsqueeze(-1) * xf.view(x.shape)).sum(1).to(x.dtype)
