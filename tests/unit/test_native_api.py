"""dsv4rt._C as an API: argument checks of the raw functions (clear TypeError / ValueError naming the
function and the argument), the GIL released while kernels run, registration and selection of
cpu/native, and the fallback to cpu/numpy when the extension does not import."""
from __future__ import annotations

import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import dsv4rt
from dsv4rt import ops
from dsv4rt.backend import Registrar
from dsv4rt.backends import cpu
from dsv4rt.registry import REGISTRY

try:
    from dsv4rt import _C
except ImportError as exc:  # pragma: no cover - exercised only where the build failed
    _C = None
    IMPORT_ERROR = str(exc)
    warnings.warn(f"dsv4rt._C is not built, native API tests skipped: {exc}", stacklevel=1)

needs_c = pytest.mark.skipif(_C is None, reason="dsv4rt._C failed to build or import (see warning)")

f32 = np.float32
u8 = np.uint8
i32 = np.int32


def gemm_args(m=2, n=8, k=64):
    return [np.ones((m, k), f32), np.zeros((n, k // 2), u8), np.full((n, k // 32), 127, u8), np.empty((m, n), f32)]


# ---------------------------------------------------------------------------------------------- checks

@needs_c
@pytest.mark.parametrize("pos,value,exc,words", [
    (0, np.ones((2, 64), np.float64), TypeError, ["fp4_gemm", "'x'", "float32", "float64"]),
    (0, [[1.0] * 64] * 2, TypeError, ["fp4_gemm", "'x'", "numpy.ndarray", "list"]),
    (0, np.ones((2, 3, 64), f32), ValueError, ["fp4_gemm", "'x'", "rank 2"]),
    (0, np.ones((2, 128), f32)[:, ::2], ValueError, ["fp4_gemm", "'x'", "C-contiguous"]),
    (0, np.ones((2, 48), f32), ValueError, ["fp4_gemm", "'x'", "multiple of 32"]),
    (1, np.zeros((8, 16), u8), ValueError, ["fp4_gemm", "'w'", "[N, K/2]", "(8, 32)", "(8, 16)"]),
    (1, np.zeros((8, 32), np.int16), TypeError, ["fp4_gemm", "'w'", "uint8"]),
    (2, np.zeros((8, 3), u8), ValueError, ["fp4_gemm", "'w_scale'", "[N, K/32]"]),
    (3, np.empty((2, 9), f32), ValueError, ["fp4_gemm", "'out'", "[M, N]"]),
])
def test_fp4_gemm_argument_errors(pos, value, exc, words):
    args = gemm_args()
    args[pos] = value
    with pytest.raises(exc) as info:
        _C.fp4_gemm(*args)
    assert all(w in str(info.value) for w in words), str(info.value)


@needs_c
def test_read_only_output_and_bad_gemv_threshold():
    args = gemm_args()
    args[3].setflags(write=False)
    with pytest.raises(ValueError, match="'out' must be writable"):
        _C.fp4_gemm(*args)
    with pytest.raises(ValueError, match="gemv_max_m"):
        _C.fp4_gemm(*gemm_args(), -1)


@needs_c
@pytest.mark.parametrize("offsets,words", [
    ([1, 2, 4], "must start at 0"), ([0, 3, 2], "non-decreasing"), ([0, 1, 3], "must end at R"),
])
def test_grouped_offsets_errors(offsets, words):
    x, out = np.ones((4, 64), f32), np.empty((4, 8), f32)
    w, s = np.zeros((2, 8, 32), u8), np.full((2, 8, 2), 127, u8)
    with pytest.raises(ValueError, match=words) as info:
        _C.fp4_grouped_gemm(x, w, s, np.array(offsets, i32), out)
    assert "fp4_grouped_gemm" in str(info.value) and "'offsets'" in str(info.value)
    with pytest.raises(TypeError, match="'offsets' must have dtype int32"):
        _C.fp4_grouped_gemm(x, w, s, np.array([0, 2, 4], np.int64), out)


@needs_c
def test_indexer_attention_and_moe_argument_errors():
    q, k = np.zeros((1, 2, 4, 32), f32), np.zeros((1, 16, 32), f32)
    w, vis = np.zeros((1, 2, 4), f32), np.array([[3, 16]], i32)
    idx = np.empty((1, 2, 4), i32)
    with pytest.raises(ValueError, match="indexer_topk: argument 'k_scale'"):
        _C.indexer_topk(q, k.astype(u8), None, w, vis, 4, idx)
    with pytest.raises(ValueError, match="indexer_topk: argument 'k' must have shape"):
        _C.indexer_topk(q, k[:, :, :16].copy(), None, w, vis, 4, idx)
    with pytest.raises(ValueError, match="argument 'topk' must be >= 1"):
        _C.indexer_topk(q, k, None, w, vis, 0, idx)
    with pytest.raises(TypeError, match="indexer_topk: argument 'q' must have dtype"):
        _C.indexer_topk(q.astype(np.float64), k, None, w, vis, 4, idx)

    o = np.empty((1, 2, 4, 32), f32)
    bad = np.array([[[0, 16, -1]] * 2], i32)
    with pytest.raises(ValueError, match="sparse_attention: argument 'idx' entries must be -1 or in"):
        _C.sparse_attention(q, k, bad, None, 0.1, o)
    with pytest.raises(ValueError, match="sparse_attention: argument 'scale'"):
        _C.sparse_attention(q, k, np.zeros((1, 2, 3), i32), None, 0.0, o)
    with pytest.raises(ValueError, match="sparse_attention: argument 'sink' must have shape"):
        _C.sparse_attention(q, k, np.zeros((1, 2, 3), i32), np.zeros(3, f32), 0.1, o)

    x, ids = np.zeros((3, 8), np.uint16), np.array([[0, 1], [2, 4], [1, 1]], i32)
    outs = (np.empty((6, 8), np.uint16), np.empty(5, i32), np.empty(6, i32))
    with pytest.raises(ValueError, match="moe_dispatch: argument 'ids' entries must be in"):
        _C.moe_dispatch(x, ids, 4, *outs)
    with pytest.raises(TypeError, match="moe_dispatch: argument 'x_sorted' must have x's element size"):
        _C.moe_dispatch(x, ids % 4, 4, np.empty((6, 8), f32), *outs[1:])
    y = np.zeros((6, 8), f32)
    with pytest.raises(ValueError, match="moe_combine: argument 'src' must be a permutation"):
        _C.moe_combine(y, np.array([0, 1, 2, 3, 4, 4], i32), None, 2, np.empty((3, 8), f32))
    with pytest.raises(ValueError, match="moe_combine: argument 'src' entries must be in"):
        _C.moe_combine(y, np.array([0, 1, 2, 3, 4, 6], i32), None, 2, np.empty((3, 8), f32))


@needs_c
def test_set_isa_and_build_facts():
    info = _C.compiled_with()
    assert info["cxx_standard"] >= 201703 and isinstance(info["openmp"], bool) and info["threads"] >= 1
    before = _C.set_isa("generic")
    try:
        assert _C.compiled_with()["active_isa"] == "generic"
    finally:
        _C.set_isa(before)
    with pytest.raises(ValueError, match="set_isa"):
        _C.set_isa("sse9")



@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [128, 32])
def test_act_quant_bit_identical_to_formats(dtype, block):
    """_C.act_quant_fp8 (the GEMMs' act_quant='fp8') gives the bits of q * s of formats.act_quant_fp8: partial
    last block, blocks below the 1e-4 amax floor, huge and subnormal values, values that saturate, NaN and
    Inf blocks."""
    from dsv4rt.formats import act_quant_fp8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 300, generator=g) * torch.logspace(-8, 8, 300).float()
    x[1, :128] *= 1e-9                                  # amax under the floor
    x[2, 7] = 1e-40                                     # float32 subnormal
    x[3, 130] = float("nan")
    x[4, 260] = float("inf")
    x[5, 0] = 3e38
    x = x.to(dtype)
    out = np.full(x.shape, np.nan, f32)
    _C.act_quant_fp8(x.view(torch.int16).numpy() if dtype == torch.bfloat16 else x.numpy(), out, block)
    with np.errstate(invalid="ignore"):                  # the Inf block: inf / inf and 0 * inf
        q, sc = act_quant_fp8(x.float().numpy(), block)
        want = q * np.repeat(sc, block, axis=1)[:, :300]
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)                       # NaN payloads may differ, positions not
    assert np.array_equal(out[~nan].view(np.uint32), want[~nan].astype(f32).view(np.uint32))
    nan3 = slice(128, 256) if block == 128 else slice(128, 160)     # the block holding x[3, 130]
    nan4 = slice(256, 300) if block == 128 else slice(256, 288)     # the block holding x[4, 260]
    assert np.isnan(out[3, nan3]).all() and np.isnan(out[4, nan4]).all() and not np.isnan(out[0]).any()
    if block == 32:
        assert not np.isnan(out[3, 160:]).any() and not np.isnan(out[4, 288:]).any()
    with pytest.raises(ValueError, match="act_quant_fp8: argument 'out'"):
        _C.act_quant_fp8(np.zeros((2, 4), f32), np.zeros((2, 5), f32))
    with pytest.raises(ValueError, match="act_quant_fp8: argument 'block'"):
        _C.act_quant_fp8(np.zeros((2, 4), f32), np.zeros((2, 4), f32), 64)


