"""cpu/native (the C++ kernels of dsv4rt._C) against the float64 reference, through ``dsv4rt.ops.X(...,
backend="cpu/native")``, on seeded random inputs, with the spec tolerances of the conformance suite.

Every test runs once per instruction-set path: the hand-written AVX-512 kernels where the CPU has them and
the portable path (``_C.set_isa("generic")``). The GEMMs also run with the GEMV / blocked split forced
both ways (batch-invariant mode off) and in the batch-invariant mode. Skipped, with the import error as the
reason, when the extension was not built.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import dsv4rt.reference as ref
from dsv4rt import invariant, ops
from dsv4rt.backend import poisoned_outputs
from dsv4rt.conformance import tolerance as tol

try:
    from dsv4rt import _C
except ImportError as exc:  # pragma: no cover - exercised only where the build failed
    warnings.warn(f"dsv4rt._C is not built, native kernel tests skipped: {exc}", stacklevel=1)
    pytest.skip(f"dsv4rt._C failed to build or import: {exc}", allow_module_level=True)

from dsv4rt.backends.cpu import native, native_isa_cap  # noqa: E402  (native needs _C)

NATIVE = "cpu/native"
# the hand-written paths up to what this CPU has: portable, AVX-512, AVX-512 + AVX512-BF16 (blocked GEMMs)
ISAS = {"generic": ["generic"], "avx2": ["generic"], "avx512": ["generic", "avx512"],
        "avx512_bf16": ["generic", "avx512", "avx512_bf16"]}[_C.compiled_with()["isa"]]


@pytest.fixture(params=ISAS, autouse=True)
def isa(request):
    """Run every test on each instruction-set path the CPU offers; outputs poisoned (NaN / sentinels)."""
    with native_isa_cap(request.param), poisoned_outputs():
        yield request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_fp4(*lead: int, n: int, k: int, seed: int, lo: int = 118, hi: int = 134):
    g = gen(seed)
    w = torch.randint(0, 256, (*lead, n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    s = torch.randint(lo, hi, (*lead, n, k // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return w, s


@contextlib.contextmanager
def gemm_path(path: str, monkeypatch, attr: str, gemv: int):
    """'gemv' / 'blocked': the batch-invariant mode off and the split forced through ``native.<attr>``
    (``gemv`` rows and fewer take the GEMV); 'invariant': the mode on."""
    if path != "invariant":
        monkeypatch.setattr(native, attr, gemv if path == "gemv" else 0)
    with invariant.mode(path == "invariant"):
        yield


def check(fn, op: str, args: dict, outs) -> None:
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = getattr(ref, op)(**args)
    refs = refs if isinstance(refs, tuple) else (refs,)
    result = fn(op, args, outs, refs)
    assert result.passed, f"{op}: {result.message} (max abs {result.max_abs:.3g}, tolerance {result.tolerance})"


# ---------------------------------------------------------------------------------------------- GEMMs

@pytest.mark.parametrize("path", ["gemv", "blocked", "invariant"])
@pytest.mark.parametrize("m,n,k", [(1, 40, 416), (3, 64, 512), (8, 33, 96), (9, 70, 640), (64, 96, 1024),
                                   (1, 256, 4096), (5, 32, 32)])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_fp4_gemm(m, n, k, act_quant, path, monkeypatch):
    x = (torch.randn(m, k, generator=gen(m * 7 + k)) * 2).to(torch.bfloat16)
    w, s = rand_fp4(n=n, k=k, seed=n + k)
    args = {"x": x, "w": w, "w_scale": s, "act_quant": act_quant}
    with gemm_path(path, monkeypatch, "GEMV_MAX_M", 1 << 30):
        check(tol.gemm, "fp4_gemm", args, ops.fp4_gemm(**args, backend=NATIVE))


@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("wkind", ["int8", "float4"])
def test_fp4_gemm_dtypes_views_and_extreme_scales(xdtype, wkind):
    m, n, k = 6, 48, 384
    x = torch.randn(m, 2 * k, generator=gen(1)).to(xdtype)[:, ::2]           # non-contiguous activations
    w, s = rand_fp4(n=n, k=k, seed=2, lo=1, hi=12)                            # subnormal-range scales
    wv = {"int8": w.view(torch.int8), "float4": w.view(torch.float4_e2m1fn_x2)}[wkind]
    args = {"x": x, "w": wv, "w_scale": s.view(torch.float8_e8m0fnu), "act_quant": None}
    out = ops.fp4_gemm(**args, backend=NATIVE)
    check(tol.gemm, "fp4_gemm", dict(args, w=w, w_scale=s), out)
    big_w, big_s = rand_fp4(n=n, k=k, seed=3, lo=0, hi=4)                     # scale byte 0 = 2^-127
    args = {"x": x, "w": big_w, "w_scale": big_s, "act_quant": None}
    check(tol.gemm, "fp4_gemm", args, ops.fp4_gemm(**args, backend=NATIVE))


@pytest.mark.parametrize("m", [1, 5])
def test_fp4_gemm_tiny_and_huge_activations(m):
    """Activations spanning 2^-110 .. 2^100 (no flush-to-zero or overflow in the float32 paths)."""
    k, n = 256, 32
    x = torch.randn(m, k, generator=gen(9))
    x[:, ::3] *= 1e-33
    x[:, 1::7] *= 1e30
    w, s = rand_fp4(n=n, k=k, seed=10, lo=100, hi=150)
    args = {"x": x, "w": w, "w_scale": s, "act_quant": None}
    check(tol.gemm, "fp4_gemm", args, ops.fp4_gemm(**args, backend=NATIVE))


def test_fp4_gemm_empty_shapes():
    w, s = rand_fp4(n=16, k=64, seed=4)
    y = ops.fp4_gemm(torch.randn(0, 64), w, s, None, backend=NATIVE)
    assert y.shape == (0, 16)
    y = ops.fp4_gemm(torch.randn(3, 0), torch.zeros(5, 0, dtype=torch.uint8), torch.zeros(5, 0, dtype=torch.uint8),
                     None, backend=NATIVE)
    assert torch.equal(y, torch.zeros(3, 5))


@pytest.mark.parametrize("path", ["gemv", "blocked", "invariant"])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_fp4_grouped_gemm(act_quant, path, monkeypatch):
    counts = [0, 3, 0, 12, 1, 0, 20, 0]
    e, n, k = len(counts), 48, 256
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(sum(counts), k, generator=gen(5)).to(torch.bfloat16)
    w, s = rand_fp4(e, n=n, k=k, seed=6)
    args = {"x": x, "w": w, "w_scale": s, "offsets": offsets, "act_quant": act_quant}
    with gemm_path(path, monkeypatch, "GEMV_MAX_M", 4):   # gemv: experts of <= 4 rows
        check(tol.gemm, "fp4_grouped_gemm", args, ops.fp4_grouped_gemm(**args, backend=NATIVE))


@pytest.mark.parametrize("m", range(2, 9))
@pytest.mark.parametrize("n,k", [(37, 416), (5, 160), (70, 32)])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_fp4_gemm_few_rows(m, n, k, act_quant, monkeypatch):
    """Few rows on the GEMV side (with AVX512-BF16 + VBMI: the bf16 lane kernel), odd N, K % 128 tails, and
    weight rows whose scale bytes (0, 1, 253, 254) leave the lane kernel's exact range for the float32 GEMV."""
    x = (torch.randn(m, k, generator=gen(m * 11 + k)) * 2.0**-12).to(torch.bfloat16)   # 2^126 w: no overflow
    w, s = rand_fp4(n=n, k=k, seed=n * 3 + k)
    s[1::4, -1] = torch.tensor([0, 1, 253, 254], dtype=torch.uint8).repeat(n)[:s[1::4].shape[0]]
    args = {"x": x, "w": w, "w_scale": s, "act_quant": act_quant}
    with gemm_path("gemv", monkeypatch, "GEMV_MAX_M", 8):
        check(tol.gemm, "fp4_gemm", args, ops.fp4_gemm(**args, backend=NATIVE))
        offsets = torch.tensor([0, 1, 1, m], dtype=torch.int32)
        w3, s3 = torch.stack([w, w.flip(0), w.roll(1, 0)]), torch.stack([s, s.flip(0), s.roll(1, 0)])
        gargs = {"x": x, "w": w3, "w_scale": s3, "offsets": offsets, "act_quant": act_quant}
        check(tol.gemm, "fp4_grouped_gemm", gargs, ops.fp4_grouped_gemm(**gargs, backend=NATIVE))


