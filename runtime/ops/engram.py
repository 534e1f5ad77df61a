"""Engram family (DeepSeek-V4.1): engram_hash, engram_lookup (docs: spec deepseek-v41.md item f).

The Engram of a layer looks up ``(N-1) * H`` rows per token (V4.1-Flash: 3 n-gram sizes x 8 heads = 24) of a
huge FP8 table, at row ids hashed from the n-grams of compressed token ids ending at that token. The
deterministic hash inputs (multipliers, primes, offsets) and the window builder are in
:mod:`dsv4rt.engram_tables`; the gate that mixes the rows into the residual stream is model code.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from . import _check as c
from ..spec import OutputSpec, declare_spec

FAMILY = "engram"
I64 = (torch.int64,)
LOOKUP_IDS = (torch.int64, torch.int32)
E4M3_BYTES = (torch.float8_e4m3fn, torch.uint8)
LOOKUP_OUT = (torch.bfloat16, torch.float32)
INT64_MAX = 2**63 - 1


def engram_hash(window: Tensor, multipliers: Tensor, primes: Tensor, offsets: Tensor, pad_id: int) -> Tensor:
    """rows[T, (N-1)*H] int64: the n-gram hash of one Engram layer (official engram.py, NgramHashState.forward).

    - ``window``: [T, N] int64, ``window[t, k]`` = the compressed id of the token k positions before token t
      (k = 0 is token t itself; N = engram_max_ngram_size >= 2, 4 in V4.1), or -1 (DEAD) for a slot before
      the sequence start or holding an image-span token (:func:`dsv4rt.engram_tables.ngram_windows`).
    - Look-back stops at the first DEAD slot: ``tok[t, k] = pad_id`` where any of ``window[t, 0..k]`` is -1,
      else ``window[t, k]`` (so a DEAD token itself hashes as all pad). ``pad_id`` >= 0 is the compressed id
      of the pad token (``token_map[engram_pad_id]``).
    - ``multipliers`` [N] int64 > 0, ``primes`` [N-1, H] int64 >= 1, ``offsets`` [(N-1)*H] int64 >= 0
      (:func:`dsv4rt.engram_tables.engram_tables` builds the released ones).
    - ``h_0 = tok_0 * m_0``, ``h_n = h_{n-1} XOR (tok_n * m_n)`` for n = 1..N-1 (the hash of the (n+1)-gram),
      ``rows[t, (n-1)*H + j] = h_n mod primes[n-1, j] + offsets[(n-1)*H + j]``: exact integer arithmetic.
    - Every product ``tok * m`` and every ``offset + prime - 1`` must fit int64 (the released multipliers
      keep ``id * m`` below 2^63 for every id below the compressed vocab); ``check_values`` refuses a call
      where they do not, and entries below -1.
    """


def engram_lookup(ids: Tensor, weight: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """out[T, n, D]: rows of an FP8 Engram table, dequantised (official model.py, ParallelEngramEmbedding).

    - ``ids``: [T, n] int64 (or int32) row ids in [0, rows) (``engram_hash``'s output; out of range is a
      ContractError).
    - ``weight``: [rows, D] float8_e4m3fn (or its uint8 bytes), ``scale``: [rows, D/32] float8_e8m0fnu (or
      uint8 bytes), D % 32 == 0. Tables may be huge and memory-mapped (e.g. ``torch.from_numpy`` of a
      ``numpy.memmap``): every variant reads only the requested rows, never the whole table.
    - ``out[t, i, d] = e4m3(weight[ids[t, i], d]) * 2^(scale[ids[t, i], d // 32] - 127)``, computed exactly
      and rounded once to ``out_dtype`` (bfloat16, as the reference model, or float32). NaN codes (E4M3
      0x7F / 0xFF, E8M0 255) give NaN; a product beyond the output range gives +-inf.
    """


def _check_hash(a: Mapping[str, Any]) -> None:
    op = "engram_hash"
    c.tensor(op, "window", a["window"], 2, I64)
    t, n = a["window"].shape
    if n < 2:
        raise c.ContractError(op, "window", "[T, N] with N >= 2 (bigrams and up)",
                              f"shape {tuple(a['window'].shape)}")
    c.tensor(op, "multipliers", a["multipliers"], 1, I64)
    c.shape(op, "multipliers", a["multipliers"], (n,), "[N] like window's last dim")
    c.tensor(op, "primes", a["primes"], 2, I64)
    if a["primes"].shape[0] != n - 1:
        raise c.ContractError(op, "primes", f"shape [N-1, H] with N - 1 = {n - 1}",
                              f"shape {tuple(a['primes'].shape)}")
    h = a["primes"].shape[1]
    c.tensor(op, "offsets", a["offsets"], 1, I64)
    c.shape(op, "offsets", a["offsets"], ((n - 1) * h,), "[(N-1)*H]")
    c.integer(op, "pad_id", a["pad_id"], lo=0, hi=INT64_MAX)


def _min_max(t: Tensor) -> tuple[int, int]:
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def _values_hash(a: Mapping[str, Any]) -> None:
    op = "engram_hash"
    m, p, off, win = a["multipliers"], a["primes"], a["offsets"], a["window"]
    if m.numel() and _min_max(m)[0] < 1:
        c.index_range(op, "multipliers", m, 1, INT64_MAX)
    if p.numel():
        if _min_max(p)[0] < 1:
            c.index_range(op, "primes", p, 1, INT64_MAX)
        if _min_max(off)[0] < 0:
            c.index_range(op, "offsets", off, 0, INT64_MAX)
        top = [int(o) + int(q) - 1 for o, q in zip(off.tolist(), p.reshape(-1).tolist())]
        if max(top) > INT64_MAX:
            raise c.ContractError(op, "offsets", "offsets + primes - 1 within int64", f"{max(top)}")
    if not win.numel():
        return
    if _min_max(win)[0] < -1:
        c.index_range(op, "window", win, -1, INT64_MAX)
    col_max = win.amax(dim=0).tolist()
    padded = (win == -1).cummax(dim=1).values.any(dim=0).tolist()   # column k holds pad_id somewhere
    for k, (mk, wk, pk) in enumerate(zip(m.tolist(), col_max, padded)):
        tok = max(wk, a["pad_id"]) if pk else wk
        if tok * mk > INT64_MAX:
            name = "pad_id" if pk and a["pad_id"] > wk else "window"
            raise c.ContractError(op, name, f"ids whose products with multipliers[{k}] = {mk} fit int64 "
                                  f"(ids <= {INT64_MAX // mk})", f"{tok} in column {k}")


def _out_hash(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    return (OutputSpec("rows", (a["window"].shape[0], a["offsets"].shape[0]), torch.int64),)


def _check_lookup(a: Mapping[str, Any]) -> None:
    op = "engram_lookup"
    c.tensor(op, "ids", a["ids"], 2, LOOKUP_IDS)
    c.tensor(op, "weight", a["weight"], 2, E4M3_BYTES)
    rows, d = a["weight"].shape
    if d % 32:
        raise c.ContractError(op, "weight", "[rows, D] with D a multiple of 32",
                              f"shape {tuple(a['weight'].shape)}")
    c.tensor(op, "scale", a["scale"], 2, c.E8M0)
    c.shape(op, "scale", a["scale"], (rows, d // 32), "[rows, D/32]")
    c.choice(op, "out_dtype", a["out_dtype"], LOOKUP_OUT)


def _values_lookup(a: Mapping[str, Any]) -> None:
    c.index_range("engram_lookup", "ids", a["ids"], 0, a["weight"].shape[0])


def _out_lookup(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    t, n = a["ids"].shape
    return (OutputSpec("out", (t, n, a["weight"].shape[1]), a["out_dtype"]),)


_REF = "dsv4rt.reference:"
_CASES = "dsv4rt.conformance.cases.engram:"
_TOL = "dsv4rt.conformance.tolerance:"
ENGRAM_HASH = declare_spec(engram_hash, family=FAMILY, check=_check_hash, outputs=_out_hash,
                           check_values=_values_hash, reference=_REF + "engram_hash", cases=_CASES + "engram_hash",
                           tolerance=_TOL + "hash_rows")
ENGRAM_LOOKUP = declare_spec(engram_lookup, family=FAMILY, check=_check_lookup, outputs=_out_lookup,
                             check_values=_values_lookup, reference=_REF + "engram_lookup",
                             cases=_CASES + "engram_lookup", tolerance=_TOL + "lookup")
SPECS = (ENGRAM_HASH, ENGRAM_LOOKUP)
