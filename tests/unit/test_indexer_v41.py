"""V4.1's indexer: indexer_topk's candidate mask and sorted output, and select_candidate_blocks.

The float64 reference against hand-worked rows and the release's formulation (pad, block max, pin, top-k,
drop -inf), the conformance checks failing on wrong answers (so the conformance suite can fail), every
CPU variant on the two-level pipeline, and the native argument errors. Backends are certified by the
conformance cases (runtime/conformance/cases/indexer.py); these tests pin the semantics.
"""
from __future__ import annotations

import pytest
import torch

import dsv4rt.reference as ref
from dsv4rt import ops
from dsv4rt.backend import poisoned_outputs
from dsv4rt.backends.cpu import native_status
from dsv4rt.conformance import tolerance
from dsv4rt.errors import ContractError
from dsv4rt.formats import fp4_fake_quant

CPU = ("cpu/numpy", "cpu/torch") + (("cpu/native",) if native_status()[0] else ())
NINF = float("-inf")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def release_blocks(scores: torch.Tensor, lens: torch.Tensor, block: int, keep: int) -> torch.Tensor:
    """The release's recipe, written out independently for finite / -inf scores: -inf padding, block max,
    the newest block at +inf, torch.topk of min(keep, blocks), kept where above -inf."""
    n = scores.shape[-1]
    padded = torch.nn.functional.pad(scores.double(), (0, -n % block), value=NINF)
    best = padded.unflatten(-1, (-1, block)).amax(-1)
    newest = torch.div(lens.long() - 1, block, rounding_mode="floor")
    best = best.masked_fill(torch.arange(best.shape[-1]) == newest[..., None], float("inf"))
    top = best.topk(min(keep, best.shape[-1]), dim=-1)
    kept = torch.zeros_like(best, dtype=torch.bool).scatter_(-1, top.indices, top.values > NINF)
    return kept.repeat_interleave(block, dim=-1)[..., :n]


# ----------------------------------------------------------------------------------- select_candidate_blocks

def test_blocks_hand_worked_row():
    # blocks of 4 over 10 positions: maxima [3, 9, -inf (padded)]; newest position 9 pins block 2
    sc = torch.tensor([[[0., 3., 1., 2., 9., 0., 0., 0., NINF, NINF]]])
    lens = torch.tensor([[10]], dtype=torch.int32)
    m = ref.select_candidate_blocks(sc, lens, 4, 2)
    assert m[0, 0].tolist() == [False] * 4 + [True] * 6      # block 1 (9) and the pinned block 2
    assert ref.select_candidate_blocks(sc, lens, 4, 3)[0, 0].all()
    # nothing reachable and compress_len 0: no block, not even a pinned one
    empty = ref.select_candidate_blocks(torch.full((1, 1, 10), NINF), torch.zeros(1, 1, dtype=torch.int32), 4, 3)
    assert not empty.any()


@pytest.mark.parametrize("block,keep", [(8, 5), (4, 2048), (1, 7), (3, 4), (16, 1)])
def test_blocks_reference_matches_the_release_recipe(block, keep):
    g = gen(block * 100 + keep)
    b, s, n = 2, 9, 70
    sc = torch.randn((b, s, n), generator=g)
    lens = torch.randint(0, n + 1, (b, s), generator=g, dtype=torch.int32)
    sc.masked_fill_(torch.arange(n) >= lens[..., None], NINF)
    want = release_blocks(sc, lens, block, keep)
    assert torch.equal(ref.select_candidate_blocks(sc, lens, block, keep), want)
    for v in CPU:
        with poisoned_outputs():
            got = ops.select_candidate_blocks(sc, lens, block, keep, backend=v)
        assert torch.equal(got, want), v


