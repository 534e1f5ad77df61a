"""``cpu/native``: the C++ kernels of ``dsv4rt._C`` (csrc/) behind the op contracts.

The wrappers view torch CPU tensors as NumPy without copying where the layout allows (float32 as is, bf16
as its 16-bit patterns, FP4/E8M0/E4M3 as bytes), copy only what is non-contiguous (or float16, widened to
float32), and let the kernels run with the GIL released on all cores. Outputs come from
:func:`dsv4rt.backend.new_output` and are written in place by the kernels (bf16 rounded to nearest even
in C++, like torch); only float16 outputs go through a float32 buffer and a rounding copy. Importing
this module imports ``dsv4rt._C`` (ImportError if the extension was not built; the backend then
registers no native variant).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from dsv4rt import _C, invariant
from dsv4rt.backend import new_output
from dsv4rt.ops.indexer import score_dtype_of

from ._np import bits_view, f32
from .packed import PackedMXFP4, packed_bytes
from .native_engram import SUPPORTS as _ENGRAM_SUPPORTS
from .native_engram import engram_hash, engram_lookup  # noqa: F401  (the backend looks ops up here by name)

__all__ = ["fp4_gemm", "fp4_grouped_gemm", "fp8_gemm", "indexer_topk", "indexer_scores", "select_candidate_blocks",
           "kv_compress", "sparse_attention", "moe_route",
           "moe_dispatch", "moe_combine", "SUPPORTS", "GEMV_MAX_M", "FP8_GEMV_MAX_M", "FEW_MAX_M"]

GEMV_MAX_M = 8          # rows of x up to which the GEMM streams the weight once (GEMV path)
# fp8_gemm: rows up to which the GEMV path runs, by the kernel that path has on this CPU. With the lane kernel
# (AVX512-BF16 + AVX512-VBMI) it beats the blocked AVX512-BF16 GEMM up to 12 rows (CPU time per call, 4096 x 4096,
# 2048 x 4096, 4096 x 2048, block 128 and 32, 2 threads: 1.3-4x at M = 2-8, 1.05-1.4x at M = 10-12, blocked ahead
# at 16 on two of the four shapes; 2-core EPYC, 2026-12-06); with the float32 GEMV the crossover is 5-6 rows.
_FP8_LANE = bool(getattr(_C, "fp8_lane_available", lambda: False)())
FP8_GEMV_MAX_M = 12 if _FP8_LANE else 5
FEW_MAX_M = 8           # batch-invariant mode: rows (per expert) up to which the few-rows kernel with the blocked
                        # path's bits is faster than the blocked path itself (measured: faster up to 8, slower at 16)
MAX_K = 1 << 28         # the tile decode addresses a 16-row tile with 32-bit byte offsets


def _arr(t: torch.Tensor, view: torch.dtype | None = None) -> np.ndarray:
    """t (reinterpreted as ``view``, a dtype of the same width, if given) as a C-contiguous NumPy array:
    a view when t is contiguous, else a copy. Few calls on purpose: the bench flushes the caches before
    every call, and each torch / NumPy call then costs microseconds."""
    if view is not None and t.dtype != view:
        t = t.view(view)
    if t.requires_grad:
        t = t.detach()
    return t.numpy() if t.is_contiguous() else np.ascontiguousarray(t.numpy())


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A 1-byte tensor (uint8 / int8 / float4_e2m1fn_x2 / float8) as contiguous uint8."""
    return _arr(t, torch.uint8)


def _fp4_w(w: torch.Tensor) -> tuple[np.ndarray, dict[str, bool]]:
    """An MXFP4 weight's bytes and the kernel's ``packed`` keyword (a :class:`PackedMXFP4` as it lies)."""
    if isinstance(w, PackedMXFP4):
        return packed_bytes(w), {"packed": True}
    return _bytes(w), {}


def _act(x: torch.Tensor) -> np.ndarray:
    """A float activation as float32 or bf16 bits (int16), both taken by the kernels; float16 is widened."""
    if x.dtype == torch.float32:
        return _arr(x)
    if x.dtype == torch.bfloat16:
        return _arr(x, torch.int16)
    return np.ascontiguousarray(f32(x))


