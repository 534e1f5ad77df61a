"""NaN inputs give what the contracts say, on every variant alike (each agreed with none of the others
before): sparse_attention NaN rows give NaN in o and lse, other rows unaffected; an indexer NaN score
counts as -inf (ranks last, reported as -inf); a GEMM's act_quant="fp8" block holding Inf or NaN gives NaN
rows (the reference gave finite values there); moe_route refuses NaN logits."""
from __future__ import annotations

import pytest

from _child import assert_ok_on_variants

ATTN = """
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 3, 4, 64, generator=g); q[0, 1, 2] = float('nan')
kv = torch.randn(2, 9, 64, generator=g); kv[1, 4] = float('nan')
idx = torch.randint(0, 9, (2, 3, 5), generator=g, dtype=torch.int32); idx[1, :, 0] = 4; idx[1, 2] = torch.tensor([0, 1, 2, 3, 5])
o, lse = dsv4rt.ops.sparse_attention(q, kv, idx, torch.randn(4, generator=g), .125, True, backend=V)
want = torch.zeros(2, 3, 4, dtype=torch.bool); want[0, 1, 2] = True; want[1, :2] = True
assert torch.equal(o.isnan().any(-1), want), o.isnan().any(-1)
assert torch.equal(lse.isnan(), want), lse
"""
INDEXER = """
g = torch.Generator().manual_seed(1)
q = torch.randn(1, 2, 4, 32, generator=g)
k = torch.randn(1, 12, 32, generator=g); k[0, 3] = float('nan'); k[0, 7] = float('nan')
w = torch.rand(1, 2, 4, generator=g); vis = torch.full((1, 2), 12, dtype=torch.int32)
idx, sc = dsv4rt.ops.indexer_topk(q, k, w, vis, 11, None, True, backend=V)
finite = [t for t in range(12) if t not in (3, 7)]
for r in range(2):
    got = idx[0, r].tolist()
    assert set(finite) <= set(got) and len(set(got)) == 11, got      # the 10 finite keys first, then a NaN key
    nan_slot = [i for i, t in enumerate(got) if t in (3, 7)]
    assert len(nan_slot) == 1 and sc[0, r, nan_slot[0]] == float('-inf'), (got, sc)
    assert not sc.isnan().any() and bool(torch.isfinite(sc[0, r, [i for i, t in enumerate(got) if t not in (3, 7)]]).all())
"""
VISIBLE_NON_FINITE = """
g = torch.Generator().manual_seed(11)
n, rows = 9, 12
kv = torch.rand(n, generator=g) + 0.5
kv[[1, 4]] = float('inf'); kv[6] = float('nan')
k = torch.zeros(1, n, 2); k[0, :, 0] = kv
q = torch.zeros(1, rows, 1, 2); q[..., 0] = 1.0
w = torch.tensor(WEIGHTS)[torch.randint(0, len(WEIGHTS), (1, rows, 1), generator=g)]
vis = torch.randint(0, n + 1, (1, rows), generator=g, dtype=torch.int32); vis[0, :3] = torch.tensor([3, n, 7])
for topk in (4, n, n + 2):
    idx, sc = dsv4rt.ops.indexer_topk(q, k, w, vis, topk, None, True, backend=V)
    for r in range(rows):
        v, got, m = int(vis[0, r]), idx[0, r], min(topk, int(vis[0, r]))
        want = w[0, r, 0].double() * torch.relu(kv[:v].double())        # inf key: -inf (w < 0), NaN (w = 0)
        want = torch.where(want.isnan(), float('-inf'), want).sort(descending=True).values[:m]
        keys = got[got != -1]
        assert keys.numel() == m and keys.unique().numel() == m and bool((keys < v).all()), (topk, r, v, got)
        assert torch.equal(sc[0, r][got != -1].double().sort(descending=True).values, want), (topk, r, got, sc[0, r], want)
        assert bool((sc[0, r][got == -1] == float('-inf')).all()), sc[0, r]
"""
GEMM = """
from dsv4rt.formats import quant_mxfp4, quant_fp8_block
g = torch.Generator().manual_seed(2)
x = torch.randn(3, 256, generator=g); x[0, 5] = float('inf'); x[2, 200] = float('nan')
w, s = quant_mxfp4(torch.randn(8, 256, generator=g))
rows = dsv4rt.ops.fp4_gemm(x, w, s, 'fp8', backend=V).isnan().any(1).tolist()
assert rows == [True, False, True], rows            # an Inf / NaN block quantises to NaN: its rows are NaN
"""
ATTN_INF = """
import dsv4rt.reference as R
def kinds(t):
    t = t.double()
    return torch.stack([t.isnan(), t == float("inf"), t == float("-inf")])
g = torch.Generator().manual_seed(4)
for dt in (torch.float32, torch.bfloat16):
    for sink in (torch.randn(4, generator=g), None):
        q = torch.randn(2, 3, 4, 64, generator=g)
        kv = torch.randn(2, 9, 64, generator=g)
        kv[0, :, 3] = kv[0, :, 3].abs() + 0.25; kv[0, 0, 5] = -1.0
        q[0, 0, 1, 3] = float('inf')                  # +inf logits on every key
        q[0, 2, 2, 5] = float('-inf')                 # +inf on key 0, -inf or NaN on the others
        q[0, 1, 0, :] = float('inf')                  # NaN logits (inf * mixed signs)
        kv[1, 4, 7] = float('inf')                    # +-inf logits and an infinite value
        idx = torch.randint(0, 9, (2, 3, 5), generator=g, dtype=torch.int32)
        idx[0, 2, 0] = 0; idx[1, 1, :2] = 4; idx[1, 2, 3] = -1
        a = dict(q=q.to(dt), kv=kv.to(dt), idx=idx, sink=sink, scale=.125, return_lse=True)
        (o, lse), (ro, rl) = dsv4rt.ops.sparse_attention(**a, backend=V), R.sparse_attention(**a)
        assert ro[0, 0, 1].isnan().all() and rl[0, 2, 2].isnan() and not ro[0, 0, 0].isnan().any()
        assert torch.equal(kinds(o), kinds(ro)), (dt, sink is None, (kinds(o) != kinds(ro)).any(0).any(-1).nonzero().tolist())
        assert torch.equal(kinds(lse), kinds(rl)), (dt, sink is None, (kinds(lse) != kinds(rl)).any(0).nonzero().tolist())
"""