def test_blocks_check_fails_on_a_wrong_mask():
    g = gen(3)
    sc = torch.randn((1, 2, 32), generator=g)
    lens = torch.tensor([[32, 17]], dtype=torch.int32)
    args = {"scores": sc, "compress_len": lens, "block_size": 4, "n_blocks": 3}
    good = ref.select_candidate_blocks(**args)
    assert tolerance.candidate_blocks("select_candidate_blocks", args, (good,), (good,)).passed
    worst = ref.candidate_block_scores(sc, lens, 4)[0, 0].argmin()
    swapped = good.clone()
    first = int(good[0, 0].view(8, 4)[:, 0].nonzero()[1])               # drop a kept (not pinned) block ...
    swapped[0, 0, 4 * first:4 * first + 4] = False
    swapped[0, 0, 4 * worst:4 * worst + 4] = True                       # ... for the worst one
    partial = good.clone()
    partial[0, 1, int(good[0, 1].nonzero()[0])] = False                # half a block
    fewer = good.clone()
    fewer[0, 1] = False
    for bad in (swapped, partial, fewer):
        assert not tolerance.candidate_blocks("select_candidate_blocks", args, (bad,), (good,)).passed


def test_blocks_nan_counts_as_minus_inf_on_every_variant():
    sc = torch.randn((1, 2, 12), generator=gen(4))
    sc[0, 0, :3] = float("nan")                                         # block 0 keeps its finite 4th score
    sc[0, 1, 4:8] = float("nan")                                        # block 1 has no score: dropped
    lens = torch.tensor([[4, 12]], dtype=torch.int32)
    want = ref.select_candidate_blocks(sc, lens, 4, 3)
    assert want[0, 0, :4].all() and not want[0, 1, 4:8].any()
    for v in CPU:
        assert torch.equal(ops.select_candidate_blocks(sc, lens, 4, 3, backend=v), want), v


@pytest.mark.parametrize("change,arg", [
    ({"compress_len": torch.tensor([[5, 17]], dtype=torch.int32)}, "compress_len"),
    ({"block_size": 0}, "block_size"),
    ({"n_blocks": -1}, "n_blocks"),
    ({"scores": torch.zeros(1, 2, 16, dtype=torch.int32)}, "scores"),
])
def test_blocks_bad_arguments_name_the_argument(change, arg):
    args = dict(scores=torch.randn(1, 2, 16), compress_len=torch.tensor([[5, 16]], dtype=torch.int32),
                block_size=4, n_blocks=2)
    args.update(change)
    with pytest.raises(ContractError, match=arg):
        ops.select_candidate_blocks(**args)


# ------------------------------------------------------------------------------ indexer_topk (V4.1 mode)

def v41_call(seed: int, b=2, s=6, h=32, d=64, n=48, topk=8, p=0.4, sorted_output=True) -> dict:
    g = gen(seed)
    q = fp4_fake_quant(torch.randn((b, s, h, d), generator=g).bfloat16())
    k = fp4_fake_quant(torch.randn((b, n, d), generator=g).bfloat16())
    vis = torch.randint(0, n + 1, (b, s), generator=g, dtype=torch.int32)
    return dict(q=q, k=k, weights=torch.randn((b, s, h), generator=g), visible=vis, topk=topk, k_scale=None,
                return_scores=True, score_dtype=None, candidates=torch.rand((b, s, n), generator=g) < p,
                sorted_output=sorted_output)


def test_reference_topk_rows_are_selectable_sorted_and_best():
    a = v41_call(5)
    idx, sc = ref.indexer_topk(**a)
    full = ref.indexer_scores(a["q"], a["k"], a["weights"], a["visible"], None, None, a["candidates"])
    ok = ref.selectable(a["visible"], a["k"].shape[1], a["candidates"])
    for b in range(2):
        for s in range(6):
            row = idx[b, s]
            count = min(a["topk"], int(ok[b, s].sum()))
            valid = row[:count].long()
            assert (row[count:] == -1).all() and (valid[1:] > valid[:-1]).all()
            assert ok[b, s, valid].all()
            best = full[b, s][ok[b, s]].sort(descending=True).values[:count]
            assert torch.equal(sc[b, s, :count].sort(descending=True).values, best)


def test_no_candidates_and_unsorted_is_v4():
    a = v41_call(6, sorted_output=False)
    v4 = {key: a[key] for key in ("q", "k", "weights", "visible", "topk", "k_scale", "return_scores", "score_dtype")}
    for v in CPU:
        plain = ops.indexer_topk(**v4, backend=v)
        same = ops.indexer_topk(**v4, candidates=None, sorted_output=False, backend=v)
        assert all(torch.equal(x, y) for x, y in zip(plain, same)), v