def _has_cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def test_fp4_lane_rows_do_not_depend_on_m(isa, monkeypatch):
    """The bf16 lane kernel (2 or more rows) sums every output in one order whatever the number of rows: a
    row's bits at M = 2..8 are those it gets among 8 rows, in any order (in-range scales, bf16 x; the float32
    GEMV makes no such promise)."""
    if isa != "avx512_bf16" or not _has_cpu_flag("avx512vbmi"):
        pytest.skip(f"the lane kernel needs AVX512-BF16 and AVX512-VBMI (this run: {isa}, VBMI "
                    f"{_has_cpu_flag('avx512vbmi')})")
    k, n = 544, 45
    x = (torch.randn(8, k, generator=gen(12)) * 2).to(torch.bfloat16)
    w, s = rand_fp4(n=n, k=k, seed=13)
    with gemm_path("gemv", monkeypatch, "GEMV_MAX_M", 8):
        full = ops.fp4_gemm(x, w, s, None, backend=NATIVE)
        assert torch.equal(ops.fp4_gemm(x.flip(0), w, s, None, backend=NATIVE), full.flip(0))
        for m in range(2, 8):
            assert torch.equal(ops.fp4_gemm(x[8 - m:], w, s, None, backend=NATIVE), full[8 - m:]), f"M = {m}"