ATTN_SKIPPED = """
g = torch.Generator().manual_seed(5)
for dt in (torch.float32, torch.bfloat16):
    for n in (5, 300):                                     # 300: more rows than gathered (cpu/numpy converts kv whole)
        q = torch.randn(2, 2, 4, 64, generator=g).to(dt)
        kv = torch.randn(2, n, 64, generator=g)
        kv[:, 0, 2] = float('inf'); kv[:, 0, 3] = float('nan'); kv[:, -1, 5] = float('-inf')   # the stand-in rows
        kv = kv.to(dt)
        idx = torch.randint(1, n - 1, (2, 2, 6), generator=g, dtype=torch.int32)
        idx[:, :, ::2] = -1; idx[1, 1] = -1                # skipped entries; one row skips everything
        for sink in (None, torch.randn(4, generator=g)):
            o, lse = dsv4rt.ops.sparse_attention(q, kv, idx, sink, .125, True, backend=V)
            assert torch.isfinite(o).all() and torch.isfinite(lse[0]).all(), (dt, n, o.isnan().any(-1), lse)
            assert (o[1, 1] == 0).all() and (lse[1, 1] == (float('-inf') if sink is None else sink)).all(), (o[1, 1], lse[1, 1])
"""

E4M3_NAN_CODES = """
import dsv4rt.reference as R
g = torch.Generator().manual_seed(13)
w = (torch.randn(128, 256, generator=g) * 8).to(torch.float8_e4m3fn)
w.view(torch.uint8)[5, 10] = 0x7F; w.view(torch.uint8)[9, 200] = 0xFF; w.view(torch.uint8)[100, 0] = 0xFF
for dt in (torch.float32, torch.bfloat16):
    for scale in (torch.ones(1, 2), torch.full((1, 2), 127, dtype=torch.uint8)):
        args = dict(x=torch.randn(3, 256, generator=g).to(dt), w=w, w_scale=scale)
        y, ref = dsv4rt.ops.fp8_gemm(**args, backend=V), R.fp8_gemm(**args)
        assert ref.isnan().any(0).nonzero().flatten().tolist() == [5, 9, 100]
        assert torch.equal(y.isnan(), ref.isnan()), (dt, y.isnan().any(0).nonzero().flatten().tolist())
q = torch.randn(1, 2, 4, 32, generator=g)
k = (torch.randn(1, 10, 32, generator=g) * 8).to(torch.float8_e4m3fn)
k.view(torch.uint8)[0, 3, 4] = 0x7F; k.view(torch.uint8)[0, 7, 0] = 0xFF          # keys 3 and 7 score NaN
idx, sc = dsv4rt.ops.indexer_topk(q, k, torch.rand(1, 2, 4, generator=g), torch.full((1, 2), 10, dtype=torch.int32),
                                  9, torch.rand(1, 10, generator=g) + 0.5, True, backend=V)
for r in range(2):
    got = idx[0, r].tolist()
    assert set(range(10)) - {3, 7} <= set(got), got                       # every finite key before a NaN one
    assert [float(sc[0, r, i]) for i, t in enumerate(got) if t in (3, 7)] == [float('-inf')], (got, sc[0, r])
"""

