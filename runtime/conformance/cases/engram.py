"""Conformance cases of engram_hash and engram_lookup (DeepSeek-V4.1 Engram)."""
from __future__ import annotations

import torch

from ...engram_tables import INT64_MAX, engram_tables
from ..case import Case, bad_cases, case_generator, rand_e4m3, rand_e8m0

I64 = torch.int64
BF16, F32 = torch.bfloat16, torch.float32
VOCAB = 99092                    # engram_compressed_vocab_size of V4.1-Flash
_RELEASED = {}


def _released(layer: int):
    """The released tables of Engram layer 1 or 14 (built once: the prime search takes a moment)."""
    if not _RELEASED:
        for t in engram_tables([1, 14], 4, 8, 16_000_000, VOCAB):
            _RELEASED[t.layer_id] = t
    return _RELEASED[layer]


def _window(gen: torch.Generator, t: int, n: int, vocab: int, dead: float, start: bool) -> torch.Tensor:
    """[t, n] ids in [0, vocab); with ``dead`` a fraction of tokens are image tokens (-1), and with ``start``
    the first rows are the sequence start (slots before it are -1), as ngram_windows builds them."""
    hist = torch.randint(0, vocab, (t + n - 1,), generator=gen, dtype=I64)
    if dead:
        hist[torch.rand(t + n - 1, generator=gen) < dead] = -1
    if start:
        hist[: n - 1] = -1
    pos = torch.arange(t)[:, None] + (n - 1) - torch.arange(n)[None, :]
    return hist[pos]


def _hash(label: str, t: int, layer: int = 1, dead: float = 0.0, start: bool = False, vocab: int = VOCAB,
          small: tuple[int, int, int] | None = None, noncontig: tuple[str, ...] = ()) -> Case:
    """Released tables of ``layer``, or with ``small = (N, H, first prime)`` tiny primes (many collisions)
    and the released multipliers' construction for that N."""
    def make(gen: torch.Generator) -> dict:
        if small is None:
            tab = _released(layer)
            mult, primes, offsets = tab.multipliers, tab.primes, tab.offsets
        else:
            n, h, p0 = small
            tab = engram_tables([layer], n, h, p0, vocab)[0]
            mult, primes, offsets = tab.multipliers, tab.primes, tab.offsets
        n = mult.shape[0]
        pad = int(torch.randint(0, vocab, (1,), generator=gen))
        return {"window": _window(gen, t, n, vocab, dead, start), "multipliers": mult, "primes": primes,
                "offsets": offsets, "pad_id": pad}
    return Case("engram_hash", label, make, noncontig=noncontig)