@pytest.mark.parametrize("grouped", [False, True])
def test_fp4_invariant_rows_off_the_bf16_path(grouped):
    """Batch-invariant mode, rows that leave the bf16 numerics (float32 x that is not bf16, and a row of tiny
    values): a row's bits are those it gets alone, at every M up to past the few-rows limit."""
    k, n = 416, 37
    x = torch.randn(12, k, generator=gen(14))
    x[3] = x[3].to(torch.bfloat16).float() * 2.0**-110
    w, s = rand_fp4(n=n, k=k, seed=15)
    def run(rows: torch.Tensor) -> torch.Tensor:
        if not grouped:
            return ops.fp4_gemm(rows, w, s, None, backend=NATIVE)
        off = torch.tensor([0, rows.shape[0]], dtype=torch.int32)
        return ops.fp4_grouped_gemm(rows, w[None], s[None], off, None, backend=NATIVE)
    with invariant.mode(True):
        alone = torch.cat([run(x[i:i + 1]) for i in range(12)])
        for m in (2, 3, 8, 12):
            assert torch.equal(run(x[:m]), alone[:m]), f"M = {m}"


def test_gemv_matches_blocked_path_closely(monkeypatch):
    """The two GEMM paths agree to float32 rounding (same products, different summation order)."""
    x = torch.randn(8, 1024, generator=gen(7))
    w, s = rand_fp4(n=64, k=1024, seed=8)
    with gemm_path("gemv", monkeypatch, "GEMV_MAX_M", 8):
        a = ops.fp4_gemm(x, w, s, None, backend=NATIVE)
    with gemm_path("blocked", monkeypatch, "GEMV_MAX_M", 8):
        b = ops.fp4_gemm(x, w, s, None, backend=NATIVE)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


# ---------------------------------------------------------------------------------------------- indexer

