"""Conformance cases of kv_compress and sparse_attention."""
from __future__ import annotations

import torch

from ...kv_formats import pack_kv_fp4, pack_kv_fp8
from ..case import Case, bad_cases, case_generator, randn

BF16, F32 = torch.bfloat16, torch.float32


def _compress(label: str, b: int, s: int, d: int, ratio: int, overlap: bool, prev: bool = False, dtype=F32,
              gate_scale: float = 1.0, noncontig: tuple[str, ...] = (), ape: bool = True, gate: bool = True,
              kv_scale: float = 1.0, edit=None) -> Case:
    """One kv_compress call; ``ape=False`` / ``gate=False`` pass None (V4.1 CSA2 / ratio 1), ``edit(args,
    gen)`` changes the drawn arguments in place (e.g. -inf gates)."""
    c = 2 * d if overlap else d

    def make(gen: torch.Generator) -> dict:
        args = {"kv": randn(gen, b, s, c, dtype=dtype, scale=kv_scale),
                "gate": randn(gen, b, s, c, dtype=dtype, scale=gate_scale) if gate else None,
                "ape": randn(gen, ratio, c, scale=0.5) if ape else None, "ratio": ratio, "overlap": overlap,
                "prev_kv": None, "prev_gate": None}
        if prev:
            args["prev_kv"] = randn(gen, b, ratio, c, dtype=dtype, scale=kv_scale)
            args["prev_gate"] = randn(gen, b, ratio, c, dtype=dtype, scale=gate_scale)
        if edit is not None:
            edit(args, gen)
        return args
    return Case("kv_compress", label, make, noncontig=noncontig)


def _neg_inf_gates(args: dict, gen: torch.Generator) -> None:
    """About a third of the gate entries -inf: a pair with one -inf pools the other token alone, a pair
    with both -inf is an empty softmax (NaN in the reference and every variant)."""
    g = args["gate"]
    g[torch.rand(g.shape, generator=gen) < 0.35] = float("-inf")


def _v41_compress() -> list[Case]:
    """V4.1 CSA2 (ratio 2, no overlap, no ape, C = d) and ratio 1 (no gate: the identity)."""
    return [
        _compress("v41-r2-B2-S32-d64", 2, 32, 64, 2, False, ape=False),
        _compress("v41-r2-d512-S6", 1, 6, 512, 2, False, ape=False),
        _compress("v41-r2-decode-one-block", 3, 2, 512, 2, False, ape=False),
        _compress("v41-r2-bf16", 2, 18, 64, 2, False, ape=False, dtype=BF16),
        _compress("v41-r2-large-magnitudes", 1, 16, 48, 2, False, ape=False, gate_scale=60.0, kv_scale=3e4),
        _compress("v41-r2-small-magnitudes", 1, 16, 48, 2, False, ape=False, gate_scale=1e-6, kv_scale=1e-20),
        _compress("v41-r2-neg-inf-gates", 2, 24, 32, 2, False, ape=False, edit=_neg_inf_gates),
        _compress("v41-r2-noncontiguous", 2, 12, 32, 2, False, ape=False, noncontig=("kv", "gate")),
        _compress("v41-r2-empty-sequence", 2, 0, 32, 2, False, ape=False),
        _compress("v41-r1-no-gate", 2, 7, 512, 1, False, ape=False, gate=False),
        _compress("v41-r1-no-gate-bf16", 1, 9, 64, 1, False, ape=False, gate=False, dtype=BF16),
        _compress("v41-r1-no-gate-noncontiguous", 1, 5, 32, 1, False, ape=False, gate=False, noncontig=("kv",)),
        _compress("r1-with-gate", 1, 5, 32, 1, False, ape=False, gate_scale=5.0),
        _compress("r4-overlap-no-ape-prev", 2, 16, 32, 4, True, prev=True, ape=False),
    ]


