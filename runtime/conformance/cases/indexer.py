"""Conformance cases of indexer_topk (V4 and V4.1 modes, MXFP4 keys), indexer_scores and
select_candidate_blocks."""
from __future__ import annotations

import torch

from ...formats import fp4_fake_quant, quant_mxfp4
from ..case import Case, bad_cases, case_generator, randn

BF16, F32 = torch.bfloat16, torch.float32


def _causal(b: int, s: int, ratio: int = 4, start: int = 0) -> torch.Tensor:
    """visible[b, s] = (pos + 1) // ratio for pos = start + s: entries whose whole block has ended."""
    pos = torch.arange(start, start + s, dtype=torch.int32)
    return ((pos + 1) // ratio).expand(b, s).contiguous()


def _case(label: str, b: int, s: int, h: int, d: int, n: int, topk: int, visible=None, dtype=BF16,
          fp8_keys: bool = False, scores: bool = False, noncontig: tuple[str, ...] = (),
          score_dtype: torch.dtype | None = None, nan_keys: int = 0, candidates=None, sorted_output: bool = False,
          fp4: bool = False, distinct_keys: int = 0, mxfp4_keys: str = "", nan_q: int = 0) -> Case:
    """``candidates``: None, or a function of (gen, visible) giving the bool [B, S, N] mask; ``fp4``: q and k
    MXFP4 fake-quantised (V4.1's indexer inputs: many tied scores); ``distinct_keys``: keys drawn from that
    many rows (tied scores); ``mxfp4_keys``: the keys packed as MXFP4 (V4.1's key cache), the scales as
    "uint8" or "e8m0" (float8_e8m0fnu); ``nan_q``: that many query heads hold a NaN."""
    make = _maker(b, s, h, d, n, topk, visible, dtype, fp8_keys, scores, score_dtype, nan_keys, candidates,
                  sorted_output, fp4, distinct_keys, mxfp4_keys, nan_q)
    return Case("indexer_topk", label, make, noncontig=noncontig)


def _scores_case(label: str, b: int, s: int, h: int, d: int, n: int, noncontig: tuple[str, ...] = (),
                 **kw) -> Case:
    """An indexer_scores case: the inputs of the matching indexer_topk case (same keyword arguments)."""
    full = _case(label, b, s, h, d, n, 1, **kw).make
    names = ("q", "k", "weights", "visible", "k_scale", "score_dtype")

    def make(gen: torch.Generator) -> dict:
        a = full(gen)
        return {name: a[name] for name in names}
    return Case("indexer_scores", label, make, noncontig=noncontig)


def _maker(b, s, h, d, n, topk, visible, dtype, fp8_keys, scores, score_dtype, nan_keys, candidates, sorted_output,
           fp4, distinct_keys, mxfp4_keys, nan_q):
    def make(gen: torch.Generator) -> dict:
        q = randn(gen, b, s, h, d, dtype=dtype)
        if fp8_keys:
            k = (randn(gen, b, n, d) * 8).clamp(-440, 440).to(torch.float8_e4m3fn)
            k_scale = torch.rand((b, n), generator=gen) * 0.1 + 0.01
        elif distinct_keys:
            rows = randn(gen, distinct_keys, d)
            k, k_scale = rows[torch.randint(0, distinct_keys, (b, n), generator=gen)].to(dtype), None
        else:
            k, k_scale = randn(gen, b, n, d, dtype=dtype), None
        if fp4:
            q, k = fp4_fake_quant(q), fp4_fake_quant(k)
        if nan_keys:   # keys scoring NaN (counted as -inf): still visible, they fill slots before -1
            bad = torch.randperm(n, generator=gen)[:nan_keys]
            if fp8_keys:
                k.view(torch.uint8)[:, bad, 0] = 0x7F    # the E4M3 NaN code
            else:
                k[:, bad, 0] = float("nan")
        if mxfp4_keys:   # V4.1's key cache: the packed form of the (fake-quantised) keys
            k, k_scale = quant_mxfp4(k.float() * 4)
            if mxfp4_keys == "e8m0":
                k_scale = k_scale.view(torch.float8_e8m0fnu)
        if nan_q:
            q.view(b * s, h, d)[torch.randperm(b * s, generator=gen)[:nan_q], 0, 0] = float("nan")
        weights = torch.randn((b, s, h), generator=gen)
        vis = visible(gen) if callable(visible) else _causal(b, s, start=4 * n - s)
        return {"q": q, "k": k, "weights": weights, "visible": vis, "topk": topk, "k_scale": k_scale,
                "return_scores": scores, "score_dtype": score_dtype,
                "candidates": None if candidates is None else candidates(gen, vis),
                "sorted_output": sorted_output}
    return make


def _mask(p: float, n: int):
    """Candidates: each of the n positions True with probability ``p``."""
    def make(gen: torch.Generator, vis: torch.Tensor) -> torch.Tensor:
        return torch.rand((*vis.shape, n), generator=gen) < p
    return make


def _blocks_mask(n: int, block: int, keep: int):
    """Candidates as V4.1 makes them: the reference select_candidate_blocks of random scores (-inf beyond
    each query's visible keys)."""
    def make(gen: torch.Generator, vis: torch.Tensor) -> torch.Tensor:
        from ... import reference as ref
        sc = torch.randn((*vis.shape, n), generator=gen)
        sc.masked_fill_(torch.arange(n) >= vis[..., None], float("-inf"))
        return ref.select_candidate_blocks(sc, vis, block, keep)
    return make


def _v41_cases() -> list[Case]:
    """V4.1's mode: 32 heads, FP4-simulated q and k, bf16 scores, sorted output, candidate masks."""
    full = _mask(1.0, 96)
    return [
        _case("v41-decode-H32-mask-all-true-sorted", 2, 1, 32, 128, 96, 16, fp4=True, candidates=full,
              sorted_output=True, scores=True, visible=lambda g: torch.tensor([[96], [70]], dtype=torch.int32)),
        _case("v41-prefill-H32-sparse-mask-sorted", 1, 12, 32, 64, 48, 8, fp4=True, candidates=_mask(0.4, 48),
              sorted_output=True, scores=True, visible=lambda g: _causal(1, 12, ratio=1, start=36)),
        _case("v41-mask-fewer-than-topk", 2, 4, 32, 64, 40, 16, fp4=True, candidates=_mask(0.15, 40),
              sorted_output=True, scores=True,
              visible=lambda g: torch.randint(10, 41, (2, 4), generator=g, dtype=torch.int32)),
        _case("v41-mask-unsorted", 1, 5, 32, 64, 64, 12, fp4=True, candidates=_mask(0.5, 64), scores=True,
              visible=lambda g: torch.randint(0, 65, (1, 5), generator=g, dtype=torch.int32)),
        _case("v41-two-level-blocks", 1, 16, 32, 64, 80, 12, fp4=True, candidates=_blocks_mask(80, 4, 5),
              sorted_output=True, scores=True, visible=lambda g: _causal(1, 16, ratio=1, start=64)),
        _case("v41-sorted-no-mask-fewer-visible", 2, 6, 32, 64, 30, 20, fp4=True, sorted_output=True, scores=True,
              visible=lambda g: torch.randint(0, 31, (2, 6), generator=g, dtype=torch.int32)),
        _case("v41-ties-sorted", 1, 6, 32, 64, 50, 10, fp4=True, distinct_keys=4, candidates=_mask(0.7, 50),
              sorted_output=True, scores=True,
              visible=lambda g: torch.randint(20, 51, (1, 6), generator=g, dtype=torch.int32)),
        _case("v41-mask-f32-scores", 2, 3, 32, 64, 56, 8, fp4=True, candidates=_mask(0.3, 56), sorted_output=True,
              scores=True, score_dtype=F32),
        _case("v41-mask-fp8-keys", 1, 3, 32, 64, 40, 8, fp8_keys=True, candidates=_mask(0.5, 40),
              sorted_output=True, scores=True),
        _case("v41-mask-nan-keys", 1, 4, 20, 32, 24, 12, candidates=_mask(0.6, 24), sorted_output=True, nan_keys=6,
              scores=True, visible=lambda g: torch.randint(8, 25, (1, 4), generator=g, dtype=torch.int32)),
        _case("v41-mask-noncontiguous", 1, 4, 32, 64, 32, 8, fp4=True, candidates=_mask(0.5, 32),
              sorted_output=True, noncontig=("q", "k", "weights", "candidates")),
        _case("v41-mask-no-keys", 1, 2, 32, 32, 0, 4, candidates=_mask(1.0, 0), sorted_output=True, scores=True,
              visible=lambda g: torch.zeros((1, 2), dtype=torch.int32)),
    ] + _mxfp4_cases()


def _mxfp4_cases() -> list[Case]:
    """MXFP4 keys (uint8 E2M1 pairs + E8M0 per 32): V4.1's 68 B/entry key cache at D = 128."""
    return [
        _case("mxfp4-keys-decode-D128-sorted", 2, 1, 32, 128, 96, 16, fp4=True, mxfp4_keys="e8m0",
              candidates=_mask(0.6, 96), sorted_output=True, scores=True,
              visible=lambda g: torch.tensor([[96], [50]], dtype=torch.int32)),
        _case("mxfp4-keys-prefill-uint8-scales", 1, 10, 32, 64, 40, 8, fp4=True, mxfp4_keys="uint8",
              sorted_output=True, scores=True, visible=lambda g: _causal(1, 10, ratio=1, start=30)),
        _case("mxfp4-keys-f32-scores", 2, 3, 8, 64, 48, 8, dtype=F32, mxfp4_keys="uint8", scores=True,
              score_dtype=F32),
        _case("mxfp4-keys-fp16-q", 1, 4, 4, 32, 33, 6, dtype=torch.float16, mxfp4_keys="e8m0", scores=True),
        _case("mxfp4-keys-fewer-visible", 2, 5, 16, 32, 24, 12, mxfp4_keys="uint8", scores=True,
              visible=lambda g: torch.randint(0, 25, (2, 5), generator=g, dtype=torch.int32)),
        _case("mxfp4-keys-nan-q", 1, 4, 8, 64, 20, 8, mxfp4_keys="uint8", nan_q=2, scores=True,
              visible=lambda g: torch.randint(4, 21, (1, 4), generator=g, dtype=torch.int32)),
        _case("mxfp4-keys-noncontiguous", 1, 4, 8, 64, 32, 8, fp4=True, mxfp4_keys="uint8",
              noncontig=("q", "k", "k_scale", "weights")),
        _case("mxfp4-keys-no-keys", 1, 2, 8, 32, 0, 4, mxfp4_keys="uint8", scores=True,
              visible=lambda g: torch.zeros((1, 2), dtype=torch.int32)),
    ]


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
    ] + _v41_cases()

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
        ("candidates-dtype", "candidates", {"candidates": torch.ones((1, 2, 16), dtype=torch.uint8)}),
        ("candidates-shape", "candidates", {"candidates": torch.ones((1, 2, 15), dtype=torch.bool)}),
        ("sorted-output-int", "sorted_output", {"sorted_output": 1}),
    ] + _bad_mxfp4())
    return cases