def _indexer_args(b, s, h, d, n, topk, seed, dtype=torch.bfloat16, fp8=False, scores=False, visible=None):
    g = gen(seed)
    q = torch.randn(b, s, h, d, generator=g).to(dtype)
    if fp8:
        k = (torch.randn(b, n, d, generator=g) * 8).clamp(-440, 440).to(torch.float8_e4m3fn)
        k_scale = torch.rand((b, n), generator=g) * 0.1 + 0.01
    else:
        k, k_scale = torch.randn(b, n, d, generator=g).to(dtype), None
    vis = visible if visible is not None else torch.randint(0, n + 1, (b, s), generator=g, dtype=torch.int32)
    return {"q": q, "k": k, "weights": torch.randn((b, s, h), generator=g), "visible": vis, "topk": topk,
            "k_scale": k_scale, "return_scores": scores}


@pytest.mark.parametrize("case", [
    dict(b=2, s=1, h=64, d=128, n=700, topk=64),                   # decode: key tiles split over threads
    dict(b=1, s=40, h=8, d=64, n=300, topk=32, scores=True),      # prefill: query groups over threads
    dict(b=2, s=5, h=5, d=36, n=50, topk=60),                      # topk > N, odd head count and D
    dict(b=1, s=3, h=16, d=32, n=90, topk=8, dtype=torch.float32, scores=True),
    dict(b=1, s=3, h=8, d=64, n=200, topk=16, fp8=True, scores=True),
    dict(b=1, s=2, h=4, d=32, n=0, topk=4),                        # no keys at all
])
def test_indexer_topk(case):
    args = _indexer_args(seed=11, **case)
    outs = ops.indexer_topk(**args, backend=NATIVE)
    check(tol.topk, "indexer_topk", args, outs)
    idx = outs[0] if isinstance(outs, tuple) else outs
    vis = args["visible"].clamp(0, args["k"].shape[1])
    assert torch.equal((idx >= 0).sum(-1), vis.clamp(max=args["topk"]))      # valid first, -1 after


def test_indexer_topk_visible_zero_and_full_rows():
    n = 64
    vis = torch.tensor([[0, 1, n, 17]], dtype=torch.int32)
    args = _indexer_args(1, 4, 4, 32, n, 8, seed=12, visible=vis, scores=True)
    idx, sc = ops.indexer_topk(**args, backend=NATIVE)
    assert (idx[0, 0] == -1).all() and torch.isinf(sc[0, 0]).all()
    assert idx[0, 1, 0] == 0 and (idx[0, 1, 1:] == -1).all()
    check(tol.topk, "indexer_topk", args, (idx, sc))


# ---------------------------------------------------------------------------------------------- attention

@pytest.mark.parametrize("case", [
    dict(b=1, s=1, h=64, d=512, n=900, k=640),                     # decode: heads split over threads
    dict(b=2, s=6, h=8, d=64, n=80, k=40, lse=True),
    dict(b=1, s=4, h=20, d=72, n=50, k=130, sink=False, lse=True),  # D not a multiple of 16, H % 16 != 0
    dict(b=1, s=3, h=4, d=64, n=60, k=32, dtype=torch.float32, lse=True),
    dict(b=1, s=2, h=4, d=32, n=30, k=16, qscale=30.0, lse=True),  # large logits
    dict(b=1, s=3, h=4, d=32, n=20, k=16, dtype=torch.float16),     # float16: widened, output via scratch
])
def test_sparse_attention(case):
    b, s, h, d, n, k = (case[x] for x in "bshdnk")
    dtype, g = case.get("dtype", torch.bfloat16), gen(13)
    idx = torch.randint(0, n, (b, s, k), generator=g, dtype=torch.int32)
    idx[torch.rand((b, s, k), generator=g) < 0.2] = -1
    idx[0, 0] = -1                                                  # one row with no valid index
    args = {"q": (torch.randn(b, s, h, d, generator=g) * case.get("qscale", 1.0)).to(dtype),
            "kv": torch.randn(b, n, d, generator=g).to(dtype), "idx": idx,
            "sink": torch.randn(h, generator=g) if case.get("sink", True) else None, "scale": d ** -0.5,
            "return_lse": case.get("lse", False)}
    outs = ops.sparse_attention(**args, backend=NATIVE)
    check(tol.attention, "sparse_attention", args, outs)
    o = outs[0] if isinstance(outs, tuple) else outs
    assert (o[0, 0] == 0).all()


