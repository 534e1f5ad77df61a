"""NumPy MoE routing, dispatch and combine: moe_route, moe_dispatch, moe_combine."""
from __future__ import annotations

import math

import numpy as np
import torch

from dsv4rt.backend import new_output

from ._np import alloc_f32, bits_view, f32, finish, ints, widen_bf16

SOFTPLUS_THRESHOLD = 20.0  # torch.nn.functional.softplus: linear above it


def _sqrt_softplus(z: np.ndarray) -> np.ndarray:
    """sqrt(softplus(z)) in float32, softplus linear above 20 as torch's."""
    sp = np.log1p(np.exp(np.minimum(z, np.float32(SOFTPLUS_THRESHOLD))))
    return np.sqrt(np.where(z > SOFTPLUS_THRESHOLD, z, sp))


def _log_sqrt_softplus(z: np.ndarray) -> np.ndarray:
    """log(sqrt(softplus(z))) in float32 without underflow: below -20 ``log(softplus(z)) = z`` (to within
    exp(z)/2), where softplus itself reaches 0 near z = -104 (and s / sum s would be 0/0)."""
    with np.errstate(divide="ignore"):
        lsp = np.log(np.log1p(np.exp(np.clip(z, -SOFTPLUS_THRESHOLD, SOFTPLUS_THRESHOLD))))
    lsp = np.where(z > SOFTPLUS_THRESHOLD, np.log(np.maximum(z, SOFTPLUS_THRESHOLD)), lsp)
    return np.float32(0.5) * np.where(z < -SOFTPLUS_THRESHOLD, z, lsp)


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, route_scale: float,
              score_func: str = "sqrtsoftplus", hash_ids: torch.Tensor | None = None,
              bias_alt: torch.Tensor | None = None, use_alt: torch.Tensor | None = None,
              weight_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids[T, topk] int32, weights[T, topk] float32): the V4 / V4.1 sqrt-softplus router in float32.

    ``np.argpartition`` picks the top-k of ``s + b_t`` (``b_t = bias_alt`` where ``use_alt[t]``, else
    ``bias``; no full sort); the k chosen are then ordered by descending selection score (by the logit
    itself without a bias: the same order, free of underflow ties). Hash layers take ``hash_ids`` as the
    ids. The weights ``s / (sum s + eps)`` are a softmax of ``log s`` over the chosen times
    ``1 / (1 + eps / sum s)`` from ``log sum s`` (float64), finite where ``s`` underflows to 0 (logits below
    about -104).
    """
    if score_func != "sqrtsoftplus":
        raise NotImplementedError(f"cpu/numpy moe_route: score_func={score_func!r} (only 'sqrtsoftplus')")
    z = f32(logits)
    t, e = z.shape
    ids_t = new_output((t, topk), torch.int32, "cpu")
    w_t = new_output((t, topk), torch.float32, "cpu")
    ids, w = ids_t.numpy(), w_t.numpy()
    if hash_ids is not None:
        ids[...] = ints(hash_ids)
    elif t:
        sel = z if bias is None else _sqrt_softplus(z) + _token_bias(bias, bias_alt, use_alt)
        part = np.argpartition(sel, e - topk, axis=1)[:, e - topk:] if topk < e else \
            np.broadcast_to(np.arange(e), (t, e))
        order = np.argsort(-np.take_along_axis(sel, part, axis=1), axis=1, kind="stable")
        ids[...] = np.take_along_axis(part, order, axis=1)
    ls = np.take_along_axis(_log_sqrt_softplus(z), ids.astype(np.int64), axis=1)
    mx = ls.max(axis=1, keepdims=True) if t else ls
    ex = np.exp(ls - mx)
    total = ex.sum(axis=1, keepdims=True)
    np.multiply(ex / total, np.float32(route_scale), out=w)
    if weight_eps > 0 and t:   # S / (S + eps) with log S = mx + log(total), in float64
        lse = mx.astype(np.float64) + np.log(total.astype(np.float64))
        w *= (1.0 / (1.0 + np.exp(math.log(weight_eps) - lse))).astype(np.float32)
    return ids_t, w_t


def _token_bias(bias: torch.Tensor, bias_alt: torch.Tensor | None, use_alt: torch.Tensor | None) -> np.ndarray:
    """The selection bias per token: [1, E] (``bias``), or [T, E] rows of ``bias_alt`` where ``use_alt``."""
    b = f32(bias)[None, :]
    if bias_alt is None:
        return b
    return np.where(use_alt.numpy()[:, None], f32(bias_alt)[None, :], b)


def moe_dispatch(x: torch.Tensor, ids: torch.Tensor, num_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_sorted, offsets, src): a stable counting sort of the (token, slot) pairs by expert.

    Rows are moved bit-exactly through an integer view, so any float dtype (bf16 included) is copied
    without conversion.
    """
    t, h = x.shape
    topk = ids.shape[1]
    flat = ints(ids).reshape(-1)
    order = np.argsort(flat, kind="stable")
    x_sorted = new_output((t * topk, h), x.dtype, "cpu")
    offsets = new_output((num_experts + 1,), torch.int32, "cpu")
    src = new_output((t * topk,), torch.int32, "cpu")
    src.numpy()[...] = order
    off = offsets.numpy()
    off[0] = 0
    np.cumsum(np.bincount(flat, minlength=num_experts)[:num_experts], out=off[1:])
    if x_sorted.numel():
        # indices are in range; mode='clip' avoids the buffered copy that out= costs with mode='raise'
        np.take(bits_view(x), order // topk, axis=0, out=bits_view(x_sorted), mode="clip")
    return x_sorted, offsets, src


def moe_combine(y_sorted: torch.Tensor, src: torch.Tensor, weights: torch.Tensor | None,
                topk: int | None = None) -> torch.Tensor:
    """y[T, H] = sum_j w[t, j] * y_sorted[row of (t, j)], float32 sums, output in y_sorted's dtype.

    src is a permutation, so it is inverted and the rows are gathered one slot j at a time (no
    scatter-add, at most one [T, H] float32 temporary besides the accumulator).
    """
    r, h = y_sorted.shape
    k = weights.shape[1] if weights is not None else int(topk)  # type: ignore[arg-type]
    t = r // k
    out, acc = alloc_f32((t, h), y_sorted.dtype)
    inv = np.empty(r, np.int64)
    inv[ints(src)] = np.arange(r)
    rows = inv.reshape(t, k)
    w = f32(weights) if weights is not None else None
    y_bits, dtype = bits_view(y_sorted), y_sorted.dtype
    if k == 0 or t == 0:
        acc[...] = 0.0
    for j in range(k):
        part = np.take(y_bits, rows[:, j], axis=0)
        if dtype == torch.float32:
            yj = part.view(np.float32)
        elif dtype == torch.bfloat16:
            yj = widen_bf16(part)
        else:
            yj = f32(torch.from_numpy(part).view(dtype))
        if w is not None:
            np.multiply(yj, w[:, j:j + 1], out=yj)      # yj is a fresh gather: scale in place
        if j == 0:
            acc[...] = yj
        else:
            acc += yj
    return finish(out, acc)
