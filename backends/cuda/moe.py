"""``cuda/triton`` launchers of the MoE family: moe_route, moe_dispatch, moe_combine.

Kernels are in :mod:`dsv4rt.backends.cuda.kernels.moe`, imported (with Triton) on the first launch.
Nothing synchronises with the host; every launch parameter comes from shapes. Non-contiguous inputs are
passed by strides (no copies). moe_dispatch is a counting sort:

- small (``T*topk <= fused_max``): one program counts, scans and places every pair (``fused``);
- otherwise ``count`` (per block of pairs, a histogram per expert) -> ``scan`` (one program: exclusive
  scans over blocks and experts, giving ``offsets``) -> ``scatter`` (per block: stable positions);
- then ``copy`` reads each token row once and writes its topk copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from dsv4rt.backend import Registrar, new_output
from ._launch import device_guard, kernels, next_pow2, on_interpreter

__all__ = ["register", "moe_route", "moe_dispatch", "moe_combine", "dispatch_plan", "DispatchPlan",
           "supports_route", "supports_dispatch", "supports_combine"]

MAX_EXPERTS = 1024
"""Experts held in one register vector by the router and the dispatch kernels (V4: 256 / 384)."""
MAX_ROUTE_TOPK = 64
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _row_tiles(interp: bool, hdim: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_H) of the row-copy and combine kernels."""
    return (64, min(next_pow2(hdim), 1024)) if interp else (8, min(next_pow2(hdim), 512))


