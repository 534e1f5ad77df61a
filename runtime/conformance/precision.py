"""Checks that an implementation honours the precision points of the contracts (``p_dtype`` of
sparse_attention, ``score_dtype`` of indexer_topk), not only the tolerance.

The conformance tolerance of an op admits both a rounded and an unrounded result (it has to: a kernel may
round against its running max), so it cannot tell whether a precision mode is implemented. These checks
can: on float32 inputs they compare the implementation with the float64 reference of the mode it was asked
for and of the other mode, and require it to be much closer to the one asked for. Each raises
AssertionError naming the mode and the measured errors. ``impl`` takes the op's parameters positionally.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .. import reference as ref
from ..formats import round_float

__all__ = ["check_attention_p_dtype", "check_indexer_score_dtype"]


def _attention_args(gen: torch.Generator, device: Any) -> dict[str, Any]:
    # float32 tensors holding bf16 values: exact in TF32 too, so a kernel's TF32 products (a GPU's default
    # for float32 tiles) leave the logits and P.V exact and only the precision point under test shows
    # Every head of a query is the same vector and every other entry of a row is its best key (duplicates
    # count), so every block or split of an online kernel holds the row max: it rounds P against the same
    # max as the reference, and the comparison is exact up to fp32 arithmetic.
    b, s, h, d, n, k = 2, 3, 4, 64, 96, 64
    q = torch.randn(b, s, 1, d, generator=gen).bfloat16().float().expand(b, s, h, d).contiguous()
    kv = torch.randn(b, n, d, generator=gen).bfloat16().float()
    idx = torch.randint(0, n, (b, s, k), generator=gen, dtype=torch.int32)
    logits = torch.einsum("bsd,bskd->bsk", q[:, :, 0].double(),
                          kv.double()[torch.arange(b)[:, None, None], idx.long()])
    best = idx.gather(2, logits.argmax(dim=2, keepdim=True))
    idx[:, :, 0::2] = best.expand(b, s, k // 2)
    idx[:, :, -5::2] = -1                                   # some padding
    sink = torch.randn(h, generator=gen)
    return {"q": q.to(device), "kv": kv.to(device), "idx": idx.to(device), "sink": sink.to(device),
            "scale": d ** -0.5, "return_lse": False}


def check_attention_p_dtype(impl: Callable[..., Any], device: Any = "cpu", seed: int = 0,
                            modes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)) -> None:
    """For each 16-bit ``mode``: on float32 q/kv, ``impl(..., p_dtype=mode)`` must sit within a quarter of
    the distance between the rounded and the unrounded float64 references of the rounded one, and
    ``p_dtype=float32`` within a quarter of it of the unrounded one."""
    gen = torch.Generator().manual_seed(seed)
    args = _attention_args(gen, device)
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    exact = ref.sparse_attention(**cpu, p_dtype=torch.float32)
    for mode in modes:
        rounded = ref.sparse_attention(**cpu, p_dtype=mode)
        gap = float((rounded - exact).abs().max())
        assert gap > 0, f"p_dtype={mode}: the rounded and exact references coincide; the check cannot tell"
        for asked, want, other in ((mode, rounded, exact), (torch.float32, exact, rounded)):
            o = impl(*args.values(), asked).double().cpu()
            err, err_other = float((o - want).abs().max()), float((o - other).abs().max())
            assert err <= 0.25 * gap, (
                f"sparse_attention p_dtype={asked}: max error {err:.3g} against the reference of that mode, "
                f"{err_other:.3g} against the other mode's (the modes differ by {gap:.3g}): the precision point "
                f"is not implemented")


def check_indexer_score_dtype(impl: Callable[..., Any], device: Any = "cpu", seed: int = 0,
                              modes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> None:
    """On float32 q/k/weights: with a 16-bit ``score_dtype`` every returned score is a value of that dtype
    within 3 of its ulps of the rounded float64 reference; with ``float32`` the scores are the unrounded
    ones (within 2^-18 of their magnitude bound), which 16-bit values are not."""
    gen = torch.Generator().manual_seed(seed)
    b, s, h, d, n, topk = 2, 3, 8, 64, 80, 16
    q = torch.randn(b, s, h, d, generator=gen)
    k = torch.randn(b, n, d, generator=gen)
    w = torch.rand(b, s, h, generator=gen) + 0.1
    vis = torch.randint(topk, n + 1, (b, s), generator=gen, dtype=torch.int32)
    dev = [t.to(device) for t in (q, k, w, vis)]
    bound = ref.indexer_scores(q.abs(), k.abs(), w, torch.full_like(vis, n), None, torch.float32)
    for mode in modes + (torch.float32,):
        idx, scores = impl(*dev, topk, None, True, mode)
        idx, scores = idx.long().cpu(), scores.cpu()
        want = ref.indexer_scores(q, k, w, vis, None, mode).gather(2, idx.clamp(min=0))
        ok = idx >= 0
        got = scores.double()[ok]
        if mode == torch.float32:
            tol = 2.0**-18 * bound.gather(2, idx.clamp(min=0))[ok] + 1e-30
            representable = round_float(scores[ok], torch.bfloat16).double() == got
            assert not bool(representable.all()), "indexer_topk score_dtype=float32: every score is a bf16 value"
        else:
            assert torch.equal(round_float(scores[ok], mode).double(), got), (
                f"indexer_topk score_dtype={mode}: returned scores are not {mode} values (not rounded)")
            ulp = 2.0**-7 if mode == torch.bfloat16 else 2.0**-10
            tol = 3 * ulp * bound.gather(2, idx.clamp(min=0))[ok] + 1e-30
        err = (got - want[ok]).abs()
        assert bool((err <= tol).all()), (
            f"indexer_topk score_dtype={mode}: scores differ from the reference of that mode by up to "
            f"{float(err.max()):.3g} (tolerance {float(tol[int(err.argmax())]):.3g})")