ACT_QUANT_INF = """
import dsv4rt.reference as R
from dsv4rt.formats import quant_mxfp4, quant_fp8_block
g = torch.Generator().manual_seed(12)
x = torch.randn(5, 384, generator=g)
x[0, 5] = float('inf'); x[1, 200] = float('-inf'); x[2, 300] = float('nan'); x[3, 7] = float('inf'); x[3, 9] = float('nan')
for dt in (torch.float32, torch.bfloat16):
    w8, s8 = quant_fp8_block(torch.randn(256, 384, generator=g))
    w4, s4 = quant_mxfp4(torch.randn(64, 384, generator=g))
    for op, args in (("fp8_gemm", dict(x=x.to(dt), w=w8, w_scale=s8)), ("fp4_gemm", dict(x=x.to(dt), w=w4, w_scale=s4))):
        y = getattr(dsv4rt.ops, op)(**args, act_quant="fp8", backend=V)
        ref = getattr(R, op)(**args, act_quant="fp8")
        assert ref.isnan().all(1).tolist() == [True, True, True, True, False], ref.isnan().all(1)
        assert torch.equal(y.isnan(), ref.isnan()) and not y.isinf().any(), (op, dt, y.isnan().all(1), y.isinf().any(1))
"""

@pytest.mark.parametrize("interp", [False, True], ids=["cpu", "cuda-interpreter"])
def test_attention_plus_inf_logit_gives_nan(interp):
    """sparse_attention follows the reference's max-subtracted softmax: a +inf logit (Inf in q or in a
    selected kv row) gives exp(inf - inf) = NaN in that (b, s, h)'s o and lse (cpu/torch and cuda/torch
    gave +-inf in o and +inf in lse: torch.logsumexp returns +inf there; cpu/numpy gave lse +inf)."""
    if interp:
        pytest.importorskip("triton", reason="Triton is not installed: cuda/triton cases need its interpreter")
    assert_ok_on_variants({"attention-inf": ATTN_INF}, interp)


@pytest.mark.parametrize("interp", [False, True], ids=["cpu", "cuda-interpreter"])
def test_attention_skipped_entries_never_read(interp):
    """A -1 entry of idx is skipped: Inf / NaN in the kv row a variant gathers in its place (row 0 or N-1,
    clamped) must not reach o or lse (cpu/numpy, cpu/torch and cuda/torch multiplied its p = 0 by that row:
    0 * inf = NaN)."""
    if interp:
        pytest.importorskip("triton", reason="Triton is not installed: cuda/triton cases need its interpreter")
    assert_ok_on_variants({"attention-skipped": ATTN_SKIPPED}, interp)