@case_generator
def kv_compress() -> list[Case]:
    """Ratio 4 with overlap (first block padded or continued), ratio 128 without, large gates, views; V4.1
    ratio 2 without ape and ratio 1 without gate; bad inputs, the partial block (odd S) among them."""
    cases = [
        _compress("r4-overlap-B2-S32-d64", 2, 32, 64, 4, True),
        _compress("r4-overlap-prev", 2, 16, 32, 4, True, prev=True),
        _compress("r4-overlap-one-block", 1, 4, 64, 4, True),
        _compress("r4-overlap-bf16", 1, 24, 64, 4, True, dtype=BF16),
        _compress("r128-B1-S256-d64", 1, 256, 64, 128, False),
        _compress("r128-bf16", 2, 128, 32, 128, False, dtype=BF16),
        _compress("large-gates", 1, 16, 32, 4, True, gate_scale=40.0),
        _compress("empty-sequence", 2, 0, 32, 4, True),
        _compress("noncontiguous", 1, 16, 32, 4, True, prev=True, noncontig=("kv", "gate", "prev_kv")),
    ] + _v41_compress()

    def good(gen):
        return {"kv": randn(gen, 1, 8, 16), "gate": randn(gen, 1, 8, 16), "ape": randn(gen, 4, 16), "ratio": 4,
                "overlap": True, "prev_kv": None, "prev_gate": None}

    def good_r2(gen):
        return {"kv": randn(gen, 1, 6, 16), "gate": randn(gen, 1, 6, 16), "ape": None, "ratio": 2,
                "overlap": False, "prev_kv": None, "prev_gate": None}

    cases += bad_cases("kv_compress", good, [
        ("S-not-multiple", "kv", {"kv": lambda a: a["kv"][:, :6], "gate": lambda a: a["gate"][:, :6]}),
        ("gate-shape", "gate", {"gate": lambda a: a["gate"][:, :4]}),
        ("ape-shape", "ape", {"ape": lambda a: a["ape"][:2]}),
        ("ape-dtype", "ape", {"ape": lambda a: a["ape"].to(BF16)}),
        ("odd-channels-overlap", "kv", {"kv": lambda a: a["kv"][..., :15], "gate": lambda a: a["gate"][..., :15],
                                        "ape": lambda a: a["ape"][:, :15]}),
        ("prev-half-given", "prev_gate", {"prev_kv": torch.zeros(1, 4, 16)}),
        ("prev-without-overlap", "prev_kv", {"overlap": False, "kv": lambda a: a["kv"][..., :8],
                                             "gate": lambda a: a["gate"][..., :8], "ape": lambda a: a["ape"][:, :8],
                                             "prev_kv": torch.zeros(1, 4, 8), "prev_gate": torch.zeros(1, 4, 8)}),
        ("ratio-zero", "ratio", {"ratio": 0}),
    ])
    cases += bad_cases("kv_compress", good_r2, [
        ("v41-r2-odd-S", "kv", {"kv": lambda a: a["kv"][:, :5], "gate": lambda a: a["gate"][:, :5]}),
        ("v41-r2-no-gate", "gate", {"gate": None}),
        ("v41-r2-prev-state", "prev_kv", {"prev_kv": torch.zeros(1, 2, 16), "prev_gate": torch.zeros(1, 2, 16)}),
        ("v41-r2-ape-shape", "ape", {"ape": torch.zeros(4, 16)}),
        ("v41-r1-no-gate-with-ape", "ape", {"ratio": 1, "gate": None, "ape": torch.zeros(1, 16)}),
        ("v41-r1-no-gate-overlap", "overlap", {"ratio": 1, "gate": None, "overlap": True}),
        ("v41-r1-gate-dtype", "gate", {"ratio": 1, "gate": lambda a: a["gate"].to(torch.int32)}),
    ])
    return cases


def _window_plus_topk(gen: torch.Generator, b: int, s: int, n: int, k: int, pad: float) -> torch.Tensor:
    """Random indices in [0, n) with a fraction ``pad`` of -1, plus duplicates."""
    idx = torch.randint(0, n, (b, s, k), generator=gen, dtype=torch.int32)
    idx[torch.rand((b, s, k), generator=gen) < pad] = -1
    return idx


def _attn(label: str, b: int, s: int, h: int, d: int, n: int, k: int, dtype=BF16, sink: bool = True,
          pad: float = 0.2, lse: bool = False, idx_fn=None, qscale: float = 1.0,
          noncontig: tuple[str, ...] = (), p_dtype: torch.dtype | None = None) -> Case:
    def make(gen: torch.Generator) -> dict:
        idx = idx_fn(gen) if idx_fn else _window_plus_topk(gen, b, s, n, k, pad)
        return {"q": randn(gen, b, s, h, d, dtype=dtype, scale=qscale), "kv": randn(gen, b, n, d, dtype=dtype),
                "idx": idx, "sink": (torch.randn((h,), generator=gen) if sink else None),
                "scale": d ** -0.5, "return_lse": lse, "p_dtype": p_dtype}
    return Case("sparse_attention", label, make, noncontig=noncontig)


def _v41_rows(gen: torch.Generator, b: int, n: int, d: int, spread: float, pack) -> torch.Tensor:
    """Packed V4.1 rows of bf16 values whose row magnitudes span ``exp(+-3 spread)`` (scale extremes),
    with an all-zero group (the amax floors) and a lone outlier group in the first row."""
    mag = torch.exp(torch.randn((b, n, 1), generator=gen) * spread)
    x = torch.randn((b, n, d), generator=gen) * mag
    if n:
        x[:, 0, :32] = 0.0
        x[:, 0, 32:48] *= 1e3
    return pack(x.to(BF16))