def _extreme_products(gen: torch.Generator) -> dict:
    """Ids at the largest value whose products with the multipliers fit int64: the hash runs at 2^62+."""
    mult = torch.tensor([(INT64_MAX // 7) | 1, (INT64_MAX // 9) | 1, 3], dtype=I64)
    top = INT64_MAX // int(mult.max())
    window = torch.tensor([[top, top, top], [top, 0, top], [0, top, -1], [top - 1, top, top]], dtype=I64)
    return {"window": window, "multipliers": mult, "primes": torch.tensor([[2**61 - 1, 97], [2**31 - 1, 7]], dtype=I64),
            "offsets": torch.tensor([0, 2**61 - 1, 2**61 + 96, 2**61 + 2**31 + 95], dtype=I64), "pad_id": 6}


@case_generator
def engram_hash() -> list[Case]:
    """Released tables of both V4.1 Engram layers; sequence starts and image tokens (DEAD slots -> pad);
    tiny primes (collisions everywhere); bigrams only; ids at the int64 product limit; one and no tokens."""
    cases = [
        _hash("V41-layer1-T64", 64, 1),
        _hash("V41-layer14-T64", 64, 14),
        _hash("sequence-start", 16, 1, start=True),
        _hash("image-tokens-dead-slots", 64, 14, dead=0.3),
        _hash("mostly-dead", 32, 1, dead=0.8, start=True),
        _hash("collisions-tiny-primes", 64, 1, small=(4, 3, 2), vocab=50),
        _hash("bigrams-only", 16, 1, small=(2, 5, 1000)),
        _hash("T1", 1, 14, start=True),
        _hash("no-tokens", 0, 1),
        _hash("noncontiguous", 12, 1, dead=0.2, noncontig=("window", "primes")),
        Case("engram_hash", "int64-product-limit", _extreme_products),
    ]
    good = lambda gen: {"window": torch.tensor([[5, 4, 3], [6, 5, -1]], dtype=I64),  # noqa: E731
                        "multipliers": torch.tensor([3, 5, 7], dtype=I64),
                        "primes": torch.tensor([[11, 13], [17, 19]], dtype=I64),
                        "offsets": torch.tensor([0, 11, 24, 41], dtype=I64), "pad_id": 2}
    cases += bad_cases("engram_hash", good, [
        ("window-dtype", "window", {"window": lambda a: a["window"].int()}),
        ("window-below-dead", "window", {"window": torch.tensor([[5, -2, 3], [6, 5, 4]], dtype=I64)}),
        ("window-N1", "window", {"window": torch.tensor([[5], [6]], dtype=I64)}),
        ("product-overflow", "window", {"window": torch.tensor([[5, 4, 2**62], [6, 5, 4]], dtype=I64)}),
        ("pad-overflow", "pad_id", {"pad_id": 2**62}),
        ("pad-negative", "pad_id", {"pad_id": -1}),
        ("multipliers-shape", "multipliers", {"multipliers": torch.tensor([3, 5], dtype=I64)}),
        ("multipliers-zero", "multipliers", {"multipliers": torch.tensor([3, 0, 7], dtype=I64)}),
        ("primes-shape", "primes", {"primes": torch.tensor([[11, 13]], dtype=I64)}),
        ("primes-zero", "primes", {"primes": torch.tensor([[11, 0], [17, 19]], dtype=I64)}),
        ("offsets-shape", "offsets", {"offsets": torch.tensor([0, 11, 24], dtype=I64)}),
        ("offsets-negative", "offsets", {"offsets": torch.tensor([0, -11, 24, 41], dtype=I64)}),
        ("offsets-overflow", "offsets", {"offsets": torch.tensor([0, 11, 24, INT64_MAX - 5], dtype=I64)}),
    ])
    return cases


def _table(gen: torch.Generator, rows: int, d: int, nan: bool, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = rand_e4m3(gen, (rows, d))
    s = rand_e8m0(gen, (rows, d // 32), lo, hi)
    if nan:   # E4M3 NaN codes in some rows, E8M0 NaN (255) scales in others
        wb, sb = w.view(torch.uint8), s.view(torch.uint8)
        wb[::7, 3] = 0x7F
        wb[1::7, 40 % d] = 0xFF
        sb[2::5, 0] = 255
    return w, s


def _lookup(label: str, t: int, n: int, rows: int, d: int = 256, out=BF16, nan: bool = False, lo: int = 100,
            hi: int = 140, ids: str = "random", id_dtype=I64, raw_bytes: bool = False,
            noncontig: tuple[str, ...] = ()) -> Case:
    def make(gen: torch.Generator) -> dict:
        w, s = _table(gen, rows, d, nan, lo, hi)
        if ids == "boundary":   # first and last row, and their neighbours, repeated
            pick = torch.tensor([0, rows - 1, 1, rows - 2], dtype=I64).repeat((t * n + 3) // 4)[: t * n]
        elif ids == "repeated":   # a few rows many times (hash collisions)
            pick = torch.randint(0, 3, (t * n,), generator=gen, dtype=I64)
        else:
            pick = torch.randint(0, rows, (t * n,), generator=gen, dtype=I64)
        if raw_bytes:
            w, s = w.view(torch.uint8), s.view(torch.uint8)
        return {"ids": pick.reshape(t, n).to(id_dtype), "weight": w, "scale": s, "out_dtype": out}
    return Case("engram_lookup", label, make, noncontig=noncontig)


@case_generator
def engram_lookup() -> list[Case]:
    """The V4.1 row shape (24 rows of 256 per token), float32 output, first/last rows, repeated rows, NaN
    codes and NaN scales, scale bytes at both ends (subnormal and infinite products), raw uint8 tables,
    int32 ids, one and no tokens, non-contiguous ids and table."""
    cases = [
        _lookup("V41-T16-n24-D256-bf16", 16, 24, 500),
        _lookup("f32-out", 8, 24, 300, out=F32),
        _lookup("row-boundary", 4, 24, 97, ids="boundary"),
        _lookup("repeated-rows", 8, 24, 50, ids="repeated"),
        _lookup("nan-codes-and-scales", 8, 24, 64, nan=True),
        _lookup("nan-codes-and-scales-f32", 4, 24, 64, nan=True, out=F32),
        _lookup("scale-bytes-0-to-2", 4, 8, 40, lo=0, hi=2),
        _lookup("scale-bytes-0-to-2-f32", 4, 8, 40, lo=0, hi=2, out=F32),
        _lookup("scale-bytes-252-to-254", 4, 8, 40, lo=252, hi=254),
        _lookup("uint8-tables-int32-ids", 6, 24, 100, raw_bytes=True, id_dtype=torch.int32),
        _lookup("D32-T1-n1", 1, 1, 5, d=32),
        _lookup("no-tokens", 0, 24, 10),
        _lookup("noncontiguous", 5, 6, 30, d=64, noncontig=("ids", "weight", "scale")),
    ]

    def good(gen):
        w, s = _table(gen, 10, 64, False, 120, 130)
        return {"ids": torch.tensor([[0, 9], [3, 3]], dtype=I64), "weight": w, "scale": s, "out_dtype": BF16}

    cases += bad_cases("engram_lookup", good, [
        ("ids-out-of-range", "ids", {"ids": torch.tensor([[0, 10], [3, 3]], dtype=I64)}),
        ("ids-negative", "ids", {"ids": torch.tensor([[0, -1], [3, 3]], dtype=I64)}),
        ("ids-dtype", "ids", {"ids": torch.tensor([[0.0, 1.0]])}),
        ("ids-rank", "ids", {"ids": torch.tensor([0, 1], dtype=I64)}),
        ("weight-dtype", "weight", {"weight": lambda a: a["weight"].float()}),
        ("weight-D-not-32", "weight", {"weight": lambda a: a["weight"][:, :48], "scale": lambda a: a["scale"][:, :1]}),
        ("scale-shape", "scale", {"scale": lambda a: a["scale"][:, :1]}),
        ("scale-rows", "scale", {"scale": lambda a: a["scale"][:9]}),
        ("scale-dtype", "scale", {"scale": lambda a: a["scale"].float()}),
        ("out-dtype", "out_dtype", {"out_dtype": torch.float16}),
    ])
    return cases
