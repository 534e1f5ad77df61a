"""Plain-torch MoE routing, dispatch and combine (spec section 5). No host synchronisation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4rt.backend import new_output

__all__ = ["moe_route", "moe_dispatch", "moe_combine", "eps_factor"]

_SOFTPLUS_LINEAR = 20.0  # torch's softplus threshold: softplus(z) = z above it


def _log_sqrt_softplus(z: Tensor) -> Tensor:
    """``log(sqrt(softplus(z)))`` in float32 without underflow: below -20, ``log(softplus(z)) = z`` to
    within ``exp(z)/2 < 1e-9``, while ``softplus`` itself would reach 0 near z = -104."""
    safe = torch.clamp(z, min=-_SOFTPLUS_LINEAR)
    return 0.5 * torch.where(z < -_SOFTPLUS_LINEAR, z, torch.log(F.softplus(safe)))


def eps_factor(lse: Tensor, weight_eps: float) -> Tensor:
    """``S / (S + weight_eps)`` for ``S = exp(lse)`` (the sum of the chosen scores, given as its log):
    ``sigmoid(lse - log(eps))``, finite and accurate where ``S`` itself underflows in float32."""
    return torch.sigmoid(lse - math.log(weight_eps))


def moe_route(logits: Tensor, bias: Tensor | None, topk: int, route_scale: float,
              score_func: str = "sqrtsoftplus", hash_ids: Tensor | None = None, bias_alt: Tensor | None = None,
              use_alt: Tensor | None = None, weight_eps: float = 0.0):
    """``(ids[T, topk] int32, weights[T, topk] float32)``: the sqrt-softplus router of V4 / V4.1 (spec 5.1).

    ``s = sqrt(softplus(logits))`` (softplus linear above 20). Selection: ``torch.topk(s + b_t)`` with
    ``b_t = where(use_alt[t], bias_alt, bias)``; without a bias ``torch.topk(logits)`` (the same set, since s
    is strictly increasing in the logit, and free of float32 underflow / rounding ties); ``hash_ids`` for
    hash layers. ``weights = s[ids] / (sum s[ids] + eps) * route_scale`` is computed as a softmax of
    ``log s`` over the chosen experts times ``S / (S + eps)`` from ``log S`` (:func:`eps_factor`):
    identical in exact arithmetic, and finite for very negative logits where ``s`` itself underflows to 0
    in float32 (0/0).
    """
    if score_func != "sqrtsoftplus":
        raise ValueError(f"composite: score_func={score_func!r}; v1 has only 'sqrtsoftplus'")
    t = logits.shape[0]
    z = logits.float()
    if hash_ids is not None:
        chosen = hash_ids.long()
    elif bias is None:
        chosen = torch.topk(z, topk, dim=-1).indices   # sqrt(softplus(.)) is strictly increasing
    else:
        b = bias.float()[None, :]
        if bias_alt is not None:
            b = torch.where(use_alt[:, None], bias_alt.float()[None, :], b)
        chosen = torch.topk(torch.sqrt(F.softplus(z)) + b, topk, dim=-1).indices
    ls = torch.gather(_log_sqrt_softplus(z), 1, chosen)
    weights = torch.softmax(ls, dim=-1) * route_scale
    if weight_eps > 0:
        weights = weights * eps_factor(torch.logsumexp(ls, dim=-1, keepdim=True), weight_eps)
    ids_out = new_output((t, topk), torch.int32, logits.device)
    w_out = new_output((t, topk), torch.float32, logits.device)
    ids_out.copy_(chosen)
    w_out.copy_(weights)
    return ids_out, w_out


def moe_dispatch(x: Tensor, ids: Tensor, num_experts: int):
    """``(x_sorted[T*topk, H], offsets[E+1] int32, src[T*topk] int32)``: token copies grouped by expert.

    A stable sort of the flattened expert ids gives ``src`` (pair ``p = t*topk + j`` in ascending
    order inside each expert); ``x_sorted = x[src // topk]``. ``offsets[e]`` is the number of pairs with
    expert < e, found by ``searchsorted`` on the sorted ids: the same numbers as bincount + cumsum, but
    without the host synchronisation CUDA's bincount does to size its output.
    """
    t, hdim = x.shape
    topk = ids.shape[1]
    rows = t * topk
    dev = x.device
    x_sorted = new_output((rows, hdim), x.dtype, dev)
    offsets = new_output((num_experts + 1,), torch.int32, dev)
    src = new_output((rows,), torch.int32, dev)
    flat = ids.reshape(-1).long()
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, dtype=torch.int64, device=dev)
    offsets.copy_(torch.searchsorted(sorted_ids, bounds))
    src.copy_(order)
    if rows:
        torch.index_select(x.detach(), 0, order // topk, out=x_sorted)   # ops carry no autograd graph
    return x_sorted, offsets, src


def moe_combine(y_sorted: Tensor, src: Tensor, weights: Tensor | None, topk: int | None = None) -> Tensor:
    """``y[T, H]`` in y_sorted's dtype: ``y[t] = sum_j weights[t, j] * y_sorted[r]`` with ``src[r] = t*topk + j``.

    The rows are put back in (t, j) order with one ``index_copy_`` (src is a permutation), then
    weighted and summed over j in float32: deterministic, no atomics.
    """
    k = weights.shape[1] if weights is not None else topk
    rows, hdim = y_sorted.shape
    t = rows // k
    out = new_output((t, hdim), y_sorted.dtype, y_sorted.device)
    unperm = torch.empty((rows, hdim), dtype=torch.float32, device=y_sorted.device)
    unperm.index_copy_(0, src.long(), y_sorted.float())
    unperm = unperm.view(t, k, hdim)
    if weights is None:
        out.copy_(unperm.sum(dim=1))
    else:
        out.copy_((unperm * weights.float().unsqueeze(-1)).sum(dim=1))
    return out