def _bad_mxfp4() -> list[tuple]:
    """Bad MXFP4 key arguments (shared by indexer_topk and indexer_scores; the good call has D = 32, N = 16)."""
    def packed(a):
        return quant_mxfp4(a["k"].float())

    return [
        ("mxfp4-without-scale", "k_scale", {"k": lambda a: packed(a)[0]}),
        ("mxfp4-scale-f32", "k_scale", {"k_scale": lambda a: packed(a)[1].float(), "k": lambda a: packed(a)[0]}),
        ("mxfp4-scale-shape", "k_scale", {"k": lambda a: packed(a)[0],
                                          "k_scale": torch.full((1, 16, 2), 127, dtype=torch.uint8)}),
        ("mxfp4-k-unpacked-width", "k", {"k": torch.zeros((1, 16, 32), dtype=torch.uint8),
                                         "k_scale": torch.full((1, 16, 1), 127, dtype=torch.uint8)}),
        ("mxfp4-scale-nan-byte", "k_scale", {"k": lambda a: packed(a)[0],
                                             "k_scale": torch.full((1, 16, 1), 255, dtype=torch.uint8)}),
        ("mxfp4-D-not-multiple-of-32", "k", {"q": lambda a: a["q"][..., :16],
                                              "k": torch.zeros((1, 16, 8), dtype=torch.uint8),
                                              "k_scale": torch.full((1, 16, 1), 127, dtype=torch.uint8)}),
        ("float-keys-with-scale", "k_scale", {"k_scale": torch.ones((1, 16))}),
    ]


