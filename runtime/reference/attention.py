"""Golden KV compression (spec 3.2 / 4.1) and sparse attention core (spec 3.5), float64."""

import torch

from ..kv_formats import unpack_kv_fp4, unpack_kv_fp8
from ._decode import F64, to_f64


def _pool(logits, values):
    """Per-channel softmax over the token axis (dim 1) of ``logits``, then the weighted sum of
    ``values``: ``sum_i softmax_i(logits[:, i, c]) * values[:, i, c]``. Tokens with logit -inf get
    weight 0 (their value is 0 too)."""
    return (torch.softmax(logits, dim=1) * values).sum(dim=1)


def kv_compress(kv, gate, ape, ratio, overlap, prev_kv=None, prev_gate=None):
    """Gated softmax pooling of ``ratio``-token blocks: ``out [B, S // ratio, d]`` float64.

    ``kv, gate [B, S, C]``, ``ape [ratio, C]``; block ``B_j`` = tokens ``ratio*j .. ratio*j+ratio-1``.
    All softmaxes run over the token axis, separately for every batch row and channel ``c``.

    ``overlap=False`` (spec 4.1, ratio 128; ``C = d``)::

        out[j, c] = sum_{i in B_j} softmax_i(gate[i, c] + ape[i - ratio*j, c]) * kv[i, c]

    ``prev_kv`` / ``prev_gate`` are ignored.

    ``overlap=True`` (spec 3.2, ratio 4; ``C = 2d``): one softmax over ``2*ratio`` tokens::

        logits = [gate[i, c]   + ape[i - ratio*(j-1), c]   for i in B_{j-1}]    # first half
              ++ [gate[i, d+c] + ape[i - ratio*j,     d+c] for i in B_j]        # second half
        vals   = [kv[i, c] for i in B_{j-1}] ++ [kv[i, d+c] for i in B_j]
        out[j, c] = sum(softmax(logits) * vals)

    For ``j = 0`` the previous block is ``prev_kv / prev_gate [B, ratio, C]`` when given (its
    first-half channels, ape added the same way: ``prev_gate[p, c] + ape[p, c]``); otherwise it is
    padding with logit ``-inf`` and value 0, so entry 0 pools its own block only.

    ``ape=None``: no position bias, i.e. ``ape`` = 0 (V4.1 CSA2: ratio 2, no overlap, no ape).
    ``gate=None`` (V4.1 ratio 1, ``ape=None``, no overlap): ``out = kv``, one token per entry.
    """
    kv = to_f64(kv)
    b, s, c = kv.shape
    if gate is None:
        return kv.clone()
    gate = to_f64(gate)
    ape = torch.zeros((ratio, c), dtype=F64) if ape is None else to_f64(ape)
    n_out = s // ratio
    d = c // 2 if overlap else c
    out = torch.empty((b, n_out, d), dtype=F64)
    for j in range(n_out):
        own = slice(ratio * j, ratio * (j + 1))
        if not overlap:
            logits = gate[:, own, :] + ape[None, :, :]
            out[:, j, :] = _pool(logits, kv[:, own, :])
            continue
        own_logits = gate[:, own, d:] + ape[None, :, d:]
        own_vals = kv[:, own, d:]
        if j > 0:
            prev = slice(ratio * (j - 1), ratio * j)
            prev_logits = gate[:, prev, :d] + ape[None, :, :d]
            prev_vals = kv[:, prev, :d]
        elif prev_kv is not None:
            prev_logits = to_f64(prev_gate)[:, :, :d] + ape[None, :, :d]
            prev_vals = to_f64(prev_kv)[:, :, :d]
        else:
            prev_logits = torch.full((b, ratio, d), float("-inf"), dtype=F64)
            prev_vals = torch.zeros((b, ratio, d), dtype=F64)
        logits = torch.cat([prev_logits, own_logits], dim=1)   # [B, 2*ratio, d]
        vals = torch.cat([prev_vals, own_vals], dim=1)
        out[:, j, :] = _pool(logits, vals)
    return out


