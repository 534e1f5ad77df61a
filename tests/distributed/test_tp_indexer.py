"""The tensor-parallel indexer and the row-sharded Engram lookup over 2 gloo processes equal the one-process
ops: each rank scores its half of the heads with the registry's indexer_scores, the partial matrices are
summed in fp32, then the top-k follows indexer_topk's contract (candidates, sorted_output, return_scores).
The Engram table is split in ceil(rows / 2) rows per rank (the last part padded, as the release allocates
it); the all-reduced lookup is bitwise the one-process engram_lookup."""
from __future__ import annotations

import torch

from _dist_util import spawn

B, S, H, D, N = 2, 6, 8, 64, 40


def _inputs(seed: int, mx: bool) -> dict:
    """The same seeded call on every process: FP4-simulated q / keys, random visible, a candidate mask."""
    from dsv4rt.formats import fp4_fake_quant, quant_mxfp4

    g = torch.Generator().manual_seed(seed)
    q = fp4_fake_quant(torch.randn((B, S, H, D), generator=g)).to(torch.bfloat16)
    kf = fp4_fake_quant(torch.randn((B, N, D), generator=g))
    vis = torch.randint(1, N + 1, (B, S), generator=g, dtype=torch.int32)
    vis[0, 0] = 0
    a = {"q": q, "k": kf.to(torch.bfloat16), "weights": torch.randn((B, S, H), generator=g), "visible": vis,
         "k_scale": None, "candidates": torch.rand((B, S, N), generator=g) < 0.6}
    if mx:
        a["k"], a["k_scale"] = quant_mxfp4(kf)
    return a


def _heads(a: dict, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = H // world
    return a["q"][:, :, rank * h:(rank + 1) * h].contiguous(), a["weights"][:, :, rank * h:(rank + 1) * h].contiguous()


def _indexer(rank: int, world: int) -> None:
    from dsv4rt import ops
    from dsv4rt.distributed import tp

    for seed, mx in ((0, False), (1, True)):
        a = _inputs(seed, mx)
        q, w = _heads(a, rank, world)
        f32 = torch.float32
        # the reduced fp32 matrix equals the one-process matrix (up to the order of the head sum)
        full = ops.indexer_scores(a["q"], a["k"], a["weights"], a["visible"], a["k_scale"], f32)
        got = tp.indexer_scores(q, a["k"], w, a["visible"], k_scale=a["k_scale"], score_dtype=f32)
        inf = torch.isinf(full)
        assert torch.equal(inf, torch.isinf(got)) and bool((got[inf] == full[inf]).all())
        torch.testing.assert_close(got[~inf], full[~inf], rtol=1e-5, atol=1e-5)
        # top-k with the V4.1 arguments: the same rows as indexer_topk on the whole heads
        for cand, srt in ((None, False), (a["candidates"], True), (a["candidates"], False)):
            want = ops.indexer_topk(a["q"], a["k"], a["weights"], a["visible"], 12, a["k_scale"], True, f32,
                                    candidates=cand, sorted_output=srt)
            have = tp.indexer_topk(q, a["k"], w, a["visible"], 12, k_scale=a["k_scale"], score_dtype=f32,
                                   candidates=cand, sorted_output=srt, return_scores=True)
            if srt:
                assert torch.equal(have[0], want[0]), (rank, seed)
            else:   # order unspecified: compare the sets
                assert torch.equal(have[0].sort(-1).values, want[0].sort(-1).values), (rank, seed)
            torch.testing.assert_close(have[1].sort(-1).values, want[1].sort(-1).values, rtol=1e-5, atol=1e-5)
        # 16-bit scores: each rank rounds its own head sum, the reduced sum is rounded once more (the release's
        # bf16 all-reduce of bf16 partials)
        bf = torch.bfloat16
        parts = []
        for r in range(world):
            qr, wr = _heads(a, r, world)
            parts.append(ops.indexer_scores(qr, a["k"], wr, a["visible"], a["k_scale"], bf))
        want = torch.stack(parts).sum(0).to(bf).float()
        want = want.masked_fill(torch.isnan(want), float("-inf"))
        got = tp.indexer_scores(q, a["k"], w, a["visible"], k_scale=a["k_scale"], score_dtype=bf)
        assert torch.equal(got, want)
        idx = tp.indexer_topk(q, a["k"], w, a["visible"], 12, k_scale=a["k_scale"], score_dtype=bf,
                              candidates=a["candidates"], sorted_output=True)
        assert torch.equal(idx, tp.topk_from_scores(want, a["visible"], 12, a["candidates"], True))


def _engram(rank: int, world: int) -> None:
    from dsv4rt import ops
    from dsv4rt.distributed import tp

    g = torch.Generator().manual_seed(5)
    rows, dim = 37, 64
    weight = torch.randint(0, 256, (rows, dim), generator=g, dtype=torch.uint8)
    weight[(weight & 0x7F) == 0x7F] = 0x10       # no NaN codes: bitwise comparison
    scale = torch.randint(118, 134, (rows, dim // 32), generator=g, dtype=torch.uint8)
    ids = torch.randint(0, rows, (9, 24), generator=g)
    ids[0, :4] = torch.tensor([0, 18, 19, rows - 1])   # both edges of both parts
    part = -(-rows // world)
    a, b = rank * part, min(rows, (rank + 1) * part)
    w_part = torch.zeros((part, dim), dtype=torch.uint8)   # the release's ceil(rows / world) rows per rank
    s_part = torch.full((part, dim // 32), 127, dtype=torch.uint8)
    w_part[:b - a], s_part[:b - a] = weight[a:b], scale[a:b]
    w8 = w_part.view(torch.float8_e4m3fn)
    for out_dtype in (torch.bfloat16, torch.float32):
        want = ops.engram_lookup(ids, weight.view(torch.float8_e4m3fn), scale, out_dtype)
        got = tp.engram_parallel_lookup(ids, w8, s_part, (a, b), out_dtype=out_dtype)
        assert got.dtype == out_dtype and torch.equal(got, want), (rank, out_dtype)
    # a rank holding no row contributes zeros
    got = tp.engram_parallel_lookup(ids, w8, s_part, (a, b) if rank == 0 else (rows, rows))
    assert torch.equal(got[ids < part], ops.engram_lookup(ids, weight.view(torch.float8_e4m3fn), scale)[ids < part])
    assert bool((got[ids >= part] == 0).all())


def worker(rank: int, world: int) -> None:
    import dsv4rt

    with dsv4rt.use_backend("cpu"):
        _indexer(rank, world)
        _engram(rank, world)


def test_tp_indexer_and_engram_two_ranks():
    spawn(worker, 2)