def _attn41(label: str, b: int, s: int, h: int, d: int, n: int, m: int | None, k: int, dtype=BF16,
            sink: bool = True, pad: float = 0.2, lse: bool = False, spread: float = 1.0, qscale: float = 1.0,
            p_dtype: torch.dtype | None = None, noncontig: tuple[str, ...] = (), edit=None) -> Case:
    """V4.1 packed cache: ``n`` FP8 window rows and ``m`` FP4 global rows (None: kv_global=None), idx over
    both; ``edit(args, gen)`` changes the drawn arguments in place."""
    def make(gen: torch.Generator) -> dict:
        total = n + (m or 0)
        args = {"q": randn(gen, b, s, h, d, dtype=dtype, scale=qscale),
                "kv": _v41_rows(gen, b, n, d, spread, pack_kv_fp8),
                "idx": _window_plus_topk(gen, b, s, max(total, 1), k, pad if total else 1.0),
                "sink": torch.randn((h,), generator=gen) if sink else None, "scale": d ** -0.5,
                "return_lse": lse, "p_dtype": p_dtype, "kv_format": "v41",
                "kv_global": None if m is None else _v41_rows(gen, b, m, d, spread, pack_kv_fp4)}
        if edit is not None:
            edit(args, gen)
        return args
    return Case("sparse_attention", f"v41-{label}", make, noncontig=noncontig)


def _v41_window_then_topk(args: dict, gen: torch.Generator) -> None:
    """Prefill-like idx: query s sees window rows s-3..s (the chunk's own rows) then global picks."""
    b, s, k = args["idx"].shape
    n, m = args["kv"].shape[1], args["kv_global"].shape[1]
    pos = torch.arange(s)[:, None] - 3 + torch.arange(4)[None, :]
    win = torch.where(pos < 0, -1, pos).expand(b, s, 4)
    glob = torch.randint(n, n + m, (b, s, k - 4), generator=gen, dtype=torch.int32)
    glob[torch.rand(glob.shape, generator=gen) < 0.25] = -1
    args["idx"] = torch.cat([win.to(torch.int32), glob], dim=-1).contiguous()


