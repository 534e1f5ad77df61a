"""The batch-invariant mode (dsv4rt.invariant) kernel by kernel: a row's output is bit-identical whether it
is computed alone or with other rows (M = 1, 7, 64; an expert's rows going from 1 to 63; decode attention
with 1 or 9 rows), on every CPU backend and every native instruction-set path.

Without the mode these comparisons fail on CPUs with AVX512-BF16 (the native GEMMs take a GEMV below a few
rows and a blocked vdpbf16ps GEMM above; BLAS picks its kernel by M).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from dsv4rt import invariant, ops
from dsv4rt.formats import quant_mxfp4

try:
    from dsv4rt import _C
    from dsv4rt.backends.cpu import native_isa_cap
    ISAS = {"generic": ["generic"], "avx2": ["generic"], "avx512": ["generic", "avx512"],
            "avx512_bf16": ["generic", "avx512", "avx512_bf16"]}[_C.compiled_with()["isa"]]
except ImportError:  # pragma: no cover - the extension was not built: only the NumPy / torch backends
    _C, ISAS = None, []

GEMM_BACKENDS = (["cpu/native"] if _C is not None else []) + ["cpu/numpy", "cpu/torch"]
SIZES = (1, 7, 64)


@pytest.fixture(autouse=True)
def _mode():
    with invariant.mode(True):
        yield


def _isa(backend: str, isa: str | None):
    return native_isa_cap(isa) if backend == "cpu/native" and isa else contextlib.nullcontext()


def _cases(backend: str) -> list[tuple[str, str | None]]:
    return [(backend, isa) for isa in ISAS] if backend == "cpu/native" else [(backend, None)]


CASES = [c for b in GEMM_BACKENDS for c in _cases(b)]
IDS = [f"{b}-{i}" if i else b for b, i in CASES]


def _rows(n: int, k: int, seed: int, dtype: torch.dtype | str) -> torch.Tensor:
    """Random rows; dtype "bf16-values": float32 holding bf16 values (float32 outputs show every rounding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * 3
    return x.to(torch.bfloat16).float() if dtype == "bf16-values" else x.to(dtype)


def _fp8_weight(n: int, k: int, seed: int, bs: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.float8_e4m3fn)
    s = torch.randint(118, 130, (-(-n // bs), -(-k // bs)), generator=g, dtype=torch.int32).to(torch.uint8)
    return w, s.view(torch.float8_e8m0fnu)


def _fp4_weight(e: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pairs = [quant_mxfp4(torch.randn(n, k, generator=g) * 0.1) for _ in range(e)]
    return torch.stack([w for w, _ in pairs]), torch.stack([s for _, s in pairs])


@pytest.mark.parametrize("backend,isa", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, "bf16-values", torch.float32])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_fp8_gemm_row_does_not_depend_on_m(backend, isa, dtype, act_quant):
    w, s = _fp8_weight(200, 384, seed=1)
    x = _rows(64, 384, seed=2, dtype=dtype)
    if dtype == torch.float32:
        x[5, 7] = 1.0000001   # a row whose values are not bf16: it takes another path, on its own
    with _isa(backend, isa):
        full = ops.fp8_gemm(x, w, s, act_quant, backend=backend)
        for m in SIZES:
            assert torch.equal(ops.fp8_gemm(x[:m], w, s, act_quant, backend=backend), full[:m]), f"M={m}"
        assert torch.equal(ops.fp8_gemm(x[5:6], w, s, act_quant, backend=backend), full[5:6])


@pytest.mark.parametrize("backend,isa", CASES, ids=IDS)
@pytest.mark.parametrize("block_size", [128, 32])
@pytest.mark.parametrize("k", [384, 1001])
def test_fp8_gemm_row_does_not_depend_on_m_with_mixed_rows(backend, isa, block_size, k):
    """Rows that leave the bf16 numerics (not bf16 values; products that would be subnormal) sit between rows
    that keep them: every row's bits are those it gets alone, for both block sizes, K not a multiple of 32, and
    M past the row tiles (1, 7 rows: the GEMV; 64: the tiled many-rows path of the native lane kernel)."""
    w, s = _fp8_weight(200, k, seed=3, bs=block_size)
    x = _rows(64, k, seed=4, dtype="bf16-values")
    x[9, 11] = 1.0000001                                     # not a bf16 value
    x[20] = (x[20] * 2.0**-110).to(torch.bfloat16).float()   # bf16, but x * 2^-9 would be subnormal
    with _isa(backend, isa):
        full = ops.fp8_gemm(x, w, s, None, block_size, backend=backend)
        for m in SIZES:
            assert torch.equal(ops.fp8_gemm(x[:m], w, s, None, block_size, backend=backend), full[:m]), f"M={m}"
        for r in (9, 20, 63):
            assert torch.equal(ops.fp8_gemm(x[r:r + 1], w, s, None, block_size, backend=backend), full[r:r + 1]), r


@pytest.mark.parametrize("backend,isa", CASES, ids=IDS)
@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_fp4_gemm_row_does_not_depend_on_m(backend, isa, act_quant):
    w, s = _fp4_weight(1, 96, 512, seed=3)
    x = _rows(64, 512, seed=4, dtype="bf16-values")
    with _isa(backend, isa):
        full = ops.fp4_gemm(x, w[0], s[0], act_quant, backend=backend)
        for m in SIZES:
            assert torch.equal(ops.fp4_gemm(x[:m], w[0], s[0], act_quant, backend=backend), full[:m]), f"M={m}"


@pytest.mark.parametrize("backend,isa", CASES, ids=IDS)
def test_fp4_grouped_gemm_row_does_not_depend_on_its_experts_rows(backend, isa):
    """The same token row with 0, 5 or 62 other rows routed to its expert, and other experts busy or idle."""
    e, n, k = 4, 64, 256
    w, s = _fp4_weight(e, n, k, seed=5)
    x = _rows(64, k, seed=6, dtype="bf16-values")
    probe = x[:1]
    outs = []
    with _isa(backend, isa):
        for others, counts in ((0, [0, 1, 0, 0]), (5, [3, 6, 0, 0]), (62, [0, 63, 1, 0])):
            rows = torch.cat([x[1:1 + counts[0]], probe, x[1 + counts[0]:counts[0] + counts[1]],
                              x[40:40 + counts[2] + counts[3]]])
            offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
            y = ops.fp4_grouped_gemm(rows, w, s, offsets, "fp8", backend=backend)
            outs.append(y[counts[0]])
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.skipif(_C is None, reason="dsv4rt._C is not built")
@pytest.mark.parametrize("isa", ISAS)
def test_native_decode_attention_row_does_not_depend_on_the_other_rows(isa):
    """A decode row with 700 valid entries (split over threads in pieces) alone and among 8 other rows."""
    g = torch.Generator().manual_seed(7)
    h, d, n = 8, 64, 1024
    kv = torch.randn(1, n, d, generator=g).to(torch.bfloat16)
    q = torch.randn(1, 9, h, d, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, n, (1, 9, 800), generator=g, dtype=torch.int32)
    idx[:, :, 700:] = -1
    idx[:, 3:, 300:] = -1
    sink = torch.randn(h, generator=g)
    with native_isa_cap(isa):
        full = ops.sparse_attention(q, kv, idx, sink, 0.125, backend="cpu/native")
        alone = ops.sparse_attention(q[:, :1], kv, idx[:, :1], sink, 0.125, backend="cpu/native")
    assert torch.equal(alone[0, 0], full[0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native", [True, False], ids=["dense_gemm", "rowwise"])
def test_linear_row_does_not_depend_on_m(dtype, native, monkeypatch):
    if native and _C is None:
        pytest.skip("dsv4rt._C is not built")
    if not native:
        monkeypatch.setattr(invariant, "_native", lambda: None)
    w = _rows(300, 1000, seed=8, dtype=dtype)
    x = _rows(64, 1000, seed=9, dtype=dtype)
    full = invariant.linear(x, w)
    assert full.dtype == dtype and full.shape == (64, 300)
    for m in SIZES:
        assert torch.equal(invariant.linear(x[:m], w), full[:m]), f"M={m}"
    ref = x.double() @ w.double().T
    assert float((full.double() - ref).abs().max()) <= 1e-2 * float(ref.abs().max())


@pytest.mark.skipif(_C is None, reason="dsv4rt._C is not built")
def test_dense_gemm_gives_the_same_bits_on_every_isa():
    w = _rows(70, 333, seed=10, dtype=torch.float32)
    x = _rows(9, 333, seed=11, dtype=torch.float32)
    outs = []
    for isa in ISAS:
        with native_isa_cap(isa):
            outs.append(invariant.linear(x, w))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_pointwise_element_does_not_depend_on_the_size():
    x = torch.linspace(-30, 30, 1000)
    full = invariant.pointwise(torch.sigmoid, x)
    for n in (1, 5, 33, 100, 999):
        assert torch.equal(invariant.pointwise(torch.sigmoid, x[:n]), full[:n]), f"n={n}"


def test_mode_is_per_thread_and_falls_back_to_the_environment(monkeypatch):
    import threading

    import dsv4rt

    monkeypatch.setenv("DSV4RT_BATCH_INVARIANT", "0")
    dsv4rt.refresh()
    try:
        with invariant.mode(None):
            assert not invariant.enabled()
            with invariant.mode(True):
                assert invariant.enabled() and invariant.active(torch.zeros(1))
                seen = []
                t = threading.Thread(target=lambda: seen.append(invariant.enabled()))
                t.start()
                t.join()
                assert seen == [False]          # another thread: the environment's setting
    finally:
        monkeypatch.delenv("DSV4RT_BATCH_INVARIANT")
        dsv4rt.refresh()


def test_linear_refuses_mixed_dtypes_and_shapes():
    with pytest.raises(TypeError, match="invariant.linear: x is torch.bfloat16 but w is torch.float32"):
        invariant.linear(torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"expected x \[\.\.\., K\] and w \[N, K\]"):
        invariant.linear(torch.zeros(2, 4), torch.zeros(3, 5))
