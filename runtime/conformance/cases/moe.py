"""Conformance cases of moe_route, moe_dispatch and moe_combine."""
from __future__ import annotations

import torch

from ..case import Case, bad_cases, case_generator, randn

BF16, F32 = torch.bfloat16, torch.float32


def _route(label: str, t: int, e: int, k: int, scale: float = 1.5, bias: bool = True, hashed: bool = False,
           logit_scale: float = 2.0, noncontig: tuple[str, ...] = ()) -> Case:
    def make(gen: torch.Generator) -> dict:
        hash_ids = None
        if hashed:
            hash_ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(torch.int32)
        return {"logits": randn(gen, t, e, scale=logit_scale),
                "bias": (randn(gen, e, scale=0.5) if bias and not hashed else None),
                "topk": k, "route_scale": scale, "score_func": "sqrtsoftplus", "hash_ids": hash_ids}
    return Case("moe_route", label, make, noncontig=noncontig)


def _route41(label: str, t: int, e: int, k: int, alt: str = "mixed", logit_shift: float = 0.0,
             logit_scale: float = 2.0, eps: float = 1e-20, noncontig: tuple[str, ...] = ()) -> Case:
    """V4.1's Gate: per-token bias (``bias_alt`` where ``use_alt``: "mixed", "all" or "none") and
    ``weight_eps``. The two biases differ by about the spread of s, so the selector changes the choices."""
    def make(gen: torch.Generator) -> dict:
        if alt == "mixed":
            use = torch.rand(t, generator=gen) < 0.5
        else:
            use = torch.full((t,), alt == "all")
        return {"logits": randn(gen, t, e, scale=logit_scale) + logit_shift, "bias": randn(gen, e, scale=0.5),
                "topk": k, "route_scale": 1.5, "score_func": "sqrtsoftplus", "hash_ids": None,
                "bias_alt": randn(gen, e, scale=0.5), "use_alt": use, "weight_eps": eps}
    return Case("moe_route", label, make, noncontig=noncontig)


@case_generator
def moe_route() -> list[Case]:
    """Score-routed with and without bias, hash-routed, softplus linear region, one token; V4.1's per-token
    bias selector (mixed, all, none) and ``weight_eps`` with subnormal and underflowing scores."""
    cases = [
        _route("T64-E256-top6-bias", 64, 256, 6),
        _route("T1-E64-top6", 1, 64, 6),
        _route("no-bias", 32, 64, 4, bias=False),
        _route("hash", 16, 64, 6, scale=2.5, hashed=True),
        _route("softplus-linear-region", 8, 32, 3, logit_scale=30.0),
        _route("topk-equals-E", 4, 8, 8),
        _route("noncontiguous", 8, 32, 4, noncontig=("logits", "bias")),
        # V4.1 (Gate.forward): per-token bias selector and s / (sum s + 1e-20)
        _route41("v41-E384-top6-mixed-selector", 64, 384, 6),
        _route41("v41-all-alt", 16, 384, 6, alt="all"),
        _route41("v41-no-alt", 16, 384, 6, alt="none"),
        _route41("v41-dspark-E128-top3", 9, 128, 3),
        # s ~ 1e-20 (softplus ~ 1e-40, a float32 subnormal): the 1e-20 shrinks the weights by about 8%
        _route41("v41-eps-subnormal-scores", 8, 64, 6, logit_shift=-91.0, logit_scale=0.5),
        # s underflows to 0 in float32: weights ~ s / 1e-20 ~ 1e-24 (the reference's), never 0/0
        _route41("v41-eps-underflowing-scores", 8, 64, 6, logit_shift=-200.0, logit_scale=3.0),
        _route41("v41-eps-only", 8, 64, 6, alt="none", eps=1e-3),
        _route41("v41-noncontiguous", 8, 32, 4, noncontig=("logits", "bias", "bias_alt", "use_alt")),
    ]

    def good(gen):
        return {"logits": randn(gen, 4, 16), "bias": torch.zeros(16), "topk": 2, "route_scale": 1.5,
                "score_func": "sqrtsoftplus", "hash_ids": None}

    cases += bad_cases("moe_route", good, [
        ("logits-dtype", "logits", {"logits": lambda a: a["logits"].to(BF16)}),
        ("topk-too-large", "topk", {"topk": 17}),
        ("score-func", "score_func", {"score_func": "softmax"}),
        ("bias-shape", "bias", {"bias": torch.zeros(15)}),
        ("hash-with-bias", "bias", {"hash_ids": torch.zeros(4, 2, dtype=torch.int32)}),
        ("hash-out-of-range", "hash_ids", {"bias": None, "hash_ids": torch.full((4, 2), 16, dtype=torch.int32)}),
        ("logits-nan", "logits", {"logits": lambda a: a["logits"].index_fill(1, torch.tensor([3]), float("nan"))}),
        ("route-scale", "route_scale", {"route_scale": 0.0}),
        ("alt-without-selector", "use_alt", {"bias_alt": torch.zeros(16)}),
        ("selector-without-alt", "bias_alt", {"use_alt": torch.ones(4, dtype=torch.bool)}),
        ("alt-without-bias", "bias", {"bias": None, "bias_alt": torch.zeros(16),
                                      "use_alt": torch.ones(4, dtype=torch.bool)}),
        ("alt-shape", "bias_alt", {"bias_alt": torch.zeros(15), "use_alt": torch.ones(4, dtype=torch.bool)}),
        ("selector-dtype", "use_alt", {"bias_alt": torch.zeros(16), "use_alt": torch.ones(4, dtype=torch.int32)}),
        ("selector-shape", "use_alt", {"bias_alt": torch.zeros(16), "use_alt": torch.ones(5, dtype=torch.bool)}),
        ("alt-with-hash", "bias_alt", {"bias": None, "bias_alt": torch.zeros(16),
                                       "use_alt": torch.ones(4, dtype=torch.bool),
                                       "hash_ids": torch.zeros(4, 2, dtype=torch.int32)}),
        ("alt-nan", "bias_alt", {"bias_alt": torch.full((16,), float("nan")),
                                 "use_alt": torch.ones(4, dtype=torch.bool)}),
        ("weight-eps-negative", "weight_eps", {"weight_eps": -1e-20}),
        ("weight-eps-nan", "weight_eps", {"weight_eps": float("nan")}),
    ])
    return cases