def _v41_nan_scales(args: dict, gen: torch.Generator) -> None:
    """A NaN scale byte in window row 1 (UE8M0 255) and global row 2 (E4M3 0x7F): rows selecting them
    are NaN; rows selecting neither are not."""
    d, n, k = args["q"].shape[3], args["kv"].shape[1], args["idx"].shape[2]
    args["kv"][:, 1, d] = 255
    args["kv_global"][:, 2, d // 2] = 0x7F
    clean = [i for i in range(n + args["kv_global"].shape[1]) if i not in (1, n + 2)]
    args["idx"][:, 0] = torch.tensor(clean[:k], dtype=torch.int32)     # query 0 stays finite
    args["idx"][:, 1, 0] = n + 2                                          # query 1 reads the NaN group


def _v41_cases() -> list[Case]:
    return [
        _attn41("decode-B2-H16-D512-N128-M300-K160", 2, 1, 16, 512, 128, 300, 160, lse=True),
        _attn41("prefill-B1-S12-H8-D512-window-then-topk", 1, 12, 8, 512, 12, 40, 20,
                edit=_v41_window_then_topk),
        _attn41("no-global", 2, 3, 4, 64, 30, None, 24, lse=True),
        _attn41("global-only-N0", 1, 2, 4, 64, 0, 50, 16, lse=True),
        _attn41("no-sink", 1, 4, 4, 128, 20, 40, 24, sink=False),
        _attn41("all-padding", 1, 2, 4, 32, 8, 8, 6, pad=1.0, lse=True),
        _attn41("scale-extremes", 1, 4, 4, 64, 40, 60, 48, spread=4.0, qscale=0.05, lse=True),
        _attn41("f32-q", 1, 3, 4, 64, 20, 30, 24, dtype=F32, lse=True),
        _attn41("f16-q", 1, 3, 4, 64, 20, 30, 24, dtype=torch.float16),
        _attn41("p-fp32", 1, 3, 8, 64, 20, 30, 24, p_dtype=F32, lse=True),
        _attn41("nan-scale-bytes", 1, 4, 4, 64, 10, 12, 16, lse=True, edit=_v41_nan_scales),
        _attn41("noncontiguous", 1, 4, 4, 64, 20, 30, 16, noncontig=("q", "kv", "kv_global", "idx")),
    ]


def _v41_bad() -> list[Case]:
    def good(gen):
        return {"q": randn(gen, 1, 2, 4, 32, dtype=BF16), "kv": pack_kv_fp8(randn(gen, 1, 6, 32)),
                "idx": torch.tensor([[[0, 7, -1], [5, 9, 1]]], dtype=torch.int32),
                "sink": torch.zeros(4), "scale": 32 ** -0.5, "return_lse": False, "p_dtype": None,
                "kv_format": "v41", "kv_global": pack_kv_fp4(randn(gen, 1, 4, 32))}

    return bad_cases("sparse_attention", good, [
        ("v41-idx-beyond-global", "idx", {"idx": torch.tensor([[[0, 10, -1], [5, 9, 1]]], dtype=torch.int32)}),
        ("v41-kv-not-bytes", "kv", {"kv": lambda a: a["kv"].to(BF16)}),
        ("v41-kv-width", "kv", {"kv": lambda a: a["kv"][..., :32]}),
        ("v41-global-width", "kv_global", {"kv_global": lambda a: a["kv_global"][..., :16]}),
        ("v41-global-dtype", "kv_global", {"kv_global": lambda a: a["kv_global"].to(torch.int8)}),
        ("v41-global-batch", "kv_global", {"kv_global": lambda a: a["kv_global"].expand(2, -1, -1)}),
        ("v41-head-dim-16", "q", {"q": lambda a: a["q"][..., :16]}),
        ("v41-unknown-format", "kv_format", {"kv_format": "v42"}),
        ("v41-global-without-format", "kv_global", {"kv_format": None, "kv": lambda a: randn(
            torch.Generator().manual_seed(0), 1, 6, 32, dtype=BF16)}),
    ])


@case_generator
def sparse_attention() -> list[Case]:
    """Decode and prefill, with and without sink, -1 padding, empty rows, duplicates, lse, large logits;
    the V4.1 packed cache (FP8 window + FP4 global rows) with and without global rows, scale extremes,
    NaN scale bytes; bad inputs."""
    def some_empty(gen):
        idx = _window_plus_topk(gen, 2, 5, 40, 24, 0.3)
        idx[0, 1] = -1
        idx[1, 4] = -1
        return idx

    cases = [
        _attn("decode-B2-H16-D128-N300-K96", 2, 1, 16, 128, 300, 96),
        _attn("prefill-B1-S16-H8-D64-N80-K40", 1, 16, 8, 64, 80, 40),
        _attn("no-sink", 1, 4, 4, 64, 50, 20, sink=False),
        _attn("empty-rows-sink", 2, 5, 4, 64, 40, 24, idx_fn=some_empty, lse=True),
        _attn("empty-rows-no-sink", 2, 5, 4, 64, 40, 24, idx_fn=some_empty, sink=False, lse=True),
        _attn("all-padding", 1, 3, 4, 32, 10, 8, pad=1.0, lse=True),
        _attn("f32-lse", 1, 6, 4, 64, 60, 32, dtype=F32, lse=True),
        _attn("large-logits", 1, 4, 4, 64, 30, 16, qscale=30.0, lse=True),
        _attn("head-dim-512", 1, 2, 4, 512, 64, 32),
        _attn("noncontiguous", 1, 4, 4, 64, 40, 16, noncontig=("q", "kv", "idx")),
        _attn("p-fp32-bf16-inputs", 1, 4, 8, 64, 60, 32, lse=True, p_dtype=F32),
        _attn("p-bf16-fp32-inputs", 1, 4, 8, 64, 60, 32, dtype=F32, lse=True, p_dtype=BF16),
        _attn("p-fp16-fp32-inputs", 1, 3, 4, 64, 40, 24, dtype=F32, p_dtype=torch.float16),
    ]

    def good(gen):
        return {"q": randn(gen, 1, 2, 4, 32, dtype=BF16), "kv": randn(gen, 1, 10, 32, dtype=BF16),
                "idx": torch.tensor([[[0, 3, -1], [9, 9, 1]]], dtype=torch.int32),
                "sink": torch.zeros(4), "scale": 32 ** -0.5, "return_lse": False}

    cases += bad_cases("sparse_attention", good, [
        ("idx-out-of-range", "idx", {"idx": torch.tensor([[[0, 10, -1], [9, 9, 1]]], dtype=torch.int32)}),
        ("idx-below-minus-one", "idx", {"idx": torch.tensor([[[0, -2, -1], [9, 9, 1]]], dtype=torch.int32)}),
        ("idx-dtype", "idx", {"idx": lambda a: a["idx"].long()}),
        ("kv-head-dim", "kv", {"kv": lambda a: a["kv"][..., :16]}),
        ("sink-shape", "sink", {"sink": torch.zeros(3)}),
        ("sink-nan", "sink", {"sink": torch.tensor([0.0, float("nan"), 0.0, 0.0])}),
        ("scale-negative", "scale", {"scale": -1.0}),
        ("q-dtype", "q", {"q": lambda a: a["q"].to(torch.int8)}),
        ("p-dtype-unknown", "p_dtype", {"p_dtype": torch.float64}),
        ("p-dtype-string", "p_dtype", {"p_dtype": "bf16"}),
    ])
    return cases + _v41_cases() + _v41_bad()