# ---------------------------------------------------------------------------------------------- MoE

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn])
def test_moe_dispatch_exact(dtype):
    g = gen(14)
    t, h, e, k = 37, 48, 16, 6
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    ids[3] = 5                                                      # duplicates inside one token
    xs, off, src = ops.moe_dispatch(x, ids, e, backend=NATIVE)
    _, want_off, want_src = ref.moe_dispatch(x.float() if dtype == torch.float8_e4m3fn else x, ids, e)
    assert torch.equal(off, want_off) and torch.equal(src, want_src)
    rows = x[want_src.long() // k]                                  # bit-exact row moves, any dtype
    assert xs.dtype == dtype and torch.equal(xs.view(torch.uint8), rows.view(torch.uint8))


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_moe_combine(weighted, dtype):
    g = gen(15)
    t, h, k = 23, 72, 6
    args = {"y_sorted": torch.randn(t * k, h, generator=g).to(dtype),
            "src": torch.randperm(t * k, generator=g).to(torch.int32),
            "weights": torch.rand((t, k), generator=g) if weighted else None, "topk": None if weighted else k}
    check(tol.combine, "moe_combine", args, ops.moe_combine(**args, backend=NATIVE))


def test_moe_round_trip_with_no_tokens():
    x = torch.zeros(0, 8, dtype=torch.bfloat16)
    xs, off, src = ops.moe_dispatch(x, torch.zeros(0, 2, dtype=torch.int32), 4, backend=NATIVE)
    assert xs.shape == (0, 8) and off.tolist() == [0] * 5 and src.shape == (0,)
    y = ops.moe_combine(xs, src, None, 2, backend=NATIVE)
    assert y.shape == (0, 8) and y.dtype == torch.bfloat16


def rand_fp8(n: int, k: int, seed: int, f32_scale: bool = False):
    """E4M3 weights (finite bytes, NaN patterns 0x7F/0xFF excluded) and 128x128 block scales."""
    g = gen(seed)
    b = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32)
    b = torch.where((b & 0x7F) == 0x7F, b - 1, b).to(torch.uint8)
    sn, sk = -(-n // 128), -(-k // 128)
    s = (torch.rand(sn, sk, generator=g) * 0.01 + 1e-3) if f32_scale else \
        torch.randint(118, 127, (sn, sk), generator=g, dtype=torch.uint8)
    return b.view(torch.float8_e4m3fn), s


@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (3, 200, 300), (8, 129, 128), (9, 64, 256), (40, 64, 520),
                                   (16, 48, 128), (33, 130, 129), (70, 100, 384), (64, 7, 1001), (2, 50, 1001)])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
@pytest.mark.parametrize("f32_scale", [False, True])
@pytest.mark.parametrize("path", ["gemv", "blocked", "invariant"])
def test_fp8_gemm(m, n, k, act_quant, f32_scale, path, monkeypatch):
    x = torch.randn(m, k, generator=gen(m * 5 + k)).to(torch.bfloat16)
    w, s = rand_fp8(n, k, seed=n + k, f32_scale=f32_scale)
    args = {"x": x, "w": w, "w_scale": s, "act_quant": act_quant}
    with gemm_path(path, monkeypatch, "FP8_GEMV_MAX_M", 1 << 30):
        check(tol.gemm, "fp8_gemm", args, ops.fp8_gemm(**args, backend=NATIVE))


@pytest.mark.parametrize("m,xdtype", [(3, torch.float32), (20, torch.bfloat16), (1, torch.bfloat16),
                                      (4, torch.bfloat16)])
