"""Unit tests of the NumPy CPU backend (cpu/numpy) against the float64 reference, through the dispatcher."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dsv4rt.reference as ref
from dsv4rt import ops
from dsv4rt.backend import Probe, Registrar, poisoned_outputs
from dsv4rt.backends import cpu
from dsv4rt.backends.cpu import attention as cpu_attention
from dsv4rt.backends.cpu import gemm as cpu_gemm
from dsv4rt.backends.cpu import indexer as cpu_indexer
from dsv4rt.registry import REGISTRY

NP = "cpu/numpy"
OPS = tuple(REGISTRY.specs)   # every declared op: the numpy variant implements them all
# normalised max error (max |y - ref| / max |ref|) allowed per output dtype
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poison():
    """Every output starts as NaN / sentinel bytes, so a skipped element fails the comparison."""
    with poisoned_outputs():
        yield


@pytest.fixture(params=[False, True], ids=["whole", "chunked"])
def small_budget(request, monkeypatch):
    """Run once with the default memory budget and once with a tiny one (many K blocks / chunks)."""
    if request.param:
        for mod in (cpu_gemm, cpu_indexer, cpu_attention):
            monkeypatch.setattr(mod, "BUDGET", 1024)
    return request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)) * scale


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor (every other column of a wider one)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def assert_close(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, tol: float | None = None) -> None:
    assert y.dtype == dtype and tuple(y.shape) == tuple(expected.shape)
    y64, e64 = y.to(torch.float64), expected.to(torch.float64)
    assert torch.isfinite(y64).all(), "non-finite output (an element was skipped?)"
    if e64.numel() == 0:
        return
    err = float((y64 - e64).abs().max()) / max(float(e64.abs().max()), 1e-30)
    assert err <= (tol or TOL[dtype]), f"normalised max error {err:.3g}"


def rand_fp4(*lead: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    w = torch.randint(0, 256, (*lead, n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    s = torch.randint(118, 134, (*lead, n, k // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return w, s


# ---------------------------------------------------------------------------------------------- backend

def test_backend_probe_and_registration():
    b = cpu.backend()
    assert isinstance(b, cpu.CpuBackend) and b.name == "cpu" and b.device_type == "cpu"
    probe = b.probe()
    assert isinstance(probe, Probe) and probe.available
    assert probe.capabilities["numpy"] == np.__version__ and isinstance(probe.capabilities["native"], bool)
    reg = Registrar(b, OPS)
    b.load(reg)
    numpy_impls = {i.op: i for i in reg.implementations if i.variant == "numpy"}
    assert set(numpy_impls) == set(OPS)
    assert all(i.priority == 10 and i.device_type == "cpu" for i in numpy_impls.values())
    assert all(i.priority < 10 for i in reg.implementations if i.variant not in ("numpy", "native"))
    native = [i for i in reg.implementations if i.variant == "native"]
    assert bool(native) == probe.capabilities["native"]          # native only where dsv4rt._C imports
    assert all(i.priority > 10 for i in native)


def test_float32_views_are_exact():
    """bf16 is widened in NumPy from its bits; it must agree with torch's cast bit for bit."""
    from dsv4rt.backends.cpu._np import f32

    x = randn(64, 48, seed=70).to(torch.bfloat16)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, torch.finfo(torch.bfloat16).tiny / 4])
    for t in (x, x[:, ::3], x.t(), x.half(), x.half()[::2], x.float()):
        got, want = f32(t), t.float().numpy()
        assert got.dtype == np.float32 and np.array_equal(got, want, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(want))
    plain = x.float()
    assert np.shares_memory(f32(plain), plain.numpy())      # float32: a view, no copy


def test_automatic_selection_prefers_native_then_numpy():
    x = randn(2, 64, seed=1)
    w, s = rand_fp4(n=8, k=64, seed=2)
    native = cpu.backend().probe().capabilities["native"]
    assert ops.fp4_gemm.resolve(x, w, s).name == ("cpu/native" if native else NP)
    assert ops.kv_compress.resolve(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), torch.zeros(4, 8), 4,
                                   True).name == ("cpu/native" if native else NP)
    # where cpu/native declines (a strided KV view larger than the gathered rows), NumPy wins over torch
    kv = torch.zeros(1, 64, 16)[:, ::2]
    assert ops.sparse_attention.resolve(torch.zeros(1, 1, 2, 16), kv, torch.zeros(1, 1, 3, dtype=torch.int32),
                                        None, 0.25).name == NP