def _round(x, dtype):
    """float64 values rounded once to ``dtype`` (bfloat16 / float16), back in float64."""
    return x.to(dtype).to(F64)


def sparse_attention(q, kv, idx, sink, scale, return_lse=False, p_dtype=None, kv_format=None, kv_global=None):
    """Sparse MQA attention core with an attention sink (spec 3.5): ``o [B, S, H, D]`` float64.

    For each (b, s, h), over the selected entries ``j in idx[b, s, :]`` with ``j >= 0`` (``-1`` is
    skipped; duplicates count as separate entries) and with K = V = ``kv[b, j, :]``::

        logit_j = scale * (q[b, s, h, :] . kv[b, j, :])
        den     = sum_j exp(logit_j) + exp(sink[h])        # no sink term when sink is None
        o       = sum_j exp(logit_j) * kv[b, j, :] / den
        lse     = log(den)

    computed stably in float64 (shifted by ``m = max(max_j logit_j, sink[h])``). A row with no valid
    index returns ``o = 0`` and ``lse = sink[h]`` (``-inf`` when sink is None). With
    ``return_lse=True`` returns ``(o, lse [B, S, H] float64)``.

    ``p_dtype`` (None = kv's dtype): when 16-bit, the numerator's probabilities are rounded to it, once,
    relative to the row's largest logit ``m_l`` (the sink excluded)::

        o = sum_j round(exp(logit_j - m_l)) * kv[b, j, :] / (sum_j exp(logit_j - m_l) + exp(sink[h] - m_l))

    ``kv_format="v41"``: ``kv`` holds packed FP8 window rows and ``kv_global`` (or None) packed FP4 global
    rows; both are decoded exactly (``unpack_kv_fp8`` / ``unpack_kv_fp4``) and concatenated, window first,
    so ``idx`` in [N, N + M) reads global row ``idx - N``; ``p_dtype=None`` then means q's dtype.
    """
    qd = to_f64(q)
    if kv_format == "v41":
        rows = [unpack_kv_fp8(kv)] + ([] if kv_global is None else [unpack_kv_fp4(kv_global)])
        kvd = torch.cat(rows, dim=1).to(F64)
    else:
        kvd = to_f64(kv)
    b, s, h, dim = qd.shape
    sink_d = None if sink is None else to_f64(sink)
    o = torch.zeros((b, s, h, dim), dtype=F64)
    lse = torch.full((b, s, h), float("-inf"), dtype=F64)
    idx64 = idx.to(torch.int64)
    pd = (q.dtype if kv_format == "v41" else kv.dtype) if p_dtype is None else p_dtype
    rounded = pd in (torch.bfloat16, torch.float16)
    for bi in range(b):
        for si in range(s):
            sel = idx64[bi, si]
            sel = sel[sel >= 0]
            if sel.numel() == 0:
                if sink_d is not None:
                    lse[bi, si] = sink_d
                continue
            keys = kvd[bi, sel]                              # [n, D], also the values
            logits = scale * (qd[bi, si] @ keys.T)           # [H, n]
            m = logits.max(dim=1).values                     # [H]
            if sink_d is not None:
                m = torch.maximum(m, sink_d)
            p = torch.exp(logits - m[:, None])
            den = p.sum(dim=1)
            if sink_d is not None:
                den = den + torch.exp(sink_d - m)
            if rounded:   # P relative to the largest logit, rounded; the same denominator re-based there
                ml = logits.max(dim=1).values
                o[bi, si] = (_round(torch.exp(logits - ml[:, None]), pd) @ keys) * torch.exp(ml - m)[:, None] \
                    / den[:, None]
            else:
                o[bi, si] = (p @ keys) / den[:, None]
            lse[bi, si] = m + torch.log(den)
    if return_lse:
        return o, lse
    return o


__all__ = ["kv_compress", "sparse_attention"]
