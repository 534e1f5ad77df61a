"""Golden Engram ops of DeepSeek-V4.1 (official inference/engram.py and model.py ParallelEngramEmbedding).

``engram_hash`` in Python integers (no int64 wrap-around can hide in it); ``engram_lookup`` in float64.
"""

import torch

from ._decode import as_bytes, decode_e4m3, decode_e8m0


def engram_hash(window, multipliers, primes, offsets, pad_id):
    """Row ids ``[T, (N-1)*H]`` int64 of the n-grams ending at each token.

    Per token t: walk ``k = 0..N-1``; once ``window[t, k] == -1`` (DEAD) this and every later slot is
    ``pad_id``; ``h = tok_0 * m_0``, then ``h = h XOR tok_k * m_k`` and, for each head j,
    ``rows[t, (k-1)*H + j] = h mod primes[k-1, j] + offsets[(k-1)*H + j]``.
    """
    win = window.tolist()
    mult = [int(m) for m in multipliers.tolist()]
    prm = primes.tolist()
    off = offsets.tolist()
    heads = primes.shape[1]
    out = []
    for row in win:
        dead = False
        h = 0
        ids = []
        for k, tok in enumerate(row):
            dead = dead or tok == -1
            term = (pad_id if dead else tok) * mult[k]
            h = term if k == 0 else h ^ term
            if k:
                ids += [h % prm[k - 1][j] + off[(k - 1) * heads + j] for j in range(heads)]
        out.append(ids)
    return torch.tensor(out, dtype=torch.int64).reshape(len(win), len(off))


def engram_lookup(ids, weight, scale, out_dtype=torch.bfloat16):
    """``out [T, n, D]`` float64: ``e4m3(weight[ids]) * 2^(scale[ids, d // 32] - 127)``, exact (NaN codes
    give NaN). Only the rows named by ``ids`` are read. ``out_dtype`` is what backends round to; the
    reference returns the exact value."""
    rows = ids.to(torch.int64)
    w = decode_e4m3(as_bytes(weight)[rows])          # [T, n, D]
    s = decode_e8m0(as_bytes(scale)[rows])           # [T, n, D/32]
    return w * s.repeat_interleave(32, dim=-1)
