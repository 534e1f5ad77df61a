"""Conformance cases of indexer_topk."""
from __future__ import annotations

import torch

from ..case import Case, bad_cases, case_generator, randn

BF16, F32 = torch.bfloat16, torch.float32


def _causal(b: int, s: int, ratio: int = 4, start: int = 0) -> torch.Tensor:
    """visible[b, s] = (pos + 1) // ratio for pos = start + s: entries whose whole block has ended."""
    pos = torch.arange(start, start + s, dtype=torch.int32)
    return ((pos + 1) // ratio).expand(b, s).contiguous()


def _case(label: str, b: int, s: int, h: int, d: int, n: int, topk: int, visible=None, dtype=BF16,
          fp8_keys: bool = False, scores: bool = False, noncontig: tuple[str, ...] = (),
          score_dtype: torch.dtype | None = None, nan_keys: int = 0) -> Case:
    def make(gen: torch.Generator) -> dict:
        q = randn(gen, b, s, h, d, dtype=dtype)
        if fp8_keys:
            k = (randn(gen, b, n, d) * 8).clamp(-440, 440).to(torch.float8_e4m3fn)
            k_scale = torch.rand((b, n), generator=gen) * 0.1 + 0.01
        else:
            k, k_scale = randn(gen, b, n, d, dtype=dtype), None
        if nan_keys:   # keys scoring NaN (counted as -inf): still visible, they fill slots before -1
            bad = torch.randperm(n, generator=gen)[:nan_keys]
            if fp8_keys:
                k.view(torch.uint8)[:, bad, 0] = 0x7F    # the E4M3 NaN code
            else:
                k[:, bad, 0] = float("nan")
        weights = torch.randn((b, s, h), generator=gen)
        vis = visible(gen) if callable(visible) else _causal(b, s, start=4 * n - s)
        return {"q": q, "k": k, "weights": weights, "visible": vis, "topk": topk, "k_scale": k_scale,
                "return_scores": scores, "score_dtype": score_dtype}
    return Case("indexer_topk", label, make, noncontig=noncontig)


@case_generator
def indexer_topk() -> list[Case]:
    """Decode and prefill shapes, fewer visible keys than top-k, causal ratio-4 boundaries, FP8 keys, no keys
    at all, keys scoring NaN (visible: they must still fill slots)."""
    cases = [
        _case("decode-B2-H8-N256-top64", 2, 1, 8, 64, 256, 64),
        _case("prefill-B1-S64-H4-N16-top8-causal", 1, 64, 4, 32, 16, 8,
              visible=lambda g: _causal(1, 64)),
        _case("fewer-visible-than-topk", 2, 8, 4, 32, 40, 32,
              visible=lambda g: torch.randint(0, 33, (2, 8), generator=g, dtype=torch.int32)),
        _case("none-visible-rows", 1, 6, 4, 32, 20, 4,
              visible=lambda g: torch.tensor([[0, 0, 3, 4, 0, 20]], dtype=torch.int32)),
        _case("ratio-boundaries", 1, 17, 2, 32, 8, 3, visible=lambda g: _causal(1, 17, start=15)),
        _case("f32-scores", 2, 4, 8, 64, 128, 16, dtype=F32, scores=True),
        _case("fp8-keys", 2, 3, 8, 64, 200, 32, fp8_keys=True, scores=True),
        _case("topk-equals-N", 1, 2, 4, 32, 24, 24),
        _case("noncontiguous", 1, 4, 4, 32, 64, 8, noncontig=("q", "k", "weights")),
        _case("scores-fp32-bf16-inputs", 2, 2, 8, 64, 96, 16, scores=True, score_dtype=F32),
        _case("scores-bf16-fp32-inputs", 2, 2, 8, 64, 96, 16, dtype=F32, scores=True, score_dtype=BF16),
        _case("scores-bf16-fp8-keys", 1, 2, 8, 64, 80, 16, fp8_keys=True, scores=True, score_dtype=BF16),
        _case("no-keys-scores", 2, 3, 4, 32, 0, 4, scores=True,
              visible=lambda g: torch.zeros((2, 3), dtype=torch.int32)),
        _case("nan-keys-fill-slots", 2, 6, 4, 32, 24, 16, scores=True, nan_keys=10,
              visible=lambda g: torch.randint(8, 25, (2, 6), generator=g, dtype=torch.int32)),
        _case("nan-fp8-keys-fill-slots", 1, 4, 8, 64, 40, 32, fp8_keys=True, nan_keys=12,
              visible=lambda g: torch.randint(20, 41, (1, 4), generator=g, dtype=torch.int32)),
    ]

    def good(gen):
        return {"q": randn(gen, 1, 2, 4, 32, dtype=BF16), "k": randn(gen, 1, 16, 32, dtype=BF16),
                "weights": torch.randn((1, 2, 4), generator=gen), "visible": torch.tensor([[3, 16]], dtype=torch.int32),
                "topk": 4, "k_scale": None, "return_scores": False}

    def fp8_keys(a):
        return a["k"].to(torch.float8_e4m3fn)

    cases += bad_cases("indexer_topk", good, [
        ("q-rank", "q", {"q": lambda a: a["q"][0]}),
        ("k-dim", "k", {"k": lambda a: a["k"][..., :16]}),
        ("weights-dtype", "weights", {"weights": lambda a: a["weights"].to(BF16)}),
        ("visible-dtype", "visible", {"visible": lambda a: a["visible"].long()}),
        ("visible-beyond-N", "visible", {"visible": torch.tensor([[3, 17]], dtype=torch.int32)}),
        ("visible-negative", "visible", {"visible": torch.tensor([[-1, 2]], dtype=torch.int32)}),
        ("topk-zero", "topk", {"topk": 0}),
        ("topk-2^63", "topk", {"topk": 2**63}),
        ("topk-2^31", "topk", {"topk": 2**31}),
        ("topk-padding-beyond-cap", "topk", {"topk": 65537}),
        ("fp8-without-scale", "k_scale", {"k": fp8_keys}),
        ("score-dtype-unknown", "score_dtype", {"score_dtype": torch.int32}),
    ])
    return cases