def _finish(out: torch.Tensor, buf: np.ndarray) -> torch.Tensor:
    """Round the float32 scratch of a float16 output into it (float32 / bf16 were written in place)."""
    if out.dtype not in (torch.float32, torch.bfloat16):
        out.copy_(torch.from_numpy(buf))
    return out


def _out(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """(output tensor, array the kernel writes): float32 and bf16 outputs are written in place (bf16 as
    bits, rounded by the kernel like torch); float16 goes through float32 scratch and :func:`_finish`."""
    out = new_output(shape, dtype, "cpu")
    if dtype == torch.float32:
        return out, out.numpy()
    if dtype == torch.bfloat16:
        return out, out.view(torch.int16).numpy()
    return out, np.empty(shape, np.float32)


# ---------------------------------------------------------------------------------------------- GEMMs

def _v41_kw(name: str, value: int) -> dict[str, int]:
    """The V4.1 block-size keyword of a native GEMM, passed only when it is not V4's 128 (so a build that
    predates it still runs every V4 call; _gemm_supports declines the others on such a build)."""
    return {} if value == 128 else {name: value}


def fp4_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             act_quant: str | None = None, act_block_size: int = 128) -> torch.Tensor:
    """y[M, N] = q(x) @ dequant(w)^T on the packed MXFP4 bytes (GEMV path for M <= 8, blocked above; in the
    batch-invariant mode each row's numerics from that row alone); act_quant per 1 x act_block_size."""
    out, acc = _out((x.shape[0], w.shape[0]), x.dtype)
    inv = invariant.enabled()
    wb, packed = _fp4_w(w)
    _C.fp4_gemm(_act(x), wb, _bytes(w_scale), acc, FEW_MAX_M if inv else GEMV_MAX_M, act_quant == "fp8", inv,
                **_v41_kw("act_block_size", act_block_size), **packed)
    return _finish(out, acc)


def fp4_grouped_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor,
                     act_quant: str | None = None, act_block_size: int = 128) -> torch.Tensor:
    """y[R, N]: rows offsets[e]:offsets[e+1] times expert e; all experts in one parallel kernel call (in the
    batch-invariant mode a row's numerics never depend on how many rows its expert gets)."""
    out, acc = _out((x.shape[0], w.shape[1]), x.dtype)
    inv = invariant.enabled()
    wb, packed = _fp4_w(w)
    _C.fp4_grouped_gemm(_act(x), wb, _bytes(w_scale), _arr(offsets), acc, FEW_MAX_M if inv else GEMV_MAX_M,
                        act_quant == "fp8", inv, **_v41_kw("act_block_size", act_block_size), **packed)
    return _finish(out, acc)


def fp8_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             act_quant: str | None = None, block_size: int = 128) -> torch.Tensor:
    """y[M, N] = q(x) @ dequant(w)^T for E4M3 weights with bs x bs E8M0 or float32 block scales (bs =
    block_size, 128 V4 / 32 V4.1), scales applied per bs-block sum (block 32 on the blocked path: E8M0 scales
    folded into the bf16 weights where exact): small M reads the weight once for all rows (threads split N); above
    FP8_GEMV_MAX_M rows, on CPUs with AVX512-BF16 and x exactly bf16 (bf16 input or act_quant's output), a
    blocked vdpbf16ps GEMM; up to that, with AVX512-VBMI too, a vdpbf16ps GEMV with K in the lanes (the lane
    kernel). act_quant runs in the kernel (bit-identical to dsv4rt.formats.act_quant_fp8). In the batch-invariant
    mode every row that allows it gets the lane kernel's numerics (without VBMI: the blocked path's), whatever M."""
    out, acc = _out((x.shape[0], w.shape[0]), x.dtype)
    scale = _arr(w_scale) if w_scale.dtype == torch.float32 else _bytes(w_scale)
    inv = invariant.enabled()
    _C.fp8_gemm(_act(x), _bytes(w), scale, acc, act_quant == "fp8", FEW_MAX_M if inv else FP8_GEMV_MAX_M, inv,
                **_v41_kw("block_size", block_size))
    return _finish(out, acc)


# ---------------------------------------------------------------------------------------------- indexer