def _ids(gen: torch.Generator, t: int, e: int, k: int, only: int | None = None) -> torch.Tensor:
    if only is not None:
        return torch.full((t, k), only, dtype=torch.int32)
    rows = [torch.randperm(e, generator=gen)[:k] for _ in range(t)]
    return torch.stack(rows).to(torch.int32) if rows else torch.zeros((0, k), dtype=torch.int32)


def _dispatch(label: str, t: int, h: int, e: int, k: int, dtype=BF16, only: int | None = None,
              noncontig: tuple[str, ...] = ()) -> Case:
    def make(gen: torch.Generator) -> dict:
        return {"x": randn(gen, t, h, dtype=dtype), "ids": _ids(gen, t, e, k, only), "num_experts": e}
    return Case("moe_dispatch", label, make, noncontig=noncontig)


@case_generator
def moe_dispatch() -> list[Case]:
    """Stable grouping by expert, empty experts, every copy to one expert, no tokens."""
    cases = [
        _dispatch("T64-H128-E256-top6", 64, 128, 256, 6),
        _dispatch("T1-E16-top6", 1, 64, 16, 6),
        _dispatch("all-to-one-expert", 10, 32, 8, 3, only=5),
        _dispatch("f32", 17, 48, 12, 2, dtype=F32),
        _dispatch("no-tokens", 0, 32, 8, 2),
        _dispatch("noncontiguous", 9, 32, 8, 2, noncontig=("x", "ids")),
    ]

    def good(gen):
        return {"x": randn(gen, 4, 8), "ids": torch.tensor([[0, 1], [2, 3], [1, 0], [3, 3]], dtype=torch.int32),
                "num_experts": 4}

    cases += bad_cases("moe_dispatch", good, [
        ("ids-out-of-range", "ids", {"ids": lambda a: a["ids"].index_fill(0, torch.tensor([2]), 4)}),
        ("ids-negative", "ids", {"ids": lambda a: a["ids"].index_fill(0, torch.tensor([1]), -1)}),
        ("ids-dtype", "ids", {"ids": lambda a: a["ids"].long()}),
        ("ids-rows", "ids", {"ids": lambda a: a["ids"][:3]}),
        ("num-experts", "num_experts", {"num_experts": 0}),
    ])
    return cases


def _combine(label: str, t: int, h: int, k: int, dtype=BF16, weighted: bool = True,
             noncontig: tuple[str, ...] = ()) -> Case:
    def make(gen: torch.Generator) -> dict:
        src = torch.randperm(t * k, generator=gen).to(torch.int32)
        weights = torch.rand((t, k), generator=gen) * 2 if weighted else None
        return {"y_sorted": randn(gen, t * k, h, dtype=dtype), "src": src, "weights": weights,
                "topk": None if weighted else k}
    return Case("moe_combine", label, make, noncontig=noncontig)


@case_generator
def moe_combine() -> list[Case]:
    """Weighted and unweighted un-permute, one token, no tokens."""
    cases = [
        _combine("T64-H128-top6", 64, 128, 6),
        _combine("T1-top6", 1, 64, 6),
        _combine("unweighted", 12, 32, 3, weighted=False),
        _combine("f32", 9, 40, 2, dtype=F32),
        _combine("no-tokens", 0, 16, 2),
        _combine("noncontiguous", 8, 32, 2, noncontig=("y_sorted", "weights")),
    ]

    def good(gen):
        return {"y_sorted": randn(gen, 6, 8), "src": torch.tensor([5, 0, 3, 1, 4, 2], dtype=torch.int32),
                "weights": torch.rand((3, 2), generator=gen), "topk": None}

    cases += bad_cases("moe_combine", good, [
        ("src-repeated", "src", {"src": torch.tensor([5, 0, 3, 3, 4, 2], dtype=torch.int32)}),
        ("src-out-of-range", "src", {"src": torch.tensor([5, 0, 3, 6, 4, 2], dtype=torch.int32)}),
        ("src-length", "src", {"src": torch.tensor([0, 1, 2], dtype=torch.int32)}),
        ("weights-shape", "weights", {"weights": torch.rand(2, 2)}),
        ("weights-dtype", "weights", {"weights": lambda a: a["weights"].double()}),
        ("no-weights-no-topk", "topk", {"weights": None}),
        ("rows-not-multiple", "y_sorted", {"weights": None, "topk": 4}),
    ])
    return cases
