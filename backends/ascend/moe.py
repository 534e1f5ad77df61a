"""``ascend/fused`` moe_dispatch / moe_combine: ``npu_moe_init_routing_v2`` and ``npu_moe_token_unpermute``.

moe_route stays composite (``ascend/torch``): ``npu_moe_gating_top_k`` has no sqrt-softplus score (norm_type 0
softmax / 1 sigmoid), and its ``bias`` is one [E] vector for every token, so V4.1's per-token selection
(``bias_alt`` where ``use_alt``) has no place in it either (docs/ascend.md section 5).

Layout mapping (documented semantics, Ascend/op-plugin ``torch_npu-npu_moe_init_routing_v2.md`` and CANN
``aclnnMoeTokenUnpermute``):

- init_routing_v2 sorts the flattened pair ids ``p = t*topk + j`` by expert with a *stable* key-value
  sort (its documented equivalent code is ``np.argsort(expert_idx.reshape(-1), kind="stable")``). With
  ``row_idx_type=1`` (scatter index) ``expanded_row_idx[i] = sorted[i]``, which is exactly the contract's
  ``src[r] = t*topk + j`` in expert-major, pair-ascending order; ``expanded_x[i] = x[sorted[i] // topk]``
  is exactly ``x_sorted``; with ``expert_tokens_num_type=0`` (cumsum) over ``active_expert_range=[0, E)``
  the histogram output is ``offsets[1:]`` (``offsets[0] = 0``). Pure data movement: bitwise exact.
- npu_moe_token_unpermute computes ``out[t] = sum_j probs[t, j] * permuted[S[t*topk + j]]`` with a
  *gather* index ``S`` (the sorted row of each pair; vllm-ascend passes init_routing_v2's default
  ``row_idx_type=0`` output there). The contract's ``src`` is the scatter index, so ``S`` is its inverse
  permutation, built on the device with one ``scatter_`` (``S[src[r]] = r``): exact because ``src`` is a
  permutation. Its documentation (torch_npu 2.13 / 2.14 docstring) takes bfloat16 ``permuted_tokens`` and
  ``probs`` only, returns bfloat16, and lists A2 and A3 only; the op-plugin wrapper does not check, so other
  dtypes would reach CANN and fail there. So the fused combine runs only where that is exact: A2 / A3,
  bfloat16 ``y_sorted``, and the unweighted sum (``probs = ones`` in bfloat16, exact; ``probs=None``
  would mean topk = 1). The contract's fp32 ``weights`` would be rounded to bfloat16 ``probs`` (an error
  of 2^-9 per term, beyond the contract's fp32-weight sum), and fp32 / fp16 rows would have to be
  rounded or are undocumented: those calls, and every call on 950, run the composite ``ascend/torch``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from dsv4rt.backend import new_output

from ._npu import Features

__all__ = ["register", "make_moe_dispatch", "make_moe_combine", "supports_dispatch", "supports_combine",
           "MAX_EXPERTS", "MAX_UNPERMUTE_TOPK"]

MAX_EXPERTS = 10240
"""npu_moe_init_routing_v2: expert_num in [0, 10240] in cumsum / count mode."""
MAX_UNPERMUTE_TOPK = 512
"""npu_moe_token_unpermute on A2/A3: topK_num <= 512."""
_DISPATCH_X = (torch.float16, torch.bfloat16, torch.float32)
UNPERMUTE_CHIPS = ("A2", "A3")
"""npu_moe_token_unpermute: the chips its documentation lists (torch_npu 2.13 / 2.14 docstring)."""


def supports_dispatch(feat: Features) -> Callable[[Mapping[str, Any]], str | None]:
    def supports(a: Mapping[str, Any]) -> str | None:
        if a["x"].dtype not in _DISPATCH_X:
            return f"x is {a['x'].dtype}; npu_moe_init_routing_v2 takes float16, bfloat16 or float32 rows"
        if a["num_experts"] > MAX_EXPERTS:
            return f"num_experts = {a['num_experts']} > {MAX_EXPERTS} (npu_moe_init_routing_v2 expert_num limit)"
        return None
    return supports


def make_moe_dispatch(npu: Any, fallback: Callable[..., Any]) -> Callable[..., Any]:
    def moe_dispatch(x: Tensor, ids: Tensor, num_experts: int):
        t, k = ids.shape
        rows = t * k
        if rows == 0:
            return fallback(x, ids, num_experts)
        expanded_x, expanded_row_idx, cumsum, _ = npu.npu_moe_init_routing_v2(
            x.contiguous(), ids.contiguous(), active_num=rows, expert_num=num_experts, drop_pad_mode=0,
            expert_tokens_num_type=0, expert_tokens_num_flag=True, quant_mode=-1,
            active_expert_range=[0, num_experts], row_idx_type=1)
        offsets = new_output((num_experts + 1,), torch.int32, x.device)
        offsets[:1].zero_()
        offsets[1:].copy_(cumsum)
        return expanded_x, offsets, expanded_row_idx.to(torch.int32)
    return moe_dispatch


def supports_combine(feat: Features) -> Callable[[Mapping[str, Any]], str | None]:
    def supports(a: Mapping[str, Any]) -> str | None:
        y = a["y_sorted"]
        if feat.soc not in UNPERMUTE_CHIPS:
            return (f"SoC {feat.soc}: npu_moe_token_unpermute documents A2 and A3 only; the composite combine "
                    f"runs here")
        if y.dtype != torch.bfloat16:
            return (f"y_sorted is {y.dtype}; npu_moe_token_unpermute takes and returns bfloat16 only (converting "
                    f"would round)")
        if a["weights"] is not None:
            return ("weights given: npu_moe_token_unpermute takes bfloat16 probs only, and rounding the contract's "
                    "float32 weights to bfloat16 is not exact; the composite combine runs weighted sums")
        k = a["topk"]
        if feat.soc in ("A2", "A3") and k > MAX_UNPERMUTE_TOPK:
            return f"topk = {k} > {MAX_UNPERMUTE_TOPK} (npu_moe_token_unpermute limit on A2/A3)"
        return None
    return supports


def make_moe_combine(npu: Any, feat: Features, fallback: Callable[..., Any]) -> Callable[..., Tensor]:
    supports = supports_combine(feat)

    def moe_combine(y_sorted: Tensor, src: Tensor, weights: Tensor | None, topk: int | None = None) -> Tensor:
        # the selection cache keys on shape / dtype only: a weighted call can follow an unweighted one
        rows = y_sorted.shape[0]
        if rows == 0 or supports({"y_sorted": y_sorted, "src": src, "weights": weights, "topk": topk}):
            return fallback(y_sorted, src, weights, topk)
        k = topk
        t = rows // k
        gather = torch.empty_like(src, dtype=torch.int32)
        gather.scatter_(0, src.long(), torch.arange(rows, dtype=torch.int32, device=src.device))
        probs = torch.ones((t, k), dtype=torch.bfloat16, device=y_sorted.device)
        return npu.npu_moe_token_unpermute(y_sorted.contiguous(), gather, probs=probs)
    return moe_combine


def register(registrar: Any, npu: Any, feat: Features, priority: int, device_type: str) -> None:
    from dsv4rt.backends.composite import moe as composite

    if feat.has("npu_moe_init_routing_v2"):
        registrar.implement("moe_dispatch", "fused", make_moe_dispatch(npu, composite.moe_dispatch),
                            priority=priority, requires=("npu_moe_init_routing_v2",), device_type=device_type,
                            supports=supports_dispatch(feat))
    if feat.has("npu_moe_token_unpermute"):
        registrar.implement("moe_combine", "fused", make_moe_combine(npu, feat, composite.moe_combine),
                            priority=priority, requires=("npu_moe_token_unpermute",), device_type=device_type,
                            supports=supports_combine(feat))