@pytest.mark.parametrize("interp", [False, True], ids=["cpu", "cuda-interpreter"])
def test_e4m3_nan_codes_are_nan(interp):
    """The E4M3 NaN codes 0x7F / 0xFF in fp8_gemm weights make their output column NaN, and in indexer_topk
    keys a NaN score (counted as -inf). cuda/triton under the interpreter decoded them as +-480 (finite
    columns, keys ranked by a made-up score); it now puts NaN back from the bits there (the GPU path is
    unchanged)."""
    if interp:
        pytest.importorskip("triton", reason="Triton is not installed: cuda/triton cases need its interpreter")
    assert_ok_on_variants({"e4m3-nan-codes": E4M3_NAN_CODES}, interp)


@pytest.mark.parametrize("interp", [False, True], ids=["cpu", "cuda-interpreter"])
def test_act_quant_block_holding_inf_gives_nan(interp):
    """act_quant="fp8": a 1x128 block holding +-Inf (or NaN) quantises to NaN, so its whole output row is NaN
    as in the reference (cuda/triton clamped the Inf block's scale to 2^126: the row came out +-inf)."""
    if interp:
        pytest.importorskip("triton", reason="Triton is not installed: cuda/triton cases need its interpreter")
    assert_ok_on_variants({"act-quant-inf": ACT_QUANT_INF}, interp)


@pytest.mark.parametrize("interp", [False, True], ids=["cpu", "cuda-interpreter"])
def test_nan_semantics_agree(interp):
    if interp:
        pytest.importorskip("triton", reason="Triton is not installed: cuda/triton NaN cases need its interpreter")
    assert_ok_on_variants({"attention": ATTN, "indexer": INDEXER, "fp4-gemm-act-quant": GEMM}, interp)


@pytest.mark.parametrize("interp", [False, True], ids=["cpu", "cuda-interpreter"])
def test_indexer_keeps_visible_keys_scoring_minus_inf(interp):
    """A visible key whose score is -inf or NaN (NaN counts as -inf) still fills a slot: each row holds
    min(topk, visible) keys (cpu/torch and cuda/torch let torch.topk pick invisible keys, also masked to
    -inf, in their place, then dropped them: [1, 0, -1, -1] for [1, 0, 2, -1]; cpu/numpy did so across rows
    of different ``visible``)."""
    if interp:
        pytest.importorskip("triton", reason="Triton is not installed: cuda/triton cases need its interpreter")
    assert_ok_on_variants({"indexer-visible-non-finite": VISIBLE_NON_FINITE.replace("WEIGHTS", "[-1.0, 0.0, -0.5]")},
                          interp)


@pytest.mark.parametrize("variant", ["cpu/numpy", "cpu/torch", "cpu/native"])
def test_indexer_plus_inf_scores_rank_first(variant):
    """An infinite key under a positive head weight scores +inf and ranks above every finite score (H = 1:
    cpu/native pads the heads to 16 with q = 0 and w = 0, and kept those lanes' 0 * inf = NaN in the head
    sum, so a +inf score counted as -inf; the pad lanes are now left out of the sum)."""
    assert_ok_on_variants({"indexer-plus-inf": VISIBLE_NON_FINITE.replace("WEIGHTS", "[1.0, 0.0, -1.0]")},
                          False, cpu=(variant,))


def test_indexer_plus_inf_scores_rank_first_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed: cuda/triton cases need its interpreter")
    assert_ok_on_variants({"indexer-plus-inf": VISIBLE_NON_FINITE.replace("WEIGHTS", "[1.0, 0.0, -1.0]")}, True)


PLUS_INF_PADDED_HEADS = """
k = torch.rand(1, 9, 4) + .5; k[0, [1, 4], 0] = float('inf')
q = torch.zeros(1, 2, 3, 4); q[..., 0] = 1.0
idx = dsv4rt.ops.indexer_topk(q, k, torch.ones(1, 2, 3), torch.full((1, 2), 9, dtype=torch.int32), 2, backend=V)
assert [sorted(r) for r in idx[0].tolist()] == [[1, 4], [1, 4]], idx
"""