@case_generator
def indexer_scores() -> list[Case]:
    """The whole score matrix: decode and prefill, bf16 / fp32 / fp16 scores, E4M3 and MXFP4 keys, fewer
    visible than N (-inf beyond), NaN keys and queries (-inf), ties, no keys, non-contiguous inputs."""
    cases = [
        _scores_case("decode-B2-H8-N256", 2, 1, 8, 64, 256),
        _scores_case("prefill-causal-ratio4", 1, 24, 4, 32, 8, visible=lambda g: _causal(1, 24)),
        _scores_case("random-visible", 2, 6, 8, 32, 40,
                     visible=lambda g: torch.randint(0, 41, (2, 6), generator=g, dtype=torch.int32)),
        _scores_case("f32-scores", 2, 3, 8, 64, 64, dtype=F32, score_dtype=F32),
        _scores_case("bf16-scores-f32-inputs", 1, 4, 8, 64, 48, dtype=F32, score_dtype=BF16),
        _scores_case("fp16-scores", 1, 3, 4, 32, 30, dtype=torch.float16),
        _scores_case("fp8-keys", 2, 3, 8, 64, 100, fp8_keys=True),
        _scores_case("fp8-keys-f32-scores", 1, 3, 8, 64, 40, fp8_keys=True, score_dtype=F32),
        _scores_case("nan-keys", 2, 4, 4, 32, 24, nan_keys=6,
                     visible=lambda g: torch.randint(8, 25, (2, 4), generator=g, dtype=torch.int32)),
        _scores_case("v41-H32-fp4-ties", 1, 8, 32, 64, 50, fp4=True, distinct_keys=4,
                     visible=lambda g: _causal(1, 8, ratio=1, start=42)),
        _scores_case("v41-mxfp4-keys-D128", 1, 6, 32, 128, 64, fp4=True, mxfp4_keys="e8m0",
                     visible=lambda g: _causal(1, 6, ratio=1, start=58)),
        _scores_case("mxfp4-keys-f32", 2, 2, 8, 64, 36, dtype=F32, mxfp4_keys="uint8", score_dtype=F32),
        _scores_case("mxfp4-keys-nan-q", 1, 5, 8, 32, 20, mxfp4_keys="uint8", nan_q=2),
        _scores_case("no-keys", 2, 3, 4, 32, 0, visible=lambda g: torch.zeros((2, 3), dtype=torch.int32)),
        _scores_case("noncontiguous", 1, 4, 4, 32, 40, noncontig=("q", "k", "weights", "visible")),
        _scores_case("mxfp4-noncontiguous", 1, 3, 8, 64, 24, mxfp4_keys="uint8", noncontig=("k", "k_scale")),
    ]

    def good(gen):
        return {"q": randn(gen, 1, 2, 4, 32, dtype=BF16), "k": randn(gen, 1, 16, 32, dtype=BF16),
                "weights": torch.randn((1, 2, 4), generator=gen), "visible": torch.tensor([[3, 16]], dtype=torch.int32),
                "k_scale": None, "score_dtype": None}

    cases += bad_cases("indexer_scores", good, [
        ("q-rank", "q", {"q": lambda a: a["q"][0]}),
        ("k-dim", "k", {"k": lambda a: a["k"][..., :16]}),
        ("weights-dtype", "weights", {"weights": lambda a: a["weights"].to(BF16)}),
        ("visible-beyond-N", "visible", {"visible": torch.tensor([[3, 17]], dtype=torch.int32)}),
        ("visible-negative", "visible", {"visible": torch.tensor([[-1, 2]], dtype=torch.int32)}),
        ("fp8-without-scale", "k_scale", {"k": lambda a: a["k"].to(torch.float8_e4m3fn)}),
        ("score-dtype-unknown", "score_dtype", {"score_dtype": torch.int32}),
    ] + _bad_mxfp4())
    return cases