def test_fp8_gemm_nan_weight_bytes_and_subnormals(m, xdtype):
    """E4M3 NaN bytes (0x7F / 0xFF) make their columns NaN on every path (the AVX-512 decode has no NaN,
    those blocks take the table; the bf16 tile decode sets NaN); E4M3 subnormals decode exactly."""
    w, s = rand_fp8(64, 384, seed=3)
    b = w.view(torch.uint8).clone()
    b[5, 130], b[40, 383] = 0x7F, 0xFF
    b[7, :128] = torch.arange(128, dtype=torch.uint8) % 8          # every subnormal and zero
    args = {"x": torch.randn(m, 384, generator=gen(4)).to(xdtype), "w": b.view(torch.float8_e4m3fn), "w_scale": s,
            "act_quant": None}
    y = ops.fp8_gemm(**args, backend=NATIVE)
    assert y.isnan().any(0).nonzero().flatten().tolist() == [5, 40]
    keep = [i for i in range(64) if i not in (5, 40)]
    clean = dict(args, w=b[keep].view(torch.float8_e4m3fn), w_scale=s)
    check(tol.gemm, "fp8_gemm", clean, ops.fp8_gemm(**clean, backend=NATIVE))



def rand_fp8_blocks(n: int, k: int, seed: int, bs: int, scales: str):
    """E4M3 weights (finite) and bs x bs scales: 'e8m0' bytes 118..126, 'f32' float32, 'low' bytes 1..12 (no
    exact bf16 fold: the blocked path declines), 'wide' bytes up to 250 (scale * 256 overflows float32)."""
    w, _ = rand_fp8(n, k, seed)
    g = gen(seed + 1)
    sn, sk = -(-n // bs), -(-k // bs)
    lo, hi = {"e8m0": (118, 127), "low": (1, 13), "wide": (240, 251)}.get(scales, (0, 0))
    s = torch.rand(sn, sk, generator=g) * 0.01 + 1e-3 if scales == "f32" else \
        torch.randint(lo, hi, (sn, sk), generator=g, dtype=torch.int32).to(torch.uint8)
    return w, s


@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (2, 70, 300), (4, 40, 1280), (9, 64, 256), (40, 96, 520),
                                   (33, 130, 129), (64, 7, 1001)])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
@pytest.mark.parametrize("scales", ["e8m0", "f32", "low", "wide"])
@pytest.mark.parametrize("path", ["gemv", "blocked", "invariant"])
def test_fp8_gemm_block32(m, n, k, act_quant, scales, path, monkeypatch):
    """block_size=32 (V4.1): the block-32 GEMV, the blocked AVX512-BF16 GEMM with the E8M0 scales folded into
    the weights, its refusal where folding is not exact (float32 scales, bytes outside [10, 246]: the GEMV
    runs), the two-step scaling where scale * 256 overflows, ragged N and K (K % 32 != 0 too)."""
    x = torch.randn(m, k, generator=gen(m * 3 + k)).to(torch.bfloat16)
    if scales == "wide":
        x = (x.float() * 2.0**-100).to(torch.bfloat16)   # keeps 448 * 2^123 * x finite
    w, s = rand_fp8_blocks(n, k, n + k, 32, scales)
    args = {"x": x, "w": w, "w_scale": s, "act_quant": act_quant, "block_size": 32}
    with gemm_path(path, monkeypatch, "FP8_GEMV_MAX_M", 1 << 30):
        check(tol.gemm, "fp8_gemm", args, ops.fp8_gemm(**args, backend=NATIVE))