@needs_c
def test_ceiling_probes():
    """The bench's CPU ceilings: positive rates, vdpbf16ps only where the CPU has AVX512-BF16, bad arguments
    named."""
    assert _C.peak_gflops("fp32", 1 << 12) > 0
    if _C.compiled_with()["active_isa"] == "avx512_bf16":
        assert _C.peak_gflops("bf16", 1 << 12) > 0
    else:
        with pytest.raises(ValueError, match="needs AVX512-BF16"):
            _C.peak_gflops("bf16", 1 << 12)
    with pytest.raises(ValueError, match="peak_gflops: argument 'kind'"):
        _C.peak_gflops("fp64")
    with pytest.raises(ValueError, match="peak_gflops: argument 'iters'"):
        _C.peak_gflops("fp32", 0)
    assert _C.read_gbps(np.ones(1 << 20, np.uint8)) > 0
    with pytest.raises(TypeError, match="read_gbps: argument 'buf'"):
        _C.read_gbps(np.ones(16, f32))

# ---------------------------------------------------------------------------------------------- GIL

@needs_c
def test_kernels_release_the_gil():
    """While one long kernel call runs on another thread, this thread keeps executing Python (impossible
    if the call held the GIL); and two GEMVs on two Python threads at once finish with the serial results."""
    rng = np.random.default_rng(0)
    n, k = 4096, 4096
    w = rng.integers(0, 256, (n, k // 2), dtype=u8)
    s = rng.integers(118, 127, (n, k // 32), dtype=u8)
    x = rng.standard_normal((512, k), dtype=f32)          # blocked path: ~17 GFLOP, tens of ms here
    out = np.empty((512, n), f32)
    span: dict[str, float] = {}

    def one_call():
        span["start"] = time.perf_counter()
        _C.fp4_gemm(x, w, s, out)
        span["end"] = time.perf_counter()

    ticks: list[float] = []
    th = threading.Thread(target=one_call)
    th.start()
    while th.is_alive():
        ticks.append(time.perf_counter())
    th.join()
    duration = span["end"] - span["start"]
    lo, hi = span["start"] + 0.1 * duration, span["end"] - 0.1 * duration
    inside = sum(1 for t in ticks if lo < t < hi)
    assert inside > 100, f"{inside} Python iterations ran during the middle of a {duration * 1e3:.1f} ms kernel call"

    xv = rng.standard_normal((1, k), dtype=f32)
    want = np.empty((1, n), f32)
    _C.fp4_gemm(xv, w, s, want)
    outs = [np.empty((1, n), f32) for _ in range(2)]
    workers = [threading.Thread(target=_C.fp4_gemm, args=(xv, w, s, o)) for o in outs]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
        assert not t.is_alive(), "concurrent GEMV calls deadlocked"
    for o in outs:
        np.testing.assert_array_equal(o, want)


@needs_c
def test_threading_modes_give_identical_results():
    """Every output element is computed by one task whatever thread runs it: the pool, OpenMP and the
    automatic mode agree bit for bit (and each runs the calls on several threads without deadlock)."""
    rng = np.random.default_rng(1)
    w = rng.integers(0, 256, (2048, 512), dtype=u8)
    s = rng.integers(118, 127, (2048, 32), dtype=u8)
    q = rng.standard_normal((1, 1, 64, 256), dtype=f32)
    kv = rng.standard_normal((1, 900, 256), dtype=f32)
    idx = rng.integers(-1, 900, (1, 1, 512), dtype=i32)

    def run():
        outs = []
        for m in (1, 32):
            y = np.empty((m, 2048), f32)
            _C.fp4_gemm(np.ascontiguousarray(rng.standard_normal((m, 1024), dtype=f32) * 0 + 0.5), w, s, y)
            outs.append(y)
        o, lse = np.empty((1, 1, 64, 256), f32), np.empty((1, 1, 64), f32)
        _C.sparse_attention(q, kv, idx, None, 0.0625, o, lse)
        top = np.empty((1, 1, 64), i32)
        _C.indexer_topk(q[:, :, :, :128].copy(), kv[:, :, :128].copy(), None, np.ones((1, 1, 64), f32),
                        np.array([[900]], i32), 64, top)
        return outs + [o, lse, top]

    modes = ["pool"] + (["openmp", "automatic"] if _C.compiled_with()["openmp"] else [])
    before = _C.compiled_with()["threading"]
    try:
        results = {}
        for mode in modes:
            _C.set_threading(mode)
            results[mode] = run()
    finally:
        _C.set_threading(before)
    for mode in modes[1:]:
        for a, b in zip(results[modes[0]], results[mode]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="set_threading"):
        _C.set_threading("fibers")


# ---------------------------------------------------------------------------------------------- registry

@needs_c
def test_native_registered_above_numpy_and_chosen():
    b = cpu.backend()
    probe = b.probe()
    assert probe.capabilities["native"] is True and "dsv4rt._C loaded" in probe.capabilities["native_reason"]
    reg = Registrar(b, list(REGISTRY.specs))
    b.load(reg)
    native = {i.op: i for i in reg.implementations if i.variant == "native"}
    assert set(native) == set(cpu.NATIVE_OPS)
    assert all(i.priority == cpu.NATIVE_PRIORITY > cpu.NUMPY_PRIORITY and i.requires == {"native"}
               and i.supports is not None for i in native.values())
    x = torch.randn(2, 64)
    w = torch.zeros(8, 32, dtype=torch.uint8)
    s = torch.full((8, 2), 127, dtype=torch.uint8)
    assert ops.fp4_gemm.resolve(x, w, s).name == "cpu/native"


@needs_c
def test_supports_refuses_a_large_float16_cache():
    from dsv4rt.backends.cpu import native

    args = {"q": torch.zeros(1, 1, 2, 16, dtype=torch.float16), "kv": torch.zeros(1, 1000, 16, dtype=torch.float16),
            "idx": torch.zeros(1, 1, 4, dtype=torch.int32), "sink": None, "scale": 0.25, "return_lse": False}
    assert "float16" in native.SUPPORTS["sparse_attention"](args)
    assert ops.sparse_attention.resolve(**args).name == "cpu/numpy"
    args["kv"] = args["kv"].float()
    args["q"] = args["q"].float()
    assert native.SUPPORTS["sparse_attention"](args) is None


@pytest.fixture
def without_c(monkeypatch):
    """dsv4rt._C made unimportable (as if the build had failed), and a fresh cpu backend in the registry."""
    monkeypatch.delattr(dsv4rt, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "dsv4rt._C", None)      # import raises ImportError
    monkeypatch.delitem(sys.modules, "dsv4rt.backends.cpu.native", raising=False)
    REGISTRY.add_backend(cpu.backend(), replace=True)
    dsv4rt.refresh()
    yield
    monkeypatch.undo()
    REGISTRY.add_backend(cpu.backend(), replace=True)
    dsv4rt.refresh()


def test_fallback_when_the_extension_is_missing(without_c):
    b = cpu.backend()
    probe = b.probe()
    assert probe.available, "the cpu backend must stay available without its native kernels"
    assert probe.capabilities["native"] is False
    assert "dsv4rt._C does not import" in probe.capabilities["native_reason"]
    assert "import of dsv4rt._C halted" in probe.capabilities["native_reason"]      # the import error text
    reg = Registrar(b, list(REGISTRY.specs))
    b.load(reg)
    assert not [i for i in reg.implementations if i.variant == "native"]
    assert {i.op for i in reg.implementations if i.variant == "numpy"} == set(REGISTRY.specs)

    x = torch.randn(2, 64)
    w = torch.zeros(8, 32, dtype=torch.uint8)
    s = torch.full((8, 2), 127, dtype=torch.uint8)
    assert ops.fp4_gemm.resolve(x, w, s).name == "cpu/numpy"
    assert torch.equal(ops.fp4_gemm(x, w, s), torch.zeros(2, 8))
    from dsv4rt.info import diagnose, format_info

    text = format_info(diagnose())
    assert "native=False" in text and "dsv4rt._C does not import" in text
