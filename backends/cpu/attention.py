"""NumPy compressed attention: kv_compress, sparse_attention."""
from __future__ import annotations

import numpy as np
import torch

from dsv4rt.backend import new_output
from dsv4rt.formats import round_float, unpack_kv_fp4, unpack_kv_fp8

from ._np import BUDGET, alloc_f32, f32, finish, gather_rows_f32, ints


def _pool(logit_parts: list[np.ndarray], value_parts: list[np.ndarray]) -> np.ndarray:
    """Per-channel softmax over axis 2 of the concatenation of ``logit_parts`` ([B, J, r, d] each),
    weighting ``value_parts``; stable (max subtracted), without building the concatenation. Non-finite
    inputs give the contract's NaN / +-inf quietly (e.g. an all -inf softmax: -inf - -inf, then 0 / 0)."""
    m = logit_parts[0].max(axis=2, keepdims=True)
    for part in logit_parts[1:]:
        np.maximum(m, part.max(axis=2, keepdims=True), out=m)
    num = np.zeros(m.shape[:2] + m.shape[3:], np.float32)
    den = np.zeros_like(num)
    with np.errstate(invalid="ignore", divide="ignore"):
        for logits, values in zip(logit_parts, value_parts):
            e = np.exp(logits - m)
            den += e.sum(axis=2)
            num += (e * values).sum(axis=2)
        return num / den