# ---------------------------------------------------------------------------------------------- GEMMs

@pytest.mark.parametrize("act_quant", [None, "fp8"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wkind", ["uint8", "int8", "float4"])
def test_fp4_gemm(act_quant, xdtype, wkind, small_budget):
    m, n, k = 5, 40, 416                      # K not a multiple of 128: a partial last block
    x = randn(m, k, seed=3, scale=2.0).to(xdtype)
    w, s = rand_fp4(n=n, k=k, seed=4)
    wv = {"uint8": w, "int8": w.view(torch.int8), "float4": w.view(torch.float4_e2m1fn_x2)}[wkind]
    y = ops.fp4_gemm(x, wv, s.view(torch.float8_e8m0fnu), act_quant, backend=NP)
    assert_close(y, ref.fp4_gemm(x, w, s, act_quant), xdtype)


def test_fp4_gemm_noncontiguous_and_m1(small_budget):
    k, n = 256, 24
    x = noncontig(randn(1, k, seed=5))
    w, s = rand_fp4(n=n, k=k, seed=6)
    wt = w.t().contiguous().t()               # column-major weight bytes
    st = noncontig(s)
    for aq in (None, "fp8"):
        y = ops.fp4_gemm(x, wt, st, aq, backend=NP)
        assert_close(y, ref.fp4_gemm(x, w, s, aq), torch.float32)


@pytest.mark.parametrize("act_quant", [None, "fp8"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_fp4_grouped_gemm_with_empty_experts(act_quant, xdtype, small_budget):
    e, n, k = 5, 16, 192
    offsets = torch.tensor([0, 0, 3, 3, 9, 9], dtype=torch.int32)   # experts 0, 2 and 4 are empty
    x = randn(9, k, seed=7).to(xdtype)
    w, s = rand_fp4(e, n=n, k=k, seed=8)
    y = ops.fp4_grouped_gemm(x, w, s.view(torch.float8_e8m0fnu), offsets, act_quant, backend=NP)
    assert_close(y, ref.fp4_grouped_gemm(x, w, s, offsets, act_quant), xdtype)


def test_fp4_grouped_gemm_all_rows_one_expert_noncontiguous():
    e, n, k = 3, 8, 64
    offsets = torch.tensor([0, 0, 6, 6], dtype=torch.int32)
    x = noncontig(randn(6, k, seed=9))
    w, s = rand_fp4(e, n=n, k=k, seed=10)
    y = ops.fp4_grouped_gemm(x, w, s, offsets, backend=NP)
    assert_close(y, ref.fp4_grouped_gemm(x, w, s, offsets), torch.float32)


@pytest.mark.parametrize("scale_kind", ["uint8", "e8m0", "float32"])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm(scale_kind, act_quant, xdtype, small_budget):
    m, n, k = 4, 150, 300                     # partial 128-tiles along N and K
    x = randn(m, k, seed=11).to(xdtype)
    w = (randn(n, k, seed=12) * 40).to(torch.float8_e4m3fn)
    sb = torch.randint(118, 134, (2, 3), generator=gen(13), dtype=torch.int32).to(torch.uint8)
    sc = {"uint8": sb, "e8m0": sb.view(torch.float8_e8m0fnu),
          "float32": torch.rand(2, 3, generator=gen(14)) + 0.1}[scale_kind]
    y = ops.fp8_gemm(x, w, sc, act_quant, backend=NP)
    assert_close(y, ref.fp8_gemm(x, w, sc, act_quant), xdtype)


def test_fp8_gemm_noncontiguous_weight():
    w_wide = (randn(20, 256, seed=15) * 8).to(torch.float8_e4m3fn)
    w = w_wide[:, ::2]
    x = randn(3, 128, seed=16)
    sc = torch.full((1, 1), 126, dtype=torch.uint8)
    assert_close(ops.fp8_gemm(x, w, sc, backend=NP), ref.fp8_gemm(x, w, sc), torch.float32)


# ---------------------------------------------------------------------------------------------- indexer

def check_topk(idx, scores, q, k, weights, visible, topk, k_scale=None):
    """Each row holds min(topk, visible) distinct visible keys whose reference scores are the best ones
    (checked on scores, so ties may be broken either way), then -1."""
    full = ref.indexer_scores(q, k, weights, visible, k_scale)      # [B, S, N] float64, -inf masked
    b, s, _ = full.shape
    assert idx.dtype == torch.int32 and tuple(idx.shape) == (b, s, topk)
    for bi in range(b):
        for si in range(s):
            v = int(visible[bi, si])
            count = min(topk, v)
            row = idx[bi, si]
            assert (row[count:] == -1).all() and (row[:count] >= 0).all() and (row[:count] < v).all()
            chosen = row[:count].long()
            assert len(set(chosen.tolist())) == count
            got = torch.sort(full[bi, si, chosen], descending=True).values
            best = torch.sort(full[bi, si, :v], descending=True).values[:count]
            tol = 1e-5 * max(float(best.abs().max()) if count else 0.0, 1.0)
            assert torch.allclose(got, best, rtol=0, atol=tol)
            if scores is not None:
                assert scores.dtype == torch.float32
                assert torch.isneginf(scores[bi, si, count:]).all()
                assert torch.allclose(scores[bi, si, :count].double(), full[bi, si, chosen], rtol=1e-5, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_indexer_topk(dtype, small_budget):
    b, s, h, d, n, topk = 2, 9, 4, 32, 20, 6
    q = randn(b, s, h, d, seed=17).to(dtype)
    k = randn(b, n, d, seed=18).to(dtype)
    weights = randn(b, s, h, seed=19)
    visible = torch.tensor([[0, 1, 3, 5, 6, 8, 12, 20, 20], [20, 19, 2, 0, 7, 6, 6, 11, 4]], dtype=torch.int32)
    idx, sc = ops.indexer_topk(q, k, weights, visible, topk, None, True, backend=NP)
    check_topk(idx, sc, q, k, weights, visible, topk)
    idx_only = ops.indexer_topk(q, k, weights, visible, topk, backend=NP)
    assert torch.equal(idx_only, idx)


def test_indexer_topk_fp8_keys_noncontiguous_q():
    b, s, h, d, n, topk = 1, 5, 3, 16, 12, 4
    q = noncontig(randn(b, s, h, d, seed=20))
    k = (randn(b, n, d, seed=21) * 30).to(torch.float8_e4m3fn)
    k_scale = torch.rand(b, n, generator=gen(22)) + 0.05
    weights = randn(b, s, h, seed=23)
    visible = torch.tensor([[12, 3, 0, 4, 9]], dtype=torch.int32)
    idx, sc = ops.indexer_topk(q, k, weights, visible, topk, k_scale, True, backend=NP)
    check_topk(idx, sc, q, k, weights, visible, topk, k_scale)


def test_indexer_topk_larger_than_keys():
    b, s, h, d, n, topk = 1, 3, 2, 8, 7, 9        # topk > N; no query sees the last 2 keys
    q, k, weights = randn(b, s, h, d, seed=24), randn(b, n, d, seed=25), randn(b, s, h, seed=26)
    visible = torch.tensor([[5, 2, 0]], dtype=torch.int32)
    idx, sc = ops.indexer_topk(q, k, weights, visible, topk, None, True, backend=NP)
    check_topk(idx, sc, q, k, weights, visible, topk)


# ---------------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_compress_overlap(with_prev, dtype, small_budget):
    b, s, d, ratio = 2, 16, 6, 4
    kv, gate = randn(b, s, 2 * d, seed=27).to(dtype), randn(b, s, 2 * d, seed=28, scale=3).to(dtype)
    ape = randn(ratio, 2 * d, seed=29)
    prev = (randn(b, ratio, 2 * d, seed=30), randn(b, ratio, 2 * d, seed=31)) if with_prev else (None, None)
    y = ops.kv_compress(kv, gate, ape, ratio, True, *prev, backend=NP)
    assert_close(y, ref.kv_compress(kv, gate, ape, ratio, True, *prev), torch.float32)


def test_kv_compress_no_overlap_noncontiguous(small_budget):
    b, s, c, ratio = 2, 24, 5, 8
    kv, gate = noncontig(randn(b, s, c, seed=32)), noncontig(randn(b, s, c, seed=33, scale=4))
    ape = randn(ratio, c, seed=34)
    y = ops.kv_compress(kv, gate, ape, ratio, False, backend=NP)
    assert_close(y, ref.kv_compress(kv, gate, ape, ratio, False), torch.float32)


def attention_inputs(dtype, seed):
    b, s, h, d, n, kk = 2, 6, 3, 16, 10, 5
    q = randn(b, s, h, d, seed=seed).to(dtype)
    kv = randn(b, n, d, seed=seed + 1).to(dtype)
    idx = torch.randint(-1, n, (b, s, kk), generator=gen(seed + 2), dtype=torch.int32)
    idx[0, 1] = -1                              # a row with no valid index
    idx[1, 2] = torch.tensor([3, 3, -1, 3, 7])  # duplicates count separately
    sink = randn(h, seed=seed + 3)
    return q, kv, idx, sink


@pytest.mark.parametrize("use_sink", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention(use_sink, dtype, small_budget):
    q, kv, idx, sink = attention_inputs(dtype, 35)
    sink = sink if use_sink else None
    scale = q.shape[-1] ** -0.5
    o, lse = ops.sparse_attention(q, kv, idx, sink, scale, True, backend=NP)
    o_ref, lse_ref = ref.sparse_attention(q, kv, idx, sink, scale, True)
    assert_close(o, o_ref, dtype)
    assert (o[0, 1] == 0).all()
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    fin = torch.isfinite(lse_ref)
    assert torch.allclose(lse[fin].double(), lse_ref[fin], rtol=1e-5, atol=1e-5)
    o2 = ops.sparse_attention(q, kv, idx, sink, scale, backend=NP)
    assert torch.equal(o2, o)


def test_sparse_attention_noncontiguous_all_masked():
    q, kv, idx, sink = attention_inputs(torch.float32, 40)
    q, kv = noncontig(q), noncontig(kv)
    idx = noncontig(idx)
    idx[1] = -1
    o, lse = ops.sparse_attention(q, kv, idx, sink, 0.3, True, backend=NP)
    o_ref, lse_ref = ref.sparse_attention(q, kv, idx, sink, 0.3, True)
    assert_close(o, o_ref, torch.float32)
    assert torch.allclose(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention_decode_long_cache(dtype, small_budget):
    """One query per row over a cache larger than the gathered rows (bf16: gather, then convert)."""
    b, h, d, n, kk = 2, 4, 16, 64, 7
    q, kv = randn(b, 1, h, d, seed=60).to(dtype), randn(b, n, d, seed=61).to(dtype)
    idx = torch.randint(-1, n, (b, 1, kk), generator=gen(62), dtype=torch.int32)
    sink = randn(h, seed=63)
    o, lse = ops.sparse_attention(q, kv, idx, sink, d ** -0.5, True, backend=NP)
    o_ref, lse_ref = ref.sparse_attention(q, kv, idx, sink, d ** -0.5, True)
    assert_close(o, o_ref, dtype)
    assert torch.allclose(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- MoE

@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("topk", [1, 3, 8])
def test_moe_route(use_bias, topk):
    t, e = 7, 8
    logits = randn(t, e, seed=41, scale=4)
    logits[0, :3] = torch.tensor([25.0, 30.0, -15.0])   # softplus linear region and far negative
    bias = randn(e, seed=42, scale=0.5) if use_bias else None
    ids, w = ops.moe_route(logits, bias, topk, 1.5, backend=NP)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == (t, topk)
    sel = ref.moe_scores(logits, bias)
    for ti in range(t):
        chosen = ids[ti].long()
        assert len(set(chosen.tolist())) == topk
        best = torch.sort(sel[ti], descending=True).values[:topk]
        assert torch.allclose(torch.sort(sel[ti, chosen], descending=True).values, best, atol=1e-6)
    assert_close(w, ref.moe_route_weights(logits, ids, 1.5), torch.float32)


@pytest.mark.parametrize("hash_dtype", [torch.int32, torch.int64])
def test_moe_route_hash(hash_dtype):
    t, e, topk = 5, 6, 3
    logits = randn(t, e, seed=43)
    hash_ids = torch.stack([torch.randperm(e, generator=gen(44 + i))[:topk] for i in range(t)]).to(hash_dtype)
    ids, w = ops.moe_route(logits, None, topk, 2.5, "sqrtsoftplus", hash_ids, backend=NP)
    ids_ref, w_ref = ref.moe_route(logits, None, topk, 2.5, hash_ids=hash_ids)
    assert torch.equal(ids, ids_ref)
    assert_close(w, w_ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_moe_dispatch(dtype):
    t, h, topk, e = 6, 5, 2, 5
    x = noncontig(randn(t, h, seed=45).to(dtype))
    ids = torch.tensor([[1, 3], [3, 1], [1, 4], [4, 3], [1, 3], [3, 4]], dtype=torch.int32)  # 0, 2 empty
    xs, off, src = ops.moe_dispatch(x, ids, e, backend=NP)
    xs_ref, off_ref, src_ref = ref.moe_dispatch(x, ids, e)
    assert xs.dtype == dtype and torch.equal(xs.double(), xs_ref)
    assert off.dtype == torch.int32 and torch.equal(off, off_ref)
    assert src.dtype == torch.int32 and torch.equal(src, src_ref)


def test_moe_dispatch_all_to_one_expert():
    x, ids = randn(4, 3, seed=46), torch.full((4, 2), 2, dtype=torch.int32)
    xs, off, src = ops.moe_dispatch(x, ids, 4, backend=NP)
    assert off.tolist() == [0, 0, 0, 8, 8] and src.tolist() == list(range(8))
    assert torch.equal(xs, x.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_moe_combine(weighted, dtype):
    t, h, topk = 5, 7, 3
    y_sorted = noncontig(randn(t * topk, h, seed=47).to(dtype))
    src = torch.randperm(t * topk, generator=gen(48)).to(torch.int32)
    weights = torch.rand(t, topk, generator=gen(49)) if weighted else None
    y = ops.moe_combine(y_sorted, src, weights, None if weighted else topk, backend=NP)
    assert_close(y, ref.moe_combine(y_sorted, src, weights, None if weighted else topk), dtype)


def test_moe_round_trip_through_dispatch_and_combine():
    t, h, topk, e = 9, 4, 2, 6
    logits, x = randn(t, e, seed=50), randn(t, h, seed=51)
    ids, w = ops.moe_route(logits, None, topk, 1.0, backend=NP)
    xs, _, src = ops.moe_dispatch(x, ids, e, backend=NP)
    y = ops.moe_combine(xs, src, w, backend=NP)
    assert_close(y, x * w.sum(dim=1, keepdim=True).double(), torch.float32)


def test_empty_shapes():
    """Zero rows / tokens / keys / index slots: right shapes, nothing left uninitialised."""
    w, s = rand_fp4(n=8, k=64, seed=71)
    assert ops.fp4_gemm(torch.empty(0, 64), w, s, "fp8", backend=NP).shape == (0, 8)
    zero = torch.zeros(3, dtype=torch.int32)
    assert ops.fp4_grouped_gemm(torch.empty(0, 64), w[None].repeat(2, 1, 1), s[None].repeat(2, 1, 1), zero,
                                backend=NP).shape == (0, 8)
    ids, wts = ops.moe_route(torch.empty(0, 8), None, 2, 1.0, backend=NP)
    assert ids.shape == wts.shape == (0, 2)
    xs, off, src = ops.moe_dispatch(torch.empty(0, 4), torch.empty(0, 2, dtype=torch.int32), 3, backend=NP)
    assert xs.shape == (0, 4) and off.tolist() == [0, 0, 0, 0] and src.shape == (0,)
    assert ops.moe_combine(torch.empty(0, 4), src, None, 2, backend=NP).shape == (0, 4)
    q, kv, sink = randn(1, 2, 3, 8, seed=72), randn(1, 4, 8, seed=73), randn(3, seed=74)
    o, lse = ops.sparse_attention(q, kv, torch.empty(1, 2, 0, dtype=torch.int32), sink, 0.5, True, backend=NP)
    assert (o == 0).all() and torch.equal(lse, sink.expand(1, 2, 3))
    idx = ops.indexer_topk(randn(1, 2, 2, 4, seed=75), torch.empty(1, 0, 4), randn(1, 2, 2, seed=76),
                           torch.zeros(1, 2, dtype=torch.int32), 3, backend=NP)
    assert (idx == -1).all()