_INDEXER_V41 = hasattr(_C, "select_candidate_blocks")   # this build takes candidates / sorted_out (V4.1)
_INDEXER_MX = hasattr(_C, "indexer_scores")   # this build has indexer_scores and MXFP4 keys


def _indexer_keys(k: torch.Tensor, k_scale: torch.Tensor | None):
    """(keys, scale) as the kernels take them: E4M3 or MXFP4 bytes with float32 / E8M0-byte scales."""
    if k.dtype == torch.uint8:
        return _bytes(k), _bytes(k_scale)  # type: ignore[arg-type]
    if k.dtype == torch.float8_e4m3fn:
        return _bytes(k), _arr(k_scale)  # type: ignore[arg-type]
    return _act(k), None


def indexer_topk(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor, topk: int,
                 k_scale: torch.Tensor | None = None, return_scores: bool = False,
                 score_dtype: torch.dtype | None = None, candidates: torch.Tensor | None = None,
                 sorted_output: bool = False):
    """Fused scores + per-row nth_element top-k over the selectable keys (the k chosen ordered by descending
    score, or by key with ``sorted_output``; -1 after); the bf16 score precision points in the kernel (fp16
    ones are refused by ``supports``)."""
    bsz, s = q.shape[:2]
    idx = new_output((bsz, s, topk), torch.int32, "cpu")
    scores = new_output((bsz, s, topk), torch.float32, "cpu") if return_scores else None
    keys, ks = _indexer_keys(k, k_scale)
    sd = q.dtype if score_dtype is None else score_dtype
    v41 = () if candidates is None and not sorted_output else (
        None if candidates is None else _arr(candidates, torch.uint8), sorted_output)
    _C.indexer_topk(_act(q), keys, ks, _arr(weights), _arr(visible), topk, idx.numpy(),
                    None if scores is None else scores.numpy(), sd == torch.bfloat16, *v41)
    return (idx, scores) if return_scores else idx


def indexer_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, visible: torch.Tensor,
                   k_scale: torch.Tensor | None = None, score_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The fused indexer's scoring loop (query groups x key tiles, the head sum in registers) writing each
    row's scores instead of selecting; -inf beyond ``visible`` and for NaN."""
    bsz, s = q.shape[:2]
    out = new_output((bsz, s, k.shape[1]), torch.float32, "cpu")
    keys, ks = _indexer_keys(k, k_scale)
    sd = q.dtype if score_dtype is None else score_dtype
    _C.indexer_scores(_act(q), keys, ks, _arr(weights), _arr(visible), out.numpy(), sd == torch.bfloat16)
    return out


def select_candidate_blocks(scores: torch.Tensor, compress_len: torch.Tensor, block_size: int = 8,
                            n_blocks: int = 2048) -> torch.Tensor:
    """Per query row: block maxima, the newest block pinned, nth_element over the live blocks; the mask is
    written in place as bytes (bf16 scores read as bits, float16 widened)."""
    mask = new_output(tuple(scores.shape), torch.bool, "cpu")
    _C.select_candidate_blocks(_act(scores), _arr(compress_len), int(block_size), int(n_blocks),
                               mask.view(torch.uint8).numpy())
    return mask


# ---------------------------------------------------------------------------------------------- attention

