"""``cuda/triton`` launcher of the lightning indexer: indexer_topk (spec 2.5-2.7).

Two kernels (:mod:`dsv4rt.backends.cuda.kernels.indexer`, imported with Triton on the first launch):

1. ``indexer_logits_kernel``: q.k over D on the tensor cores for a (queries x heads) by keys tile, with
   ReLU, the per-key FP8 scale and the head-weight sum fused on the accumulator; only the [B, S, N]
   fp32 scores are written (never per-head scores). Key tiles beyond every query's ``visible`` are skipped.
2. ``topk_select_kernel``: one program per query row; a radix select (4 passes of 8-bit histograms over
   order-preserving int32 keys) finds the k-th largest score, then one compaction pass writes exactly
   ``min(topk, visible)`` distinct indices (ties at the threshold taken in index order), -1 elsewhere.

Non-contiguous inputs are passed by strides (no copies); nothing synchronises with the host.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from dsv4rt.backend import Registrar, new_output
from ._launch import device_guard, kernels, next_pow2, on_interpreter

__all__ = ["register", "indexer_topk", "supports", "MAX_HEADS", "MAX_HEAD_DIM"]

MAX_HEADS = 128
"""Heads held in one MMA tile (V4: 64)."""
MAX_HEAD_DIM = 512
MAX_TOPK = 1 << 16
SCORE_ELEMS = 1 << 28
"""Upper bound on the fp32 score buffer (1 GiB); longer prefills run in query chunks."""


def _logit_tiles(s: int, h: int, n: int, d: int, interp: bool) -> dict[str, int]:
    """Tile sizes of the logits kernel: BLOCK_S * BLOCK_H >= 16 rows for the MMA."""
    block_h = next_pow2(h)
    if interp:
        block_s = max(16 // block_h, 1, min(next_pow2(s), 256 // block_h))
        return dict(BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_N=min(next_pow2(n), 256), BLOCK_D=next_pow2(d), NUM_DC=1,
                    num_warps=4)
    block_s = max(16 // block_h, 1, min(next_pow2(s), 128 // block_h))
    block_d = min(next_pow2(d), 128)
    rows = block_s * block_h
    return dict(BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_N=128, BLOCK_D=block_d, NUM_DC=-(-d // block_d),
                num_warps=8 if rows >= 128 else 4, num_stages=2)


def _launch(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int, k_scale: Tensor | None,
            idx: Tensor, scores: Tensor | None, sc: Tensor, interp: bool, rnd: int) -> None:
    """Logits of the queries of ``q`` (a chunk, as views) into ``sc`` [B, s, N], then their top-k select."""
    kern = kernels("indexer")
    b, s, h, d = q.shape
    n = k.shape[1]
    if n and h and d:
        t = _logit_tiles(s, h, n, d, interp)
        grid = (-(-n // t["BLOCK_N"]), -(-s // t["BLOCK_S"]), b)
        ks = k_scale if k_scale is not None else weights
        ks_st = k_scale.stride() if k_scale is not None else (0, 0)
        kern.indexer_logits_kernel[grid](
            q, k, ks, weights, visible, sc, s, h, n, d, *q.stride(), *k.stride(), *ks_st, *weights.stride(),
            *visible.stride(), *sc.stride(), HAS_SCALE=k_scale is not None, INTERP=interp, RND=rnd, **t)
    elif n:
        sc.zero_()  # no heads or an empty head dim: every score is 0
    vals = scores if scores is not None else sc
    block_n = min(next_pow2(max(n, 1)), 4096)
    kern.topk_select_kernel[(b * s,)](
        sc, visible, idx, vals, s, n, *sc.stride(), *visible.stride(), *idx.stride(),
        *(vals.stride() if scores is not None else (0, 0, 0)), TOPK=topk, HAS_VAL=scores is not None,
        BLOCK_N=block_n, BLOCK_K=min(next_pow2(topk), 1024), INTERP=interp, num_warps=4 if interp or block_n <= 1024 else 8)


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int,
                 k_scale: Tensor | None = None, return_scores: bool = False,
                 score_dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``idx[B, S, topk]`` int32 (+ ``scores``): the ``topk`` best visible keys per query, -1 padded.

    Fused logits kernel into an fp32 [B, s, N] score buffer (``s`` = all queries, or chunks of queries
    keeping it under ``SCORE_ELEMS``), then a per-row radix select (no full sort).
    Keys are bf16/fp16/fp32 like q, or float8_e4m3fn with ``k_scale`` [B, N] (converted to q's dtype for
    the MMA, scaled on the fp32 accumulator before the ReLU). A 16-bit ``score_dtype`` (None = q's dtype)
    rounds in the logits kernel, at the contract's three points.
    """
    sd = q.dtype if score_dtype is None else score_dtype
    rnd = {torch.bfloat16: 1, torch.float16: 2}.get(sd, 0)
    b, s, h, d = q.shape
    n = k.shape[1]
    dev = q.device
    idx = new_output((b, s, topk), torch.int32, dev)
    scores = new_output((b, s, topk), torch.float32, dev) if return_scores else None
    if b * s == 0:
        return (idx, scores) if return_scores else idx
    interp = on_interpreter(q)
    chunk = max(1, SCORE_ELEMS // max(1, b * n))       # queries per launch pair: bounds the score buffer
    sc = torch.empty((b, min(s, chunk), max(n, 1)), dtype=torch.float32, device=dev)
    with device_guard(q):
        for s0 in range(0, s, chunk):
            s1 = min(s, s0 + chunk)
            _launch(q[:, s0:s1], k, weights[:, s0:s1], visible[:, s0:s1], topk, k_scale, idx[:, s0:s1],
                    None if scores is None else scores[:, s0:s1], sc[:, :s1 - s0], interp, rnd)
    return (idx, scores) if return_scores else idx


def supports(a: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot take this indexer_topk call (cuda/torch then runs it)."""
    q, k = a["q"], a["k"]
    if k.dtype != torch.float8_e4m3fn and k.dtype != q.dtype:
        return f"cuda/triton needs keys of q's dtype or float8_e4m3fn (got q {q.dtype}, k {k.dtype})"
    if q.shape[2] > MAX_HEADS:
        return f"cuda/triton holds all heads of a query in one tile: H <= {MAX_HEADS} (got {q.shape[2]})"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"cuda/triton: head dim <= {MAX_HEAD_DIM} (got {q.shape[3]})"
    if a["topk"] > MAX_TOPK:
        return f"cuda/triton: topk <= {MAX_TOPK} (got {a['topk']})"
    if k.dtype == torch.float8_e4m3fn and k.device.type == "cuda" and \
            torch.cuda.get_device_capability(k.device) < (8, 9):
        return "cuda/triton FP8 keys need compute capability >= 8.9 (Ada / Hopper)"
    return None


def register(registrar: Registrar, device_type: str, priority: int) -> None:
    """Register ``cuda/triton`` indexer_topk (no Triton import here)."""
    registrar.implement("indexer_topk", "triton", indexer_topk, priority=priority, device_type=device_type,
                        supports=supports)