def moe_route(logits: Tensor, bias: Tensor | None, topk: int, route_scale: float,
              score_func: str = "sqrtsoftplus", hash_ids: Tensor | None = None, bias_alt: Tensor | None = None,
              use_alt: Tensor | None = None, weight_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(ids[T, topk] int32, weights[T, topk] float32)``: the V4 / V4.1 sqrt-softplus router (spec 5.1) in
    one kernel.

    Selection is ``topk`` rounds of row argmax over ``s + b_t`` (``b_t = bias_alt`` where ``use_alt[t]``,
    else ``bias``; over the logits when ``bias`` is None), or ``hash_ids``; weights are normalised over the
    chosen experts (``/ (sum + weight_eps)``), times ``route_scale``. ``use_alt`` is read as its bytes.
    """
    if score_func != "sqrtsoftplus":
        raise ValueError(f"cuda/triton moe_route: score_func={score_func!r}; v1 has only 'sqrtsoftplus'")
    t, e = logits.shape
    dev = logits.device
    ids = new_output((t, topk), torch.int32, dev)
    w = new_output((t, topk), torch.float32, dev)
    if t == 0:
        return ids, w
    block_e = next_pow2(e)
    # 4096 scores per program (16 tokens x 256 experts): the largest tile that sm_80 / sm_90 hold in registers
    # over 4 warps (the interpreter too, so the launches CI checks are the ones a GPU compiles without spills)
    block_t = max(1, min(next_pow2(t), 4096 // block_e))
    hsh = hash_ids if hash_ids is not None else ids
    alt = bias_alt is not None
    use = use_alt.view(torch.uint8) if alt else ids
    with device_guard(logits):
        kernels("moe").moe_route_kernel[(-(-t // block_t),)](
            logits, bias if bias is not None else logits, bias_alt if alt else logits, use, hsh, ids, w, t, e,
            float(route_scale), math.log(weight_eps) if weight_eps > 0 else 0.0,
            *logits.stride(), bias.stride(0) if bias is not None else 0, bias_alt.stride(0) if alt else 0,
            use.stride(0) if alt else 0, *hsh.stride(), *ids.stride(), *w.stride(),
            TOPK=topk, HAS_BIAS=bias is not None, HAS_ALT=alt, HASH=hash_ids is not None, HAS_EPS=weight_eps > 0,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=next_pow2(topk), num_warps=4)
    return ids, w


@dataclass(frozen=True)
class DispatchPlan:
    """Counting-sort launch plan: ``fused`` (one program) or ``blocks`` (count / scan / scatter)."""

    path: str
    block_r: int
    sub: int
    nblk: int
    nbc: int


def dispatch_plan(rows: int, num_experts: int, interp: bool, fused_max: int | None = None,
                  block_r: int | None = None) -> DispatchPlan:
    """Plan for ``rows = T*topk`` pairs (shapes only). ``fused_max`` / ``block_r`` override the defaults
    (the tests force the multi-block path on small inputs)."""
    block_e = next_pow2(num_experts)
    sub = max(16, min(128, 8192 // block_e))
    if fused_max is None:
        fused_max = 64 if interp else 512
    if rows <= fused_max:
        br = max(sub, next_pow2(rows))
        return DispatchPlan("fused", br, min(sub, br), 1, 1)
    br = block_r or (128 if interp else 1024)
    br = max(br, sub)
    nblk = -(-rows // br)
    nbc = next_pow2(nblk) if interp else max(1, min(next_pow2(nblk), 8192 // block_e))
    return DispatchPlan("blocks", br, sub, nblk, nbc)


def _dispatch(x: Tensor, ids: Tensor, num_experts: int,
              p: DispatchPlan | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """moe_dispatch with an explicit plan (None: :func:`dispatch_plan`); see :func:`moe_dispatch`."""
    t, hdim = x.shape
    k = ids.shape[1]
    rows = t * k
    dev = x.device
    x_sorted = new_output((rows, hdim), x.dtype, dev)
    offsets = new_output((num_experts + 1,), torch.int32, dev)
    src = new_output((rows,), torch.int32, dev)
    if rows == 0:
        offsets.zero_()
        return x_sorted, offsets, src
    interp = on_interpreter(x)
    p = p or dispatch_plan(rows, num_experts, interp)
    kern = kernels("moe")
    block_e = next_pow2(num_experts)
    dst = torch.empty((rows,), dtype=torch.int32, device=dev)
    warps = 4 if interp or p.sub * (block_e + p.sub) <= 8192 else 8   # one-hot + rank-compare tiles
    with device_guard(x):
        if p.path == "fused":
            kern.dispatch_scatter_kernel[(1,)](ids, ids, offsets, src, dst, rows, k, num_experts, *ids.stride(),
                                               FUSED=True, BLOCK_R=p.block_r, SUB=p.sub, BLOCK_E=block_e,
                                               num_warps=warps)
        else:
            counts = torch.empty((p.nblk, num_experts), dtype=torch.int32, device=dev)
            base = torch.empty_like(counts)
            kern.dispatch_count_kernel[(p.nblk,)](ids, counts, rows, k, num_experts, *ids.stride(),
                                                  BLOCK_R=p.block_r, SUB=p.sub, BLOCK_E=block_e, num_warps=4)
            kern.dispatch_scan_kernel[(1,)](counts, base, offsets, p.nblk, num_experts, NBC=p.nbc,
                                            BLOCK_E=block_e, INTERP=interp, num_warps=8)
            kern.dispatch_scatter_kernel[(p.nblk,)](ids, base, offsets, src, dst, rows, k, num_experts,
                                                    *ids.stride(), FUSED=False, BLOCK_R=p.block_r, SUB=p.sub,
                                                    BLOCK_E=block_e, num_warps=warps)
        if hdim:
            bits = _BITS[x.element_size()]
            xb, ob = x.view(bits), x_sorted.view(bits)
            bt, bh = _row_tiles(interp, hdim)
            kern.dispatch_copy_kernel[(-(-t // bt), -(-hdim // bh))](
                xb, dst, ob, t, hdim, *xb.stride(), *ob.stride(), TOPK=k, BLOCK_T=bt, BLOCK_H=bh, num_warps=4)
    return x_sorted, offsets, src


def moe_dispatch(x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_sorted[T*topk, H], offsets[E+1] int32, src[T*topk] int32)``: a stable counting sort by expert.

    Histogram per block of pairs + exclusive scans + stable scatter (see the module docstring), then a
    row copy that reads each token once. Raw bits are copied, so any element type works.
    """
    return _dispatch(x, ids, num_experts)


def moe_combine(y_sorted: Tensor, src: Tensor, weights: Tensor | None, topk: int | None = None) -> Tensor:
    """``y[T, H]``: ``y[t] = sum_j w[t, j] * y_sorted[r]`` with ``src[r] = t*topk + j``, fp32 sum.

    Inverts the permutation (``dst[src[r]] = r``) and gathers each token's topk rows: no atomics.
    """
    k = weights.shape[1] if weights is not None else topk
    rows, hdim = y_sorted.shape
    t = rows // k
    dev = y_sorted.device
    out = new_output((t, hdim), y_sorted.dtype, dev)
    if t == 0 or hdim == 0:
        return out
    interp = on_interpreter(y_sorted)
    kern = kernels("moe")
    dst = torch.empty((rows,), dtype=torch.int32, device=dev)
    bt, bh = _row_tiles(interp, hdim)
    w = weights if weights is not None else y_sorted
    w_st = weights.stride() if weights is not None else (0, 0)
    with device_guard(y_sorted):
        blk = 1024 if interp else 256
        kern.invert_perm_kernel[(-(-rows // blk),)](src, dst, rows, src.stride(0), BLOCK=blk, num_warps=4)
        kern.combine_kernel[(-(-t // bt), -(-hdim // bh))](
            y_sorted, dst, w, out, t, hdim, *y_sorted.stride(), *w_st, *out.stride(),
            TOPK=k, HAS_W=weights is not None, BLOCK_T=bt, BLOCK_H=bh, num_warps=4)
    return out


def supports_route(a: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot take this moe_route call."""
    e = a["logits"].shape[1]
    if e > MAX_EXPERTS:
        return f"cuda/triton keeps a token's experts in one tile: E <= {MAX_EXPERTS} (got {e})"
    if a["topk"] > MAX_ROUTE_TOPK:
        return f"cuda/triton selects by topk rounds of argmax: topk <= {MAX_ROUTE_TOPK} (got {a['topk']})"
    return None


def supports_dispatch(a: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot take this moe_dispatch call."""
    if a["num_experts"] > MAX_EXPERTS:
        return f"cuda/triton counts experts in one tile: num_experts <= {MAX_EXPERTS} (got {a['num_experts']})"
    if a["x"].element_size() not in _BITS:
        return f"cuda/triton copies rows as 1/2/4/8-byte integers (got {a['x'].dtype})"
    return None


def supports_combine(a: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot take this moe_combine call."""
    if a["y_sorted"].dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"cuda/triton sums float32 / bfloat16 / float16 rows in fp32 (got {a['y_sorted'].dtype})"
    return None


def register(registrar: Registrar, device_type: str, priority: int) -> None:
    """Register ``cuda/triton`` moe_route, moe_dispatch and moe_combine (no Triton import here)."""
    registrar.implement("moe_route", "triton", moe_route, priority=priority, device_type=device_type,
                        supports=supports_route)
    registrar.implement("moe_dispatch", "triton", moe_dispatch, priority=priority, device_type=device_type,
                        supports=supports_dispatch)
    registrar.implement("moe_combine", "triton", moe_combine, priority=priority, device_type=device_type,
                        supports=supports_combine)