@pytest.mark.parametrize("interp", [False, True], ids=["cpu", "cuda-interpreter"])
def test_indexer_plus_inf_scores_with_padded_heads(interp):
    """H = 3: cpu/native pads the heads to 16 and cuda/triton to a power of two (4), with q = 0 and w = 0;
    an infinite key gave 0 * inf = NaN in those lanes, summed into the score (a +inf score counted as -inf)."""
    if interp:
        pytest.importorskip("triton", reason="Triton is not installed: cuda/triton cases need its interpreter")
    assert_ok_on_variants({"indexer-plus-inf-padded-heads": PLUS_INF_PADDED_HEADS}, interp)


MASKS = """
import dsv4rt.reference as R
from dsv4rt.formats import quant_fp8_block, quant_mxfp4
g = torch.Generator().manual_seed(3)
def kinds(t):
    t = t.double()
    return torch.stack([t.isnan(), t == float("inf"), t == float("-inf")])
def agree(op, args):
    out, ref = getattr(dsv4rt.ops, op)(**args, backend=V), getattr(R, op)(**args)
    assert torch.equal(kinds(out), kinds(ref)), f"{op}: NaN/+inf/-inf pattern differs from the reference"
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(4, 256, generator=g)
    x[0, 5] = float("nan"); x[1, 3] = float("inf"); x[2, 7] = float("inf"); x[2, 9] = float("-inf")
    wf = torch.randn(256, 256, generator=g); wf[3, :] = 0                   # Inf times a zero weight
    agree("fp8_gemm", dict(x=x.to(dt), w=quant_fp8_block(wf)[0], w_scale=quant_fp8_block(wf)[1]))
    agree("fp4_gemm", dict(x=x.to(dt), w=quant_mxfp4(wf)[0], w_scale=quant_mxfp4(wf)[1]))
for ratio, ov, c in ((4, True, 16), (8, False, 8)):
    kv = torch.randn(2, 4 * ratio, c, generator=g); gate = torch.randn(2, 4 * ratio, c, generator=g)
    kv[0, 1, 2] = float("nan"); gate[0, ratio + 1, 3] = float("inf"); gate[1, 2 * ratio:3 * ratio] = float("-inf")
    gate[1, 1, 1] = float("nan"); kv[1, 3 * ratio + 1, 0] = float("inf")
    agree("kv_compress", dict(kv=kv, gate=gate, ape=torch.randn(ratio, c, generator=g), ratio=ratio, overlap=ov))
kv = torch.randn(2, 8, 8, generator=g); gate = torch.randn(2, 8, 8, generator=g)     # V4.1: ratio 2 / 1, no ape
kv[0, 1, 2] = float("nan"); gate[0, 3, 3] = float("inf"); gate[1, 4:6] = float("-inf"); gate[1, 0, 1] = float("nan")
kv[1, 7, 0] = float("inf"); gate[0, 6, 5] = float("-inf"); kv[0, 7, 5] = float("-inf")
agree("kv_compress", dict(kv=kv, gate=gate, ape=None, ratio=2, overlap=False))
agree("kv_compress", dict(kv=kv, gate=gate, ape=None, ratio=1, overlap=False))
agree("kv_compress", dict(kv=kv, gate=None, ape=None, ratio=1, overlap=False))
ys = torch.randn(10, 8, generator=g); ys[3, 1] = float("nan"); ys[4, 2] = float("inf"); ys[6, 2] = float("-inf")
ys[7, 2] = float("inf")
w = torch.rand(5, 2, generator=g); w[4, 0] = float("nan"); w[3, 1] = float("inf")
src = torch.randperm(10, generator=g).to(torch.int32)
for dt in (torch.float32, torch.bfloat16):
    agree("moe_combine", dict(y_sorted=ys.to(dt), src=src, weights=w))
"""


@pytest.mark.parametrize("interp", [False, True], ids=["cpu", "cuda-interpreter"])
def test_non_finite_patterns_match_the_reference(interp):
    """fp8/fp4 GEMM without act_quant, kv_compress (empty softmax = NaN) and moe_combine: the NaN / +inf /
    -inf pattern of every variant is the reference's (cuda/triton kv_compress gave 0 for an all -inf
    block before)."""
    if interp:
        pytest.importorskip("triton", reason="Triton is not installed: cuda/triton cases need its interpreter")
    assert_ok_on_variants({"non-finite": MASKS}, interp)