@pytest.mark.parametrize("m", [1, 3, 20])
def test_fp8_gemm_block32_nan_codes_and_row_blocks(m):
    """block_size=32: NaN bytes make their column NaN (GEMV table chunks, bf16 decode); each 32-row block of
    N has its own scales (a weight whose rows differ only by scale row gives scaled outputs)."""
    w, s = rand_fp8_blocks(96, 320, 5, 32, "e8m0")
    b = w.view(torch.uint8).clone()
    b[5, 33], b[70, 319] = 0x7F, 0xFF
    args = {"x": torch.randn(m, 320, generator=gen(6)).bfloat16(), "w": b.view(torch.float8_e4m3fn), "w_scale": s,
            "act_quant": "fp8", "block_size": 32}
    y = ops.fp8_gemm(**args, backend=NATIVE)
    assert y.isnan().any(0).nonzero().flatten().tolist() == [5, 70]
    b[32:64] = b[0:32]
    s2 = s.clone()
    s2[1] = s2[0] + 2                                     # rows 32..63: the weights of rows 0..31 times 4
    y = ops.fp8_gemm(**dict(args, w=b.view(torch.float8_e4m3fn), w_scale=s2), backend=NATIVE).float()
    ok = [i for i in range(32) if i != 5]
    torch.testing.assert_close(y[:, [i + 32 for i in ok]], 4 * y[:, ok], rtol=2**-7, atol=0)


@pytest.mark.parametrize("path", ["gemv", "blocked", "invariant"])
@pytest.mark.parametrize("grouped", [False, True])
def test_fp4_gemm_act_block32(path, grouped, monkeypatch):
    """act_block_size=32: activation scales per 32 k. An outlier at k = 0 with a zero weight there makes
    1x128 blocks round the rest of the first 128 k to zero, so the wrong block size cannot pass."""
    m, n, k = 12, 64, 352
    x = torch.randn(m, k, generator=gen(21)).bfloat16()
    x[:, 0] = 2.0**20
    w, s = rand_fp4(*((3,) if grouped else ()), n=n, k=k, seed=22)
    w[..., 0] &= 0xF0
    args = {"x": x, "w": w, "w_scale": s, "act_quant": "fp8", "act_block_size": 32}
    op = "fp4_grouped_gemm" if grouped else "fp4_gemm"
    if grouped:
        args["offsets"] = torch.tensor([0, 5, 5, m], dtype=torch.int32)
    with gemm_path(path, monkeypatch, "GEMV_MAX_M", 1 << 30):
        y = getattr(ops, op)(**args, backend=NATIVE)
    check(tol.gemm, op, args, y)
    wrong = getattr(ref, op)(**dict(args, act_block_size=128))
    assert not tol.gemm(op, args, (wrong.float(),), (getattr(ref, op)(**args),)).passed


@pytest.mark.parametrize("case", ["f32-exact", "f32-inexact", "bf16-subnormal", "bf16-tiny", "f32-nan-inf", "fp16"])
def test_fp8_gemm_activations_that_leave_the_bf16_path(case):
    """The blocked AVX512-BF16 path takes x only where it is exactly bf16 and its products with the weights
    stay normal (vdpbf16ps reads subnormals as zero and flushes subnormal products); float32 x that is not
    bf16, bf16 subnormals, x so small that products would be subnormal, NaN / Inf and float16 x all give
    the reference's result within tolerance (another path where needed)."""
    m, n, k = 24, 96, 384
    x = torch.randn(m, k, generator=gen(11))
    if case == "f32-exact":
        x = x.to(torch.bfloat16).float()
    elif case == "bf16-subnormal":
        x = x.to(torch.bfloat16)
        x[3, 7] = 1e-39                                                 # a bf16 subnormal
    elif case == "bf16-tiny":
        x = (x * 2.0**-118).to(torch.bfloat16)                          # normal, but x * 2^-9 is not
    elif case == "f32-nan-inf":
        x[2, 5], x[9, 200] = float("nan"), float("inf")
    elif case == "fp16":
        x = x.to(torch.float16)
    w, s = rand_fp8(n, k, seed=12)
    args = {"x": x, "w": w, "w_scale": s, "act_quant": None}
    y = ops.fp8_gemm(**args, backend=NATIVE)
    if case == "f32-nan-inf":
        r = ref.fp8_gemm(**args)
        assert torch.equal(y.isnan(), r.isnan()) and torch.equal(y.isinf(), r.isinf())
        rows = [i for i in range(m) if i not in (2, 9)]
        args = dict(args, x=x[rows])
        y = y[rows]
    check(tol.gemm, "fp8_gemm", args, y)