def _check(args, outs):
    return tolerance.topk("indexer_topk", args, outs, ref.indexer_topk(**args))


def test_topk_check_fails_on_wrong_v41_rows():
    a = v41_call(7, p=0.2, topk=12)                                     # some rows have < 12 candidates
    idx, sc = ref.indexer_topk(**a)
    assert _check(a, (idx, sc)).passed
    n = a["k"].shape[1]
    ok = ref.selectable(a["visible"], n, a["candidates"])
    outside = ~a["candidates"] & (torch.arange(n) < a["visible"][..., None])      # visible non-candidates
    b, s = [int(i) for i in ((ok.sum(-1) >= 3) & (ok.sum(-1) < 12) & outside.any(-1)).nonzero()[0]]
    count = int(ok[b, s].sum())
    unsorted = idx.clone()
    unsorted[b, s, :count] = unsorted[b, s, :count].flip(0)             # right set, wrong order
    padded = idx.clone()
    padded[b, s, count] = int(outside[b, s].nonzero()[0])               # a visible non-candidate fills a slot
    for bad in (unsorted, padded):
        assert not _check(a, (bad, sc)).passed
    assert not _check(dict(a, candidates=None), (idx, sc)).passed     # the mask must count


@pytest.mark.parametrize("sorted_output", [False, True])
def test_cpu_variants_two_level_pipeline(sorted_output):
    """Level one on a source layer's scores, level two masks another layer's scores: every CPU variant's
    blocks and top-k agree with the reference's checks."""
    a = v41_call(8, s=10, n=64, topk=6, sorted_output=sorted_output)
    a["visible"] = torch.arange(55, 65, dtype=torch.int32).expand(2, 10).contiguous()
    source = ref.indexer_scores(a["q"], a["k"], a["weights"], a["visible"]).float()
    for v in CPU:
        with poisoned_outputs():
            cand = ops.select_candidate_blocks(source, a["visible"], 4, 5, backend=v)
        c = tolerance.candidate_blocks("select_candidate_blocks", {"scores": source, "compress_len": a["visible"],
                                                                  "block_size": 4, "n_blocks": 5}, (cand,), ())
        assert c.passed, (v, c.message)
        args = dict(a, candidates=cand)
        with poisoned_outputs():
            outs = ops.indexer_topk(**args, backend=v)
        check = _check(args, outs)
        assert check.passed, (v, check.message)


@pytest.mark.skipif(not native_status()[0], reason="dsv4rt._C is not built")
def test_native_argument_errors_name_the_argument():
    from dsv4rt import _C

    sc = torch.randn(1, 2, 8).numpy()
    lens = torch.full((1, 2), 8, dtype=torch.int32).numpy()
    mask = torch.zeros(1, 2, 8, dtype=torch.uint8).numpy()
    with pytest.raises(ValueError, match="select_candidate_blocks: argument 'compress_len'"):
        _C.select_candidate_blocks(sc, torch.full((1, 2), 9, dtype=torch.int32).numpy(), 4, 2, mask)
    with pytest.raises(ValueError, match="select_candidate_blocks: argument 'block_size'"):
        _C.select_candidate_blocks(sc, lens, 0, 2, mask)
    with pytest.raises(ValueError, match="select_candidate_blocks: argument 'mask'"):
        _C.select_candidate_blocks(sc, lens, 4, 2, mask[:, :, :4].copy())
    q, k = torch.randn(1, 2, 3, 8).numpy(), torch.randn(1, 8, 8).numpy()
    w, vis = torch.randn(1, 2, 3).numpy(), torch.full((1, 2), 8, dtype=torch.int32).numpy()
    idx = torch.zeros(1, 2, 4, dtype=torch.int32).numpy()
    with pytest.raises(ValueError, match="indexer_topk: argument 'candidates'"):
        _C.indexer_topk(q, k, None, w, vis, 4, idx, None, False, mask[:, :, :5].copy(), True)
