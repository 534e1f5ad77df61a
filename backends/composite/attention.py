"""Plain-torch compressed attention: kv_compress (spec 3.2 / 4.1) and sparse_attention (spec 3.5).

Both compute in float32 and never synchronise with the host. sparse_attention processes a chunk of
queries at a time so the gathered ``[B, chunk, K, D]`` key/value rows stay under ``CHUNK_ELEMS``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4rt.backend import new_output
from dsv4rt.formats import round_float, unpack_kv_fp4, unpack_kv_fp8

__all__ = ["kv_compress", "sparse_attention", "gather_v41", "CHUNK_ELEMS"]

CHUNK_ELEMS = 1 << 25
"""Upper bound on the elements of the largest float32 intermediate per query chunk (128 MiB)."""


def _pool(logits: Tensor, values: Tensor) -> Tensor:
    """Softmax over dim 2 (the tokens of a window), per channel, then the weighted sum of ``values``."""
    return (torch.softmax(logits, dim=2) * values).sum(dim=2)


def _row_max(logits: Tensor, sink: Tensor | None) -> Tensor:
    """The softmax shift ``m = max(max_j logit_j, sink)`` of each row ([B, c, H]), as the reference takes
    it; 0 where that is -inf (no valid index and no sink, or a padded head's -inf sink), so such a row gets
    ``p = 0``. A +inf logit keeps ``m = +inf``: its ``exp(inf - inf)`` is NaN, as IEEE arithmetic has it."""
    m = logits.amax(dim=-1)
    if sink is not None:
        m = torch.maximum(m, sink)
    return m.masked_fill(m == float("-inf"), 0.0)


def kv_compress(kv: Tensor, gate: Tensor | None, ape: Tensor | None, ratio: int, overlap: bool,
                prev_kv: Tensor | None = None, prev_gate: Tensor | None = None) -> Tensor:
    """``out[B, S/ratio, d]`` float32: per-channel gated softmax pooling of every block of ``ratio`` tokens.

    ``overlap=False``: one softmax over the block's ``ratio`` tokens (C = d).
    ``overlap=True`` (C = 2d): the softmax of entry j runs over ``2*ratio`` tokens, the first-half
    channels of block j-1 (``prev_kv``/``prev_gate`` for j = 0, else logit -inf and value 0) and the
    second-half channels of block j; ``ape`` (None: no bias) is added to the gate by position in block.
    ``gate=None`` (ratio 1): the entries are ``kv`` itself, widened to float32.
    Vectorised over all blocks at once (the previous blocks are the own blocks shifted by one).
    """
    b, s, ch = kv.shape
    nb = s // ratio
    d = ch // 2 if overlap else ch
    out = new_output((b, nb, d), torch.float32, kv.device)
    if nb == 0 or b == 0 or d == 0:
        return out
    if gate is None:   # ratio 1 without a gate: nothing to pool
        out.copy_(kv)
        return out
    apef = None if ape is None else ape.float()
    kvb = kv.float().reshape(b, nb, ratio, ch)
    logit = gate.float().reshape(b, nb, ratio, ch)                      # [B, nb, ratio, C]
    if apef is not None:
        logit = logit + apef
    if not overlap:
        out.copy_(_pool(logit, kvb))
        return out
    if prev_kv is not None:
        first_l = prev_gate.float()[:, :, :d]
        if apef is not None:
            first_l = first_l + apef[:, :d]
        first_l = first_l.unsqueeze(1)                                  # [B, 1, ratio, d]
        first_v = prev_kv.float()[:, :, :d].unsqueeze(1)
    else:
        first_l = torch.full((b, 1, ratio, d), float("-inf"), dtype=torch.float32, device=kv.device)
        first_v = torch.zeros((b, 1, ratio, d), dtype=torch.float32, device=kv.device)
    prev_l = torch.cat([first_l, logit[:, :-1, :, :d]], dim=1)          # block j-1, first half
    prev_v = torch.cat([first_v, kvb[:, :-1, :, :d]], dim=1)
    logits = torch.cat([prev_l, logit[:, :, :, d:]], dim=2)             # [B, nb, 2*ratio, d]
    values = torch.cat([prev_v, kvb[:, :, :, d:]], dim=2)
    out.copy_(_pool(logits, values))
    return out


def gather_v41(kv: Tensor, kv_global: Tensor | None, ic: Tensor) -> Tensor:
    """Decoded float32 rows [*ic.shape, D] of the V4.1 packed cache for indices ``ic`` (int64, -1 allowed):
    ``ic`` in [0, N) from the FP8 window rows, [N, N + M) from the FP4 global rows; only the selected rows
    are read and decoded (no whole-cache dequantisation). A -1 entry's stand-in row is zeros."""
    b, n, w = kv.shape
    d = w * 32 // 33
    m = 0 if kv_global is None else kv_global.shape[1]
    base = (torch.arange(b, device=ic.device) * n).view(b, *([1] * (ic.dim() - 1)))
    rows = torch.zeros(ic.shape + (d,), dtype=torch.float32, device=kv.device)
    if n:
        win = (ic >= 0) & (ic < n)
        sel = kv.reshape(b * n, w).index_select(0, (ic.clamp(0, n - 1) + base).reshape(-1))
        rows = torch.where(win[..., None], unpack_kv_fp8(sel).view(rows.shape), rows)
    if m:
        glob = ic >= n
        gb = (torch.arange(b, device=ic.device) * m).view(base.shape)
        sel = kv_global.reshape(b * m, -1).index_select(0, ((ic - n).clamp(0, m - 1) + gb).reshape(-1))
        rows = torch.where(glob[..., None], unpack_kv_fp4(sel).view(rows.shape), rows)
    return rows


def sparse_attention(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor | None, scale: float,
                     return_lse: bool = False, p_dtype: torch.dtype | None = None,
                     kv_format: str | None = None, kv_global: Tensor | None = None):
    """``o[B, S, H, D]`` in q's dtype: one softmax per (b, s, h) over the selected K=V rows plus the sink.

    Rows ``kv[b, idx]`` are gathered with the indices clamped into range (``index_select`` on the
    flattened kv); -1 entries are masked to -inf and their stand-in rows zeroed. As the reference: ``m = max(logits ++ [sink])``,
    ``p = exp(logit - m)``, ``den = sum p + exp(sink - m)``, ``o = p @ rows / den``, ``lse = m + log(den)``
    (float32), so a +inf logit gives NaN (``exp(inf - inf)``) in o and lse, not +-inf. A row with no valid
    index gets ``p = 0`` and so ``o = 0``, and ``lse = sink[h]`` (``-inf`` without a sink).
    With ``return_lse`` also returns ``lse[B, S, H]`` float32. A 16-bit effective ``p_dtype`` (None = kv's
    dtype) rounds the numerator's P, taken against the largest logit, before ``P @ rows``.
    ``kv_format="v41"``: the rows are gathered from the packed FP8 window / FP4 global caches and decoded
    per chunk (:func:`gather_v41`); ``p_dtype=None`` is then q's dtype.
    """
    v41 = kv_format == "v41"
    b, s, h, d = q.shape
    n, k = kv.shape[1] + (kv_global.shape[1] if v41 and kv_global is not None else 0), idx.shape[2]
    dev = q.device
    o = new_output((b, s, h, d), q.dtype, dev)
    lse_out = new_output((b, s, h), torch.float32, dev) if return_lse else None
    sink_f = None if sink is None else sink.float()
    if n == 0 or k == 0 or b * s * h == 0:
        # Nothing can be selected (with n == 0 every valid idx is -1): zeros, lse = sink or -inf.
        o.zero_()
        if lse_out is not None:
            lse_out.fill_(float("-inf"))
            if sink_f is not None:
                lse_out.copy_(sink_f.expand(b, s, h))
        return (o, lse_out) if return_lse else o

    pd = (q.dtype if v41 else kv.dtype) if p_dtype is None else p_dtype
    rounded = pd in (torch.bfloat16, torch.float16)
    qf = q.float()
    flat = None if v41 else kv.float().reshape(b * n, d)
    base = (torch.arange(b, device=dev) * n).view(b, 1, 1)
    chunk = max(1, CHUNK_ELEMS // max(1, b * k * max(d, h)))
    for s0 in range(0, s, chunk):
        s1 = min(s, s0 + chunk)
        c = s1 - s0
        ic = idx[:, s0:s1].long()                                        # [B, c, K]
        valid = ic >= 0
        if v41:
            rows = gather_v41(kv, kv_global, ic)
        else:
            rows = flat.index_select(0, (ic.clamp(0, n - 1) + base).reshape(-1)).view(b, c, k, d)
        rows.masked_fill_(~valid[..., None], 0.0)   # a skipped entry's stand-in row: p = 0 must not meet Inf / NaN
        logits = torch.matmul(qf[:, s0:s1], rows.transpose(-1, -2)).mul_(scale)   # [B, c, H, K]
        logits.masked_fill_(~valid[:, :, None, :], float("-inf"))
        m = _row_max(logits, sink_f)                                      # [B, c, H]
        p = torch.exp(logits - m[..., None])                              # 0 where masked
        den = p.sum(dim=-1)
        if sink_f is not None:
            den = den + torch.exp(sink_f - m)
        if rounded:   # round(exp(logit - max logit)), re-based onto the shift m
            ml = logits.amax(dim=-1)
            ml = torch.where(ml == float("-inf"), m, ml)
            p = round_float(torch.exp(logits - ml[..., None]), pd) * torch.exp(ml - m)[..., None]
        # den = 0 only where every p is 0 (no valid index, no sink): o = 0 there, not 0 / 0
        o[:, s0:s1].copy_(torch.matmul(p, rows) / den.masked_fill(den == 0, 1.0)[..., None])
        if lse_out is not None:
            lse_out[:, s0:s1].copy_(m + torch.log(den))
    return (o, lse_out) if return_lse else o
