"""The composite (plain-torch) implementations vs the float64 reference, through ``dsv4rt.ops`` on cpu/torch.

Small seeded CPU inputs, float32 and bfloat16, non-contiguous views and the edge cases of the contracts
(empty experts, fewer visible keys than top-k, rows with no valid index, no sink). Every call runs with
poisoned outputs, so an element an implementation forgets to write shows up as NaN / a sentinel.
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

import dsv4rt
import dsv4rt.reference as ref
from dsv4rt.backend import poisoned_outputs
from dsv4rt.backends import composite
from dsv4rt.backends.composite import gemm as cgemm

CHOICE = "cpu/torch"
F64 = torch.float64
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(op: str, *args, **kwargs):
    """Run ``dsv4rt.ops.<op>`` on cpu/torch (checking that it is really the composite function) with
    poisoned outputs."""
    fn = getattr(dsv4rt.ops, op)
    impl = fn.resolve(*args, backend=CHOICE, **kwargs)
    assert impl.name == CHOICE and impl.fn is composite.implementations()[op]
    with poisoned_outputs():
        return fn(*args, backend=CHOICE, **kwargs)


def assert_close(out: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """|out - want| <= rtol * max|want| elementwise (want is the float64 reference)."""
    assert out.shape == want.shape
    assert not torch.isnan(out.double()).any(), "NaN in the output (an unwritten poisoned element?)"
    err = (out.double() - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"max abs err {err:.3g} > {rtol:.3g} * {scale:.3g}"


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other column of a wider buffer)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] <= 1
    return view


def rand_fp4(g, lead, n, k, w_dtype=torch.uint8, s_dtype=torch.uint8):
    w = torch.randint(0, 256, (*lead, n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    s = torch.randint(118, 134, (*lead, n, k // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return w.view(w_dtype), s.view(s_dtype)


# ------------------------------------------------------------------------------------------ registration

def test_registers_all_nine_ops_as_torch_variant():
    class Fake:
        device_type = "npu"

    class Rec:
        backend = Fake()
        calls: list = []

        def implement(self, op, variant, fn, **kw):
            self.calls.append((op, variant, kw["priority"], kw["device_type"]))

    r = Rec()
    composite.register(r, priority=3)
    assert sorted(c[0] for c in r.calls) == sorted(dsv4rt.ops.all_ops())
    assert {c[1:] for c in r.calls} == {("torch", 3, "npu")}
    r.calls.clear()
    composite.register(r, device_type="cpu")
    assert {c[1:] for c in r.calls} == {("torch", 0, "cpu")}


def test_sources_have_no_numpy_and_document_host_syncs():
    root = pathlib.Path(composite.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import numpy|from numpy)", text, re.M), path.name
        assert ".numpy(" not in text and ".item(" not in text, path.name
        for line in text.splitlines():
            if ".tolist(" in line:
                assert "host sync" in line.lower(), f"{path.name}: undocumented host sync: {line.strip()}"


# ------------------------------------------------------------------------------------------------- GEMMs

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
@pytest.mark.parametrize("m,n,k", [(1, 16, 64), (7, 40, 2048 + 96)])
def test_fp4_gemm(dtype, act_quant, m, n, k):
    g = gen(m * 1000 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w, s = rand_fp4(g, (), n, k)
    y = call("fp4_gemm", x, w, s, act_quant)
    assert y.dtype == dtype
    assert_close(y, ref.fp4_gemm(x, w, s, act_quant), 4 * ULP[dtype] + 1e-5)


@pytest.mark.parametrize("w_dtype,s_dtype", [(torch.int8, torch.float8_e8m0fnu),
                                             (torch.float4_e2m1fn_x2, torch.uint8)])
def test_fp4_gemm_weight_dtypes_noncontig_and_small_k_block(monkeypatch, w_dtype, s_dtype):
    monkeypatch.setattr(cgemm, "K_BLOCK", 128)      # many K blocks on a small problem
    g = gen(5)
    x = noncontig(torch.randn(3, 320, generator=g).bfloat16())
    w, s = rand_fp4(g, (), 24, 320, w_dtype, s_dtype)
    y = call("fp4_gemm", x, w, s, "fp8")
    assert_close(y, ref.fp4_gemm(x, w, s, "fp8"), 4 * ULP[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offsets", [[0, 3, 3, 7, 9], [0, 0, 0, 9, 9], [0, 9, 9, 9, 9], [0, 0, 0, 0, 9]])
def test_fp4_grouped_gemm(dtype, offsets):
    g = gen(sum(offsets))
    x = torch.randn(9, 128, generator=g).to(dtype)
    w, s = rand_fp4(g, (4,), 32, 128)
    off = torch.tensor(offsets, dtype=torch.int32)
    for aq in (None, "fp8"):
        y = call("fp4_grouped_gemm", x, w, s, off, aq)
        assert y.dtype == dtype
        assert_close(y, ref.fp4_grouped_gemm(x, w, s, off, aq), 4 * ULP[dtype] + 1e-5)


def test_fp4_grouped_gemm_no_rows():
    g = gen(1)
    w, s = rand_fp4(g, (3,), 8, 64)
    y = call("fp4_grouped_gemm", torch.zeros(0, 64), w, s, torch.zeros(4, dtype=torch.int32))
    assert y.shape == (0, 8)


def test_fp4_grouped_gemm_noncontig_x():
    g = gen(2)
    x = noncontig(torch.randn(6, 64, generator=g))
    w, s = rand_fp4(g, (2,), 16, 64)
    off = torch.tensor([0, 4, 6], dtype=torch.int32)
    assert_close(call("fp4_grouped_gemm", x, w, s, off), ref.fp4_grouped_gemm(x, w, s, off), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
@pytest.mark.parametrize("scale_kind", ["e8m0", "uint8", "f32"])
def test_fp8_gemm(dtype, act_quant, scale_kind):
    g = gen(7)
    n, k = 130, 1100                          # partial 128-blocks in both N and K; K crosses K_BLOCK
    x = torch.randn(5, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 40).to(torch.float8_e4m3fn)
    if scale_kind == "f32":
        s = torch.rand(2, 9, generator=g) + 0.25
    else:
        s = torch.randint(120, 130, (2, 9), generator=g, dtype=torch.int32).to(torch.uint8)
        s = s.view(torch.float8_e8m0fnu) if scale_kind == "e8m0" else s
    y = call("fp8_gemm", x, w, s, act_quant)
    assert y.dtype == dtype
    assert_close(y, ref.fp8_gemm(x, w, s, act_quant), 4 * ULP[dtype] + 1e-5)


def test_fp8_gemm_noncontig_and_m1():
    g = gen(8)
    x = noncontig(torch.randn(1, 256, generator=g).bfloat16())
    w = (torch.randn(64, 256, generator=g) * 8).to(torch.float8_e4m3fn)
    s = torch.randint(124, 130, (1, 2), generator=g, dtype=torch.int32).to(torch.uint8)
    assert_close(call("fp8_gemm", x, w, s), ref.fp8_gemm(x, w, s), 4 * ULP[torch.bfloat16])


# ---------------------------------------------------------------------------------------------- indexer

def _check_topk(idx, scores, q, k, w, visible, topk, k_scale=None):
    """Valid slots first-come any order: distinct, visible, and their reference scores are the best."""
    full = ref.indexer_scores(q, k, w, visible, k_scale)          # [B, S, N] float64, -inf invisible
    b, s, n = full.shape
    for bi in range(b):
        for si in range(s):
            vis = min(int(visible[bi, si]), n)
            want = min(topk, vis)
            row = idx[bi, si]
            got = row[row >= 0]
            assert got.numel() == want and (row == -1).sum() == topk - want
            assert len(set(got.tolist())) == want and (got < vis).all()
            best = torch.sort(full[bi, si, :vis], descending=True).values[:want]
            mine = torch.sort(full[bi, si, got.long()], descending=True).values
            tol = 1e-4 * max(full[bi, si, :vis].abs().max().item() if vis else 0.0, 1e-30)
            assert torch.allclose(mine, best, rtol=0, atol=tol)
            if scores is not None:
                sr = scores[bi, si]
                assert torch.isinf(sr[row == -1]).all() and (sr[row == -1] < 0).all()
                assert torch.allclose(sr[row >= 0].double(), full[bi, si, got.long()], rtol=1e-4, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [1, 5, 16])
def test_indexer_topk(dtype, topk):
    g = gen(topk)
    b, s, h, d, n = 2, 6, 4, 32, 12
    q = torch.randn(b, s, h, d, generator=g).to(dtype)
    k = torch.randn(b, n, d, generator=g).to(dtype)
    w = torch.randn(b, s, h, generator=g)                # negative head weights too
    visible = torch.tensor([[0, 1, 3, 5, 12, 12], [2, 0, 7, 11, 4, 9]], dtype=torch.int32)
    idx, sc = call("indexer_topk", q, k, w, visible, topk, None, True)
    assert idx.dtype == torch.int32 and sc.dtype == torch.float32 and idx.shape == (b, s, topk)
    _check_topk(idx, sc, q, k, w, visible, topk)
    idx_only = call("indexer_topk", q, k, w, visible, topk)
    assert isinstance(idx_only, torch.Tensor) and idx_only.shape == (b, s, topk)


def test_indexer_topk_fp8_keys_noncontig_q():
    g = gen(11)
    b, s, h, d, n = 1, 5, 3, 16, 20
    q = noncontig(torch.randn(b, s, h, d, generator=g))
    k = (torch.randn(b, n, d, generator=g) * 30).to(torch.float8_e4m3fn)
    k_scale = torch.rand(b, n, generator=g) + 0.1
    w = torch.rand(b, s, h, generator=g)
    visible = torch.tensor([[20, 3, 0, 17, 8]], dtype=torch.int32)
    idx, sc = call("indexer_topk", q, k, w, visible, 8, k_scale, True)
    _check_topk(idx, sc, q, k, w, visible, 8, k_scale)


def test_indexer_topk_no_keys():
    q = torch.randn(1, 2, 2, 8)
    idx = call("indexer_topk", q, torch.zeros(1, 0, 8), torch.ones(1, 2, 2), torch.zeros(1, 2, dtype=torch.int32), 4)
    assert (idx == -1).all()


# -------------------------------------------------------------------------------------------- kv_compress

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio,overlap,prev", [(4, False, False), (8, False, False), (4, True, False),
                                                (4, True, True), (2, True, True)])
def test_kv_compress(dtype, ratio, overlap, prev):
    g = gen(ratio * 10 + overlap + 2 * prev)
    b, s, d = 2, 3 * ratio, 8
    ch = 2 * d if overlap else d
    kv = torch.randn(b, s, ch, generator=g).to(dtype)
    gate = (torch.randn(b, s, ch, generator=g) * 3).to(dtype)
    ape = torch.randn(ratio, ch, generator=g)
    pk = torch.randn(b, ratio, ch, generator=g).to(dtype) if prev else None
    pg = torch.randn(b, ratio, ch, generator=g).to(dtype) if prev else None
    out = call("kv_compress", kv, gate, ape, ratio, overlap, pk, pg)
    assert out.dtype == torch.float32 and out.shape == (b, s // ratio, d)
    assert_close(out, ref.kv_compress(kv, gate, ape, ratio, overlap, pk, pg), 1e-5)


def test_kv_compress_noncontig_and_empty():
    g = gen(3)
    kv = noncontig(torch.randn(1, 8, 16, generator=g))
    gate = noncontig(torch.randn(1, 8, 16, generator=g))
    ape = torch.randn(4, 16, generator=g)
    assert_close(call("kv_compress", kv, gate, ape, 4, True), ref.kv_compress(kv, gate, ape, 4, True), 1e-5)
    empty = call("kv_compress", torch.zeros(1, 0, 16), torch.zeros(1, 0, 16), ape, 4, True)
    assert empty.shape == (1, 0, 8)


# --------------------------------------------------------------------------------------- sparse_attention

def _attn_inputs(seed, dtype, b=2, s=5, h=4, d=16, n=9, k=6):
    g = gen(seed)
    q = torch.randn(b, s, h, d, generator=g).to(dtype)
    kv = torch.randn(b, n, d, generator=g).to(dtype)
    idx = torch.randint(-1, n, (b, s, k), generator=g, dtype=torch.int32)
    idx[0, 1] = -1                                     # a row with no valid index
    idx[1, 2, :3] = idx[1, 2, 3]                       # duplicates count separately
    sink = torch.randn(h, generator=g)
    return q, kv, idx, sink


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_sink", [True, False])
def test_sparse_attention(dtype, with_sink):
    q, kv, idx, sink = _attn_inputs(1, dtype)
    sink = sink if with_sink else None
    scale = 16 ** -0.5
    o, lse = call("sparse_attention", q, kv, idx, sink, scale, True)
    want_o, want_lse = ref.sparse_attention(q, kv, idx, sink, scale, True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close(o, want_o, 4 * ULP[dtype] + 1e-5)
    assert (o[0, 1] == 0).all()
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("-inf")).all()
    assert torch.allclose(lse[finite].double(), want_lse[finite], atol=1e-5, rtol=1e-5)
    if not with_sink:
        assert (lse[0, 1] == float("-inf")).all()
    o_only = call("sparse_attention", q, kv, idx, sink, scale)
    assert isinstance(o_only, torch.Tensor) and torch.equal(o_only, o)


def test_sparse_attention_noncontig_and_all_minus_one():
    q, kv, idx, sink = _attn_inputs(2, torch.float32)
    qn, kvn = noncontig(q), noncontig(kv)
    assert_close(call("sparse_attention", qn, kvn, idx, sink, 0.3), ref.sparse_attention(q, kv, idx, sink, 0.3), 1e-5)
    none = torch.full_like(idx, -1)
    o, lse = call("sparse_attention", q, kv, none, sink, 0.3, True)
    assert (o == 0).all() and torch.equal(lse, sink.expand_as(lse))
    o, lse = call("sparse_attention", q, kv[:, :0], none, None, 0.3, True)   # no kv rows at all
    assert (o == 0).all() and (lse == float("-inf")).all()
    o, lse = call("sparse_attention", q, kv, idx[:, :, :0], sink, 0.3, True)  # K = 0
    assert (o == 0).all() and torch.equal(lse, sink.expand_as(lse))


# ------------------------------------------------------------------------------------------------- MoE

def _sorted_pairs(ids, weights):
    order = torch.argsort(ids.long(), dim=1)
    return torch.gather(ids.long(), 1, order), torch.gather(weights.double(), 1, order)


@pytest.mark.parametrize("with_bias", [True, False])
def test_moe_route(with_bias):
    g = gen(4)
    logits = torch.randn(9, 16, generator=g) * 3
    logits[0] -= 130.0                                  # s underflows to 0 in float32 for these
    logits[1] += 40.0                                   # softplus in its linear range
    bias = torch.randn(16, generator=g) * 0.1 if with_bias else None
    ids, w = call("moe_route", logits, bias, 4, 2.5)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    want_ids, want_w = ref.moe_route(logits, bias, 4, 2.5)
    gi, gw = _sorted_pairs(ids, w)
    wi, ww = _sorted_pairs(want_ids, want_w)
    assert torch.equal(gi, wi)
    assert torch.allclose(gw, ww, rtol=1e-5, atol=1e-6)


def test_moe_route_hash_ids_keep_order():
    g = gen(5)
    logits = torch.randn(6, 8, generator=g)
    hash_ids = torch.randint(0, 8, (6, 3), generator=g, dtype=torch.int64)
    ids, w = call("moe_route", logits, None, 3, 1.5, "sqrtsoftplus", hash_ids)
    want_ids, want_w = ref.moe_route(logits, None, 3, 1.5, "sqrtsoftplus", hash_ids)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(w.double(), want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["random", "one_expert", "no_tokens"])
def test_moe_dispatch(dtype, case):
    g = gen(6)
    t, topk, e = (0 if case == "no_tokens" else 7), 3, 6
    x = torch.randn(t, 5, generator=g).to(dtype)
    ids = torch.randint(0, e - 1, (t, topk), generator=g, dtype=torch.int32)   # expert e-1 stays empty
    if case == "one_expert":
        ids.fill_(2)
    xs, off, src = call("moe_dispatch", x, ids, e)
    wx, woff, wsrc = ref.moe_dispatch(x, ids, e)
    assert xs.dtype == dtype and off.dtype == torch.int32 and src.dtype == torch.int32
    assert torch.equal(xs.double(), wx) and torch.equal(off, woff) and torch.equal(src, wsrc)


def test_moe_dispatch_noncontig():
    g = gen(7)
    x = noncontig(torch.randn(4, 6, generator=g))
    ids = noncontig(torch.randint(0, 3, (4, 2), generator=g, dtype=torch.int32))
    xs, off, src = call("moe_dispatch", x, ids, 3)
    wx, woff, wsrc = ref.moe_dispatch(x, ids, 3)
    assert torch.equal(xs.double(), wx) and torch.equal(off, woff) and torch.equal(src, wsrc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_moe_combine(dtype, weighted):
    g = gen(8)
    t, topk, h = 5, 3, 7
    y = torch.randn(t * topk, h, generator=g).to(dtype)
    src = torch.randperm(t * topk, generator=g).to(torch.int32)
    w = torch.rand(t, topk, generator=g) if weighted else None
    out = call("moe_combine", y, src, w, None if weighted else topk)
    assert out.dtype == dtype
    assert_close(out, ref.moe_combine(y, src, w, None if weighted else topk), 2 * ULP[dtype] + 1e-6)


def test_dispatch_then_combine_round_trip():
    g = gen(9)
    x = torch.randn(6, 4, generator=g)
    ids = torch.randint(0, 5, (6, 2), generator=g, dtype=torch.int32)
    xs, _, src = call("moe_dispatch", x, ids, 5)
    back = call("moe_combine", noncontig(xs), src, torch.full((6, 2), 0.5))
    assert torch.allclose(back, x, atol=1e-6)


def test_sparse_attention_minus_inf_sink_for_padded_heads():
    """A -inf sink (vLLM pads heads that way) adds nothing; called directly since the CPU value check
    of the op refuses non-finite sinks."""
    q, kv, idx, sink = _attn_inputs(3, torch.float32)
    sink[1] = float("-inf")
    fn = composite.implementations()["sparse_attention"]
    o, lse = fn(q, kv, idx, sink, 0.25, True)
    want_o, want_lse = ref.sparse_attention(q, kv, idx, sink, 0.25, True)
    assert_close(o, want_o, 1e-5)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse))
    assert lse[0, 1, 1] == float("-inf") and not torch.isnan(lse).any()
