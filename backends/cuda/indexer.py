"""``cuda/triton`` launcher of the lightning indexer: indexer_topk (spec 2.5-2.7, V4.1's candidates and sorted
output, MXFP4 keys), indexer_scores (the logits kernel alone, writing the score matrix) and
select_candidate_blocks.

Two kernels (:mod:`dsv4rt.backends.cuda.kernels.indexer`, imported with Triton on the first launch):

1. ``indexer_logits_kernel``: q.k over D on the tensor cores for a (queries x heads) by keys tile, with
   ReLU, the per-key FP8 scale and the head-weight sum fused on the accumulator; only the [B, S, N]
   fp32 scores are written (never per-head scores). Key tiles beyond every query's ``visible`` are skipped
   (indexer_scores writes them as -inf). MXFP4 keys are decoded from their bits in registers, 32 elements
   (one E8M0 scale) per MMA step, the scale applied to that step's fp32 product.
2. ``topk_select_kernel``: one program per query row; a radix select (4 passes of 8-bit histograms over
   order-preserving int32 keys) finds the k-th largest score, then one compaction pass writes exactly
   ``min(topk, selectable)`` distinct indices (ties at the threshold taken in index order; all in index
   order with ``sorted_output``), -1 elsewhere. A candidate mask is read as bytes in both passes.

select_candidate_blocks: ``block_scores_kernel`` (block maxima, the newest block pinned), then, when fewer
blocks are kept than there are, ``topk_select_kernel`` over the block scores and ``keep_blocks_kernel``, and
``expand_blocks_kernel`` writes the position mask.

Non-contiguous inputs are passed by strides (no copies); nothing synchronises with the host.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from dsv4rt.backend import Registrar, new_output
from ._launch import device_guard, kernels, next_pow2, on_interpreter
from .capability import mma_refusal

__all__ = ["register", "indexer_topk", "indexer_scores", "select_candidate_blocks", "supports", "supports_blocks", "MAX_HEADS",
           "MAX_HEAD_DIM", "MAX_BLOCK"]

MAX_HEADS = 128
"""Heads held in one MMA tile (V4: 64)."""
MAX_HEAD_DIM = 512
MAX_TOPK = 1 << 16
SCORE_ELEMS = 1 << 28
"""Upper bound on the fp32 score buffer (1 GiB); longer prefills run in query chunks."""
MAX_BLOCK = 1024
"""select_candidate_blocks: positions of a block held in one tile (V4.1: 8)."""


def _logit_tiles(s: int, h: int, n: int, d: int, interp: bool, mx: bool = False) -> dict[str, int]:
    """Tile sizes of the logits kernel: BLOCK_S * BLOCK_H >= 16 rows for the MMA. MXFP4 keys (``mx``) walk D
    in chunks of 32, one E8M0 scale each, and take 64 keys per tile (each step's scaled product is a second
    accumulator-sized tile: 128 rows x 128 keys spill on sm_90, x 64 keys do not); the interpreter launches
    them with the GPU's tiles."""
    block_h = next_pow2(h)
    if mx:
        block_s = max(16 // block_h, 1, min(next_pow2(s), 128 // block_h))
        return dict(BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_N=max(16, min(next_pow2(n), 64)), BLOCK_D=32,
                    NUM_DC=-(-d // 32), num_warps=8 if block_s * block_h >= 128 else 4, num_stages=2)
    if interp:
        block_s = max(16 // block_h, 1, min(next_pow2(s), 256 // block_h))
        return dict(BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_N=min(next_pow2(n), 256), BLOCK_D=next_pow2(d),
                    NUM_DC=1, num_warps=4)
    block_s = max(16 // block_h, 1, min(next_pow2(s), 128 // block_h))
    block_d = min(next_pow2(d), 128)
    rows = block_s * block_h
    return dict(BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_N=128, BLOCK_D=block_d, NUM_DC=-(-d // block_d),
                num_warps=8 if rows >= 128 else 4, num_stages=2)


def _select(sc: Tensor, visible: Tensor, topk: int, idx: Tensor, scores: Tensor | None, cand: Tensor | None,
            in_order: bool, interp: bool) -> None:
    """topk_select_kernel over the rows of ``sc`` [B, s, N] (their ``visible`` [B, s], candidates [B, s, N])."""
    b, s, n = sc.shape
    vals = scores if scores is not None else sc
    mask = cand.view(torch.uint8) if cand is not None else visible
    block_n = min(next_pow2(max(n, 1)), 4096)
    kernels("indexer").topk_select_kernel[(b * s,)](
        sc, visible, idx, vals, mask, s, n, *sc.stride(), *visible.stride(), *idx.stride(),
        *(vals.stride() if scores is not None else (0, 0, 0)), *(mask.stride() if cand is not None else (0, 0, 0)),
        TOPK=topk, HAS_VAL=scores is not None, HAS_CAND=cand is not None, SORTED=in_order, BLOCK_N=block_n,
        BLOCK_K=min(next_pow2(topk), 1024), INTERP=interp, num_warps=4 if interp or block_n <= 1024 else 8)


def _logits(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, k_scale: Tensor | None, sc: Tensor,
            interp: bool, rnd: int, mask_vis: bool) -> None:
    """indexer_logits_kernel: the scores of the queries of ``q`` (views) into ``sc`` [B, s, N]; ``mask_vis``:
    every entry written, -inf at ``t >= visible`` (else key blocks beyond every query's visible are skipped)."""
    b, s, h, d = q.shape
    n = k.shape[1]
    if not (n and h and d):
        if n:   # no heads or an empty head dim: every score is 0
            sc.zero_()
            if mask_vis:
                sc.masked_fill_(torch.arange(n, device=sc.device) >= visible[..., None], float("-inf"))
        return
    kfmt = 2 if k.dtype == torch.uint8 else 1 if k.dtype == torch.float8_e4m3fn else 0
    t = _logit_tiles(s, h, n, d, interp, mx=kfmt == 2)
    grid = (-(-n // t["BLOCK_N"]), -(-s // t["BLOCK_S"]), b)
    ks = weights if k_scale is None else k_scale.view(torch.uint8) if kfmt == 2 else k_scale
    ks_st = (0, 0, 0) if k_scale is None else tuple(k_scale.stride()) + (0,) * (3 - k_scale.dim())
    kb = k.view(torch.uint8) if kfmt == 1 else k   # E4M3 keys as bytes: the kernel decodes the bits
    kernels("indexer").indexer_logits_kernel[grid](
        q, kb, ks, weights, visible, sc, s, h, n, d, *q.stride(), *kb.stride(), *ks_st, *weights.stride(),
        *visible.stride(), *sc.stride(), KFMT=kfmt, INTERP=interp, RND=rnd, MASK_VIS=mask_vis, **t)


def _launch(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int, k_scale: Tensor | None,
            idx: Tensor, scores: Tensor | None, sc: Tensor, interp: bool, rnd: int, cand: Tensor | None,
            in_order: bool) -> None:
    """Logits of the queries of ``q`` (a chunk, as views) into ``sc`` [B, s, N], then their top-k select."""
    _logits(q, k, weights, visible, k_scale, sc, interp, rnd, False)
    _select(sc, visible, topk, idx, scores, cand, in_order, interp)


def indexer_scores(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, k_scale: Tensor | None = None,
                   score_dtype: torch.dtype | None = None) -> Tensor:
    """``scores[B, S, N]`` float32: the fused logits kernel writing straight into the output (-inf at
    ``t >= visible`` and for NaN); keys as :func:`indexer_topk` takes them."""
    sd = q.dtype if score_dtype is None else score_dtype
    b, s = q.shape[:2]
    out = new_output((b, s, k.shape[1]), torch.float32, q.device)
    if out.numel():
        with device_guard(q):
            _logits(q, k, weights, visible, k_scale, out, on_interpreter(q),
                    {torch.bfloat16: 1, torch.float16: 2}.get(sd, 0), True)
    return out


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int,
                 k_scale: Tensor | None = None, return_scores: bool = False,
                 score_dtype: torch.dtype | None = None, candidates: Tensor | None = None,
                 sorted_output: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``idx[B, S, topk]`` int32 (+ ``scores``): the ``topk`` best selectable keys per query (visible, and
    candidates when given), -1 padded; in index order with ``sorted_output``.

    Fused logits kernel into an fp32 [B, s, N] score buffer (``s`` = all queries, or chunks of queries
    keeping it under ``SCORE_ELEMS``), then a per-row radix select (no full sort).
    Keys are bf16/fp16/fp32 like q, or float8_e4m3fn with ``k_scale`` [B, N] (decoded from the bits, on any
    sm_80+ GPU, to q's dtype for the MMA, scaled on the fp32 accumulator before the ReLU). A 16-bit
    ``score_dtype`` (None = q's dtype) rounds in the logits kernel, at the contract's three points.
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
                    None if scores is None else scores[:, s0:s1], sc[:, :s1 - s0], interp, rnd,
                    None if candidates is None else candidates[:, s0:s1], sorted_output)
    return (idx, scores) if return_scores else idx


def select_candidate_blocks(scores: Tensor, compress_len: Tensor, block_size: int = 8,
                            n_blocks: int = 2048) -> Tensor:
    """``mask[B, S, N]`` bool: block scores (``block_scores_kernel``), the ``n_blocks`` best by the indexer's
    radix select where there are more blocks than that (else every block above -inf), expanded to positions.
    Inputs by strides; nothing synchronises with the host."""
    b, s, n = scores.shape
    dev = scores.device
    mask = new_output((b, s, n), torch.bool, dev)
    if n == 0 or b * s == 0:
        return mask
    kern = kernels("indexer")
    interp = on_interpreter(scores)
    width = min(block_size, n)
    nb = -(-n // width)                     # = ceil(N / block_size): a block longer than N is one block of N
    every = n_blocks >= nb
    best = torch.empty((b, s, nb), dtype=torch.float32, device=dev)
    keep = torch.empty((b * s, nb), dtype=torch.uint8, device=dev)
    block_w = next_pow2(width)
    block_b = max(1, min(next_pow2(nb), (1 << (14 if interp else 12)) // block_w))
    with device_guard(scores):
        kern.block_scores_kernel[(b * s, -(-nb // block_b))](
            scores, compress_len, best, keep, s, n, nb, width, *scores.stride(), *compress_len.stride(),
            ALL=every, BLOCK_B=block_b, BLOCK_W=block_w)
        if not every:
            idx = torch.empty((b, s, n_blocks), dtype=torch.int32, device=dev)
            val = torch.empty((b, s, n_blocks), dtype=torch.float32, device=dev)
            live = torch.full((1, 1), nb, dtype=torch.int32, device=dev).expand(b, s)
            _select(best, live, n_blocks, idx, val, None, False, interp)
            kern.keep_blocks_kernel[(b * s,)](idx, val, keep, nb, TOPK=n_blocks, BLOCK_K=min(next_pow2(n_blocks), 1024))
        block_t = min(next_pow2(n), 1 << (14 if interp else 10))
        kern.expand_blocks_kernel[(b * s, -(-n // block_t))](keep, mask.view(torch.uint8), n, nb, width,
                                                             BLOCK_T=block_t)
    return mask


def supports(a: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot take this indexer_topk call (cuda/torch then runs it)."""
    q, k = a["q"], a["k"]
    if k.dtype not in (torch.float8_e4m3fn, torch.uint8) and k.dtype != q.dtype:
        return f"cuda/triton needs keys of q's dtype, float8_e4m3fn or MXFP4 (got q {q.dtype}, k {k.dtype})"
    if q.shape[2] > MAX_HEADS:
        return f"cuda/triton holds all heads of a query in one tile: H <= {MAX_HEADS} (got {q.shape[2]})"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"cuda/triton: head dim <= {MAX_HEAD_DIM} (got {q.shape[3]})"
    if a.get("topk", 1) > MAX_TOPK:
        return f"cuda/triton: topk <= {MAX_TOPK} (got {a['topk']})"
    return mma_refusal(q)


def supports_blocks(a: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot take this select_candidate_blocks call (cuda/torch then runs it)."""
    n = a["scores"].shape[2]
    if min(a["block_size"], n) > MAX_BLOCK:
        return f"cuda/triton holds a block in one tile: block_size <= {MAX_BLOCK} (got {a['block_size']}, N = {n})"
    nb = -(-n // max(1, min(a["block_size"], n))) if n else 0
    if nb > a["n_blocks"] > MAX_TOPK:
        return f"cuda/triton selects at most {MAX_TOPK} blocks of more (got n_blocks {a['n_blocks']} of {nb})"
    return None


def register(registrar: Registrar, device_type: str, priority: int) -> None:
    """Register ``cuda/triton`` indexer_topk and select_candidate_blocks (no Triton import here)."""
    registrar.implement("indexer_topk", "triton", indexer_topk, priority=priority, device_type=device_type,
                        supports=supports)
    registrar.implement("indexer_scores", "triton", indexer_scores, priority=priority, device_type=device_type,
                        supports=supports)
    registrar.implement("select_candidate_blocks", "triton", select_candidate_blocks, priority=priority,
                        device_type=device_type, supports=supports_blocks)