def _blocks_case(label: str, b: int, s: int, n: int, block: int, keep: int, dtype=F32, causal: bool = False,
                 lengths=None, ties: int = 0, nan: int = 0, low_newest: bool = False,
                 noncontig: tuple[str, ...] = ()) -> Case:
    """Random scores [B, S, N]; ``causal``: query s reaches ``n - s_count + s + 1`` positions (ratio 1), -inf
    beyond; ``lengths``: a function of gen giving compress_len (else N, or the causal lengths); ``ties``:
    scores drawn from that many values; ``low_newest``: the newest block's positions score lowest."""
    def make(gen: torch.Generator) -> dict:
        sc = torch.randint(0, ties, (b, s, n), generator=gen).float() if ties else torch.randn((b, s, n), generator=gen)
        if lengths is not None:
            cl = lengths(gen)
        elif causal:
            cl = _causal(b, s, ratio=1, start=n - s)
        else:
            cl = torch.full((b, s), n, dtype=torch.int32)
        if causal or lengths is not None:
            sc.masked_fill_(torch.arange(n) >= cl[..., None], float("-inf"))
        if low_newest:
            newest = torch.div(cl.long() - 1, block, rounding_mode="floor")
            sc.masked_fill_((torch.arange(n) // block == newest[..., None]) & (cl[..., None] > 0), -1e6)
        if nan:
            sc.view(-1)[torch.randperm(sc.numel(), generator=gen)[:nan]] = float("nan")
        return {"scores": sc.to(dtype), "compress_len": cl, "block_size": block, "n_blocks": keep}
    return Case("select_candidate_blocks", label, make, noncontig=noncontig)


@case_generator
def select_candidate_blocks() -> list[Case]:
    """Block size and block count parametrised small (V4.1: 8 / 2048, one case at that size): more blocks than
    kept, fewer reachable than kept, the pinned newest block scoring lowest or partly filled, no reachable
    position, ties, NaN, bf16 / fp16 scores, block size 1 and larger than N."""
    cases = [
        _blocks_case("decode-B2-N100-bs8-keep4", 2, 1, 100, 8, 4),
        _blocks_case("prefill-causal-bs4-keep3", 1, 24, 24, 4, 3, causal=True),
        _blocks_case("keep-more-than-blocks", 2, 3, 50, 8, 2048),
        _blocks_case("pinned-newest-scores-lowest", 2, 6, 64, 4, 3, low_newest=True,
                     lengths=lambda g: torch.randint(1, 65, (2, 6), generator=g, dtype=torch.int32)),
        _blocks_case("pinned-partial-last-block", 1, 3, 45, 8, 2, low_newest=True),
        _blocks_case("compress-len-zero-and-short", 1, 5, 32, 4, 6,
                     lengths=lambda g: torch.tensor([[0, 1, 0, 5, 32]], dtype=torch.int32)),
        _blocks_case("ties", 2, 4, 60, 4, 5, ties=3),
        _blocks_case("nan-scores", 1, 4, 40, 4, 3, nan=12),
        _blocks_case("bf16-scores", 1, 8, 72, 8, 4, dtype=BF16, causal=True),
        _blocks_case("fp16-scores-ties", 1, 3, 48, 4, 5, dtype=torch.float16, ties=4),
        _blocks_case("block-size-1", 1, 4, 30, 1, 7, causal=True),
        _blocks_case("block-larger-than-N", 2, 2, 20, 64, 1),
        _blocks_case("noncontiguous", 1, 4, 40, 4, 3, causal=True, noncontig=("scores", "compress_len")),
        _blocks_case("no-positions", 1, 2, 0, 8, 4, lengths=lambda g: torch.zeros((1, 2), dtype=torch.int32)),
        _blocks_case("release-sizes-bs8-keep2048", 1, 2, 8 * 2100 - 3, 8, 2048,
                     lengths=lambda g: torch.tensor([[8 * 2100 - 3, 8 * 1500 + 1]], dtype=torch.int32)),
    ]

    def good(gen):
        return {"scores": torch.randn((1, 2, 16), generator=gen),
                "compress_len": torch.tensor([[3, 16]], dtype=torch.int32), "block_size": 4, "n_blocks": 2}

    cases += bad_cases("select_candidate_blocks", good, [
        ("scores-rank", "scores", {"scores": lambda a: a["scores"][0]}),
        ("scores-dtype", "scores", {"scores": lambda a: a["scores"].double()}),
        ("compress-len-dtype", "compress_len", {"compress_len": lambda a: a["compress_len"].long()}),
        ("compress-len-shape", "compress_len", {"compress_len": torch.tensor([[3]], dtype=torch.int32)}),
        ("compress-len-beyond-N", "compress_len", {"compress_len": torch.tensor([[3, 17]], dtype=torch.int32)}),
        ("compress-len-negative", "compress_len", {"compress_len": torch.tensor([[-1, 2]], dtype=torch.int32)}),
        ("block-size-zero", "block_size", {"block_size": 0}),
        ("block-size-bool", "block_size", {"block_size": True}),
        ("n-blocks-zero", "n_blocks", {"n_blocks": 0}),
        ("n-blocks-2^31", "n_blocks", {"n_blocks": 2**31}),
    ])
    return cases