def kv_compress(kv: torch.Tensor, gate: torch.Tensor | None, ape: torch.Tensor | None, ratio: int, overlap: bool,
                prev_kv: torch.Tensor | None = None, prev_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel softmax pooling of each block, one task per (b, entry), float32 (bf16 widened in C++);
    with overlap the previous block's first-half channels (or ``prev_kv``/``prev_gate`` for entry 0)
    join each softmax. ``ape=None``: no bias; ``gate=None`` (ratio 1): kv widened to float32."""
    b, s, c = kv.shape
    out = new_output((b, s // ratio, c // 2 if overlap else c), torch.float32, "cpu")
    _C.kv_compress(_act(kv), None if gate is None else _act(gate), None if ape is None else _arr(ape), ratio,
                   overlap, None if prev_kv is None else _act(prev_kv), None if prev_gate is None else _act(prev_gate),
                   out.numpy())
    return out


_ATTN_V41 = "kv_format" in (_C.sparse_attention.__doc__ or "")   # this build decodes the V4.1 packed cache


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor | None,
                     scale: float, return_lse: bool = False, p_dtype: torch.dtype | None = None,
                     kv_format: str | None = None, kv_global: torch.Tensor | None = None):
    """Online softmax with sink over the gathered K=V rows, per (b, s, head group), float32 statistics;
    P rounded to bf16 / fp16 for the P.V product when the effective ``p_dtype`` is 16-bit. In the
    batch-invariant mode a row's entries are split over threads by its own count only.
    ``kv_format="v41"``: the kernel decodes the gathered packed rows (FP8 window, FP4 global) itself."""
    out, obuf = _out(tuple(q.shape), q.dtype)
    lse = new_output(tuple(q.shape[:3]), torch.float32, "cpu") if return_lse else None
    v41 = kv_format == "v41"
    pd = (q.dtype if v41 else kv.dtype) if p_dtype is None else p_dtype
    extra = (None if kv_global is None else _bytes(kv_global), 1) if v41 else ()
    _C.sparse_attention(_act(q), _bytes(kv) if v41 else _act(kv), _arr(idx), None if sink is None else _arr(sink),
                        float(scale), obuf, None if lse is None else lse.numpy(),
                        {torch.bfloat16: 1, torch.float16: 2}.get(pd, 0), invariant.enabled(), *extra)
    _finish(out, obuf)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------- MoE

def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, route_scale: float,
              score_func: str = "sqrtsoftplus", hash_ids: torch.Tensor | None = None,
              bias_alt: torch.Tensor | None = None, use_alt: torch.Tensor | None = None, weight_eps: float = 0.0):
    """Per token: top-k of sqrt(softplus(logits)) + bias (``bias_alt`` for the tokens ``use_alt`` marks; of
    the logits without a bias) in descending order, or ``hash_ids``; weights s / (sum s + weight_eps) *
    route_scale in double (from log s where s underflows, finite there)."""
    if score_func != "sqrtsoftplus":
        raise NotImplementedError(f"cpu/native moe_route: score_func={score_func!r} (only 'sqrtsoftplus')")
    shape = (logits.shape[0], topk)
    ids, w = new_output(shape, torch.int32, "cpu"), new_output(shape, torch.float32, "cpu")
    v41 = () if bias_alt is None and weight_eps == 0 else (
        None if bias_alt is None else _arr(bias_alt), None if use_alt is None else _arr(use_alt), float(weight_eps))
    _C.moe_route(_arr(logits), None if bias is None else _arr(bias), topk, float(route_scale),
                 None if hash_ids is None else _arr(hash_ids), ids.numpy(), w.numpy(), *v41)
    return ids, w


def moe_dispatch(x: torch.Tensor, ids: torch.Tensor, num_experts: int):
    """Stable counting sort by expert; rows moved as raw bytes (any dtype, bit-exact)."""
    t, h = x.shape
    r = t * ids.shape[1]
    x_sorted = new_output((r, h), x.dtype, "cpu")
    offsets = new_output((num_experts + 1,), torch.int32, "cpu")
    src = new_output((r,), torch.int32, "cpu")
    _C.moe_dispatch(np.ascontiguousarray(bits_view(x)), _arr(ids), num_experts, bits_view(x_sorted), offsets.numpy(),
                    src.numpy())
    return x_sorted, offsets, src


def moe_combine(y_sorted: torch.Tensor, src: torch.Tensor, weights: torch.Tensor | None,
                topk: int | None = None) -> torch.Tensor:
    """y[t] = sum_j w[t, j] * y_sorted[row of (t, j)] in float32 (slot order), out dtype = y_sorted's."""
    r, h = y_sorted.shape
    k = weights.shape[1] if weights is not None else int(topk)  # type: ignore[arg-type]
    out, acc = _out((r // k, h), y_sorted.dtype)
    _C.moe_combine(_act(y_sorted), _arr(src), None if weights is None else _arr(weights), k, acc)
    return _finish(out, acc)


# ---------------------------------------------------------------------------------------------- supports

def _strided(args: Mapping[str, Any]) -> str | None:
    for name, v in args.items():
        if isinstance(v, torch.Tensor) and v.layout != torch.strided:
            return f"cpu/native needs strided tensors; '{name}' has layout {v.layout}"
    return None


_GEMM_V41 = "block_size" in (_C.fp8_gemm.__doc__ or "")   # this build takes block_size / act_block_size


def _gemm_supports(args: Mapping[str, Any]) -> str | None:
    k = args["x"].shape[1]
    if k >= MAX_K:
        return f"K = {k} >= 2^28: beyond the native tile decode's 32-bit offsets"
    return _fp8_supports(args)


def _fp8_supports(args: Mapping[str, Any]) -> str | None:
    if not _GEMM_V41 and (args.get("block_size", 128) != 128 or args.get("act_block_size", 128) != 128):
        return "this dsv4rt._C build predates V4.1's block_size / act_block_size 32; rebuild it"
    return _strided(args)


def _indexer_supports(args: Mapping[str, Any]) -> str | None:
    if score_dtype_of(args) == torch.float16:
        return "score_dtype float16: cpu/native rounds indexer scores to bf16 only"
    if not _INDEXER_V41 and (args.get("candidates") is not None or args.get("sorted_output", False)):
        return "this dsv4rt._C build predates V4.1's candidates / sorted_output; rebuild it"
    if not _INDEXER_MX and args["k"].dtype == torch.uint8:
        return "this dsv4rt._C build predates MXFP4 indexer keys; rebuild it"
    return _strided(args)


def _scores_supports(args: Mapping[str, Any]) -> str | None:
    if not _INDEXER_MX:
        return "this dsv4rt._C build predates indexer_scores; rebuild it"
    if score_dtype_of(args) == torch.float16:
        return "score_dtype float16: cpu/native rounds indexer scores to bf16 only"
    return _strided(args)


def _blocks_supports(args: Mapping[str, Any]) -> str | None:
    if not _INDEXER_V41:
        return "this dsv4rt._C build predates select_candidate_blocks; rebuild it"
    return _strided(args)


def _attention_supports(args: Mapping[str, Any]) -> str | None:
    kv, idx = args["kv"], args["idx"]
    if args.get("kv_format") == "v41":
        if not _ATTN_V41:
            return "this dsv4rt._C build predates the V4.1 packed KV cache (kv_format='v41'); rebuild it"
        return _strided(args)
    if kv.dtype == torch.float16 and idx.numel() < kv.shape[0] * kv.shape[1]:
        return ("float16 KV cache larger than the gathered rows: cpu/native would widen the whole cache, "
                "cpu/numpy widens only the gathered rows")
    if not kv.is_contiguous() and idx.numel() < kv.shape[0] * kv.shape[1]:
        gib = kv.numel() * 4 / 2**30
        return (f"kv is a non-contiguous view larger than the gathered rows: cpu/native would copy the whole "
                f"cache ({gib:.2f} GiB as float32), cpu/numpy gathers only the selected rows")
    return _strided(args)


_ROUTE_V41 = "weight_eps" in (_C.moe_route.__doc__ or "")   # this build takes bias_alt / use_alt / weight_eps


def _route_supports(args: Mapping[str, Any]) -> str | None:
    if args.get("score_func", "sqrtsoftplus") != "sqrtsoftplus":
        return f"score_func {args['score_func']!r}: cpu/native implements only 'sqrtsoftplus'"
    if not _ROUTE_V41 and (args.get("bias_alt") is not None or args.get("weight_eps", 0.0) != 0):
        return "this dsv4rt._C build predates V4.1's bias_alt / use_alt / weight_eps; rebuild it"
    return _strided(args)


SUPPORTS = {"fp4_gemm": _gemm_supports, "fp4_grouped_gemm": _gemm_supports, "fp8_gemm": _fp8_supports,
            "indexer_topk": _indexer_supports, "indexer_scores": _scores_supports,
            "select_candidate_blocks": _blocks_supports, "kv_compress": _strided,
            "sparse_attention": _attention_supports, "moe_route": _route_supports, "moe_dispatch": _strided,
            "moe_combine": _strided, **_ENGRAM_SUPPORTS}