# ---------------------------------------------------------------------------------------------- kv_compress / moe_route

@pytest.mark.parametrize("ratio,overlap,prev", [(4, True, False), (4, True, True), (128, False, False), (8, False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_compress(ratio, overlap, prev, dtype):
    g = gen(ratio * 7 + prev)
    b, nb, d = 2, 3, 24
    c = 2 * d if overlap else d
    args = {"kv": torch.randn(b, nb * ratio, c, generator=g).to(dtype),
            "gate": (torch.randn(b, nb * ratio, c, generator=g) * 3).to(dtype),
            "ape": torch.randn(ratio, c, generator=g), "ratio": ratio, "overlap": overlap,
            "prev_kv": torch.randn(b, ratio, c, generator=g).to(dtype) if prev else None,
            "prev_gate": torch.randn(b, ratio, c, generator=g).to(dtype) if prev else None}
    check(tol.pooling, "kv_compress", args, ops.kv_compress(**args, backend=NATIVE))


@pytest.mark.parametrize("ratio,gated,overlap,d", [(2, True, False, 512), (2, True, False, 37),
                                                   (1, False, False, 40), (1, True, False, 24), (4, True, True, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_compress_without_ape_or_gate(ratio, gated, overlap, d, dtype):
    """V4.1: ratio 2 without ape (the vector and the scalar channel tails), ratio 1 without a gate (the rows
    themselves); an overlapping call without ape too."""
    g = gen(ratio * 11 + d)
    b, nb = 2, 3
    c = 2 * d if overlap else d
    args = {"kv": torch.randn(b, nb * ratio, c, generator=g).to(dtype),
            "gate": (torch.randn(b, nb * ratio, c, generator=g) * 3).to(dtype) if gated else None,
            "ape": None, "ratio": ratio, "overlap": overlap,
            "prev_kv": torch.randn(b, ratio, c, generator=g).to(dtype) if overlap else None,
            "prev_gate": torch.randn(b, ratio, c, generator=g).to(dtype) if overlap else None}
    out = ops.kv_compress(**args, backend=NATIVE)
    check(tol.pooling, "kv_compress", args, out)
    if not gated:
        assert torch.equal(out, args["kv"].float())


@pytest.mark.parametrize("t,e,k,bias,lo", [(1, 256, 6, True, 0.0), (37, 64, 8, False, 0.0), (5, 16, 16, True, 0.0),
                                           (9, 256, 40, True, 0.0), (4, 32, 6, True, -150.0)])
def test_moe_route(t, e, k, bias, lo):
    """Score routing incl. top-k > 32 (the partial-sort path) and logits where sqrt(softplus) underflows."""
    g = gen(t + e + k)
    args = {"logits": torch.randn(t, e, generator=g) * 2 + lo, "bias": torch.randn(e, generator=g) * 0.1 if bias else None,
            "topk": k, "route_scale": 2.5, "score_func": "sqrtsoftplus", "hash_ids": None}
    ids, w = ops.moe_route(**args, backend=NATIVE)
    check(tol.route, "moe_route", args, (ids, w))
    assert bool(torch.isfinite(w).all())


def test_moe_route_hash_ids():
    g = gen(3)
    hid = torch.randint(0, 64, (7, 6), generator=g)
    args = {"logits": torch.randn(7, 64, generator=g), "bias": None, "topk": 6, "route_scale": 1.0,
            "score_func": "sqrtsoftplus", "hash_ids": hid}
    ids, w = ops.moe_route(**args, backend=NATIVE)
    assert torch.equal(ids.long(), hid)
    check(tol.route, "moe_route", args, (ids, w))