def kv_compress(kv: torch.Tensor, gate: torch.Tensor | None, ape: torch.Tensor | None, ratio: int, overlap: bool,
                prev_kv: torch.Tensor | None = None, prev_gate: torch.Tensor | None = None) -> torch.Tensor:
    """out[B, S/ratio, d] float32: gated per-channel softmax pooling of each block of ``ratio`` tokens.

    Vectorised over batch, blocks and channels in float32, a chunk of blocks at a time; with overlap, the
    previous block's first-half channels join each softmax (-inf padding before block 0 unless
    ``prev_kv``/``prev_gate`` are given). ``ape=None`` adds no bias; ``gate=None`` (ratio 1) copies ``kv``.
    """
    bsz, s, c = kv.shape
    nb = s // ratio
    d = c // 2 if overlap else c
    out = new_output((bsz, nb, d), torch.float32, "cpu")
    if out.numel() == 0:
        return out
    res = out.numpy()
    if gate is None:   # ratio 1 without a gate: nothing to pool
        res[...] = f32(kv)
        return out
    kvf, gf = f32(kv), f32(gate)
    apef = None if ape is None else f32(ape)

    def biased(logits: np.ndarray, ch: slice) -> np.ndarray:
        return logits if apef is None else logits + apef[:, ch]

    step = max(1, BUDGET // max(bsz * ratio * c, 1))
    for j0 in range(0, nb, step):
        j1 = min(nb, j0 + step)
        blocks = (bsz, j1 - j0, ratio, c)
        kv4 = kvf[:, j0 * ratio:j1 * ratio].reshape(blocks)
        g4 = biased(gf[:, j0 * ratio:j1 * ratio].reshape(blocks), slice(None))
        if not overlap:
            res[:, j0:j1] = _pool([g4], [kv4])
            continue
        own_l, own_v = g4[..., d:], kv4[..., d:]
        # previous block of each entry: block j-1's first-half channels
        if j0 > 0:
            pl = biased(gf[:, (j0 - 1) * ratio:j0 * ratio, :d], slice(None, d))
            pv = kvf[:, (j0 - 1) * ratio:j0 * ratio, :d]
        elif prev_kv is not None:
            pl = biased(f32(prev_gate)[:, :, :d], slice(None, d))  # type: ignore[arg-type]
            pv = f32(prev_kv)[:, :, :d]
        else:
            pl = np.full((bsz, ratio, d), -np.inf, np.float32)
            pv = np.zeros((bsz, ratio, d), np.float32)
        prev_l = np.concatenate([pl[:, None], g4[:, :-1, :, :d]], axis=1)
        prev_v = np.concatenate([pv[:, None], kv4[:, :-1, :, :d]], axis=1)
        res[:, j0:j1] = _pool([own_l, prev_l], [own_v, prev_v])
    return out


def _attend(qc: np.ndarray, keys: np.ndarray, valid: np.ndarray, sink: np.ndarray | None,
            scale: float, rnd: torch.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """One chunk: qc [S', H, D], keys [S', K, D] (K = V), valid [S', K] -> (o [S', H, D], lse [S', H]).
    ``rnd`` (a 16-bit dtype or None): P of the numerator rounded against the largest logit."""
    logits = np.matmul(qc, keys.transpose(0, 2, 1))                   # [S', H, K]
    logits *= np.float32(scale)
    logits[~np.broadcast_to(valid[:, None, :], logits.shape)] = -np.inf
    m = logits.max(axis=2) if logits.shape[2] else np.full(logits.shape[:2], -np.inf, np.float32)
    if sink is not None:
        m = np.maximum(m, sink[None, :])
    m = np.where(m == -np.inf, np.float32(0.0), m)   # rows with nothing: no shift; +inf stays (exp(inf - inf) = NaN)
    p = np.exp(logits - m[:, :, None])
    den = p.sum(axis=2)
    if sink is not None:
        den += np.exp(sink[None, :] - m)
    if rnd is not None and logits.shape[2]:
        ml = logits.max(axis=2)
        ml = np.where(np.isfinite(ml), ml, m)
        with np.errstate(over="ignore"):
            p = round_float(np.exp(logits - ml[:, :, None]), rnd) * np.exp(ml - m)[:, :, None]
    o = np.matmul(p, keys)
    with np.errstate(divide="ignore", invalid="ignore"):
        o /= den[:, :, None]
        lse = m + np.log(den)
    o[den == 0] = 0.0
    return o, lse


def _gather_v41(kv: np.ndarray, kv_global: np.ndarray | None, sel: np.ndarray) -> np.ndarray:
    """Decoded float32 rows of one batch row's packed V4.1 cache for indices ``sel`` (>= 0): window rows
    (FP8) for sel < N, global rows (FP4) for sel >= N. Only the selected rows are decoded."""
    n, d = kv.shape[0], kv.shape[1] * 32 // 33
    keys = np.empty(sel.shape + (d,), np.float32)
    win = sel < n
    if win.any():
        keys[win] = unpack_kv_fp8(kv[sel[win]])
    if kv_global is not None and not win.all():
        keys[~win] = unpack_kv_fp4(kv_global[sel[~win] - n])
    return keys


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor | None,
                     scale: float, return_lse: bool = False, p_dtype: torch.dtype | None = None,
                     kv_format: str | None = None, kv_global: torch.Tensor | None = None):
    """o[B, S, H, D] (+ lse[B, S, H] float32): one softmax over the gathered K=V rows plus the sink.

    Per batch row and chunk of queries: gathers the selected kv rows (-1 masked), float32 logits, a
    max-shifted softmax whose denominator includes exp(sink), zeros for rows without a valid index.
    A bf16/fp16 cache is converted per batch row when the call gathers at least as many rows as it
    holds (prefill), else only the gathered rows are converted (decode over a long cache).
    ``kv_format="v41"``: the selected packed rows (FP8 window, FP4 global) are decoded per chunk;
    ``p_dtype=None`` is then q's dtype.
    """
    bsz, s, h, d = q.shape
    k = idx.shape[2]
    v41 = kv_format == "v41"
    pd = (q.dtype if v41 else kv.dtype) if p_dtype is None else p_dtype
    rnd = pd if pd in (torch.bfloat16, torch.float16) else None
    out, obuf = alloc_f32((bsz, s, h, d), q.dtype)
    lse_t = new_output((bsz, s, h), torch.float32, "cpu") if return_lse else None
    lse_np = lse_t.numpy() if lse_t is not None else None
    sink_np = f32(sink) if sink is not None else None
    idx_np = ints(idx)
    rows = max(1, min(s, BUDGET // max(k * d + h * k, 1)))
    for b in range(bsz):
        qb = f32(q[b])
        # convert the batch row's cache once when the call gathers more rows than it holds (prefill),
        # else convert only the gathered rows (decode over a large bf16 cache)
        kvb = f32(kv[b]) if not v41 and (kv.dtype == torch.float32 or s * k >= kv.shape[1]) else None
        if v41:
            wb, gb = kv[b].numpy(), None if kv_global is None else kv_global[b].numpy()
        n_all = kv.shape[1] + (kv_global.shape[1] if v41 and kv_global is not None else 0)
        for s0 in range(0, s, rows):
            s1 = min(s, s0 + rows)
            sel = idx_np[b, s0:s1]
            valid = sel >= 0
            safe = np.where(valid, sel, 0)
            if n_all == 0:
                keys = np.zeros(sel.shape + (d,), np.float32)
            else:
                keys = (_gather_v41(wb, gb, safe) if v41 else kvb[safe] if kvb is not None
                        else gather_rows_f32(kv[b], safe))
                keys[~valid] = 0.0   # a skipped entry's stand-in row: its p = 0 must not meet Inf / NaN there
            o, lse = _attend(qb[s0:s1], keys, valid, sink_np, scale, rnd)
            obuf[b, s0:s1] = o
            if lse_np is not None:
                lse_np[b, s0:s1] = lse
    finish(out, obuf)
    if return_lse:
        return out, lse_t
    return out
