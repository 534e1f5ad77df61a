"""The batch-invariant mode's MXFP4 kernel for few rows (csrc/fp4_few_avx512.cpp, 1-4 rows per expert, and
bf16_rows.cpp gemm_few above): bit for bit the blocked AVX512-BF16 GEMM's result, which the mode gives 9 and
more rows. Each row computed in a call of 1..8 rows must equal the same row computed among 64 rows, for odd N
(a last 16-column group of 1..15 columns), K with a partial last 128-block (K % 128 = 32, 64, 96, K < 128),
raw random bytes (every E2M1 code, -0 included), scales on both sides of 127, x with zeros, bf16 or float32
input, act_quant on or off, plain and grouped.

On CPUs without AVX512-BF16 and AVX512-VBMI these kernels do not run; the module is skipped, saying so (the
invariance itself is tested on every CPU by test_batch_invariant_kernels.py).
"""
from __future__ import annotations

import pytest
import torch

from dsv4rt import invariant, ops

try:
    from dsv4rt import _C
    from dsv4rt.backends.cpu import native_isa_cap
except ImportError:  # pragma: no cover - the extension was not built
    _C = None


def _cpu_has_few_kernel() -> bool:
    if _C is None or _C.compiled_with()["isa"] != "avx512_bf16":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512vbmi " in f.read().replace("\n", " ")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _cpu_has_few_kernel(),
                                reason="SKIPPED: the few-rows FP4 kernel needs dsv4rt._C and a CPU with "
                                       "AVX512-BF16 and AVX512-VBMI")

FULL = 64   # rows of the reference call: the blocked GEMM (above the few-rows limit of 8)


@pytest.fixture(autouse=True)
def _mode():
    with invariant.mode(True), native_isa_cap("avx512_bf16"):
        yield


def _weight(e: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw random codes (all 16, -0 included) and E8M0 bytes 100..150 (scales 2^-27 .. 2^23)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    s = torch.randint(100, 151, (e, n, k // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return w, s


def _x(m: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows of bf16 values (float32 or bf16), about one value in 16 zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[torch.rand(m, k, generator=g) < 1 / 16] = 0.0
    return x.to(torch.bfloat16).to(dtype)


SHAPES = [(61, 544), (100, 4096 + 96), (47, 160), (33, 96), (1, 128), (16, 1056), (200, 256)]


@pytest.mark.parametrize("n,k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_fp4_gemm_few_rows_equal_the_blocked_gemm_bits(n, k, dtype, act_quant):
    w, s = _weight(1, n, k, seed=n + k)
    x = _x(FULL, k, seed=k, dtype=dtype)
    full = ops.fp4_gemm(x, w[0], s[0], act_quant, backend="cpu/native")
    assert torch.isfinite(full).all()
    for m in range(1, 9):
        for r0 in (0, FULL - m):
            y = ops.fp4_gemm(x[r0:r0 + m], w[0], s[0], act_quant, backend="cpu/native")
            assert torch.equal(y, full[r0:r0 + m]), f"M={m} rows {r0}..{r0 + m}"


def test_fp4_grouped_gemm_few_rows_equal_the_blocked_gemm_bits():
    """Experts of 0..8 rows in one call against each expert's rows computed among 64."""
    e, n, k = 5, 77, 640 + 32
    w, s = _weight(e, n, k, seed=7)
    counts = [1, 0, 3, 8, 4]
    x = _x(sum(counts), k, seed=8, dtype=torch.bfloat16)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    y = ops.fp4_grouped_gemm(x, w, s, offsets, "fp8", backend="cpu/native")
    pad = _x(FULL, k, seed=9, dtype=torch.bfloat16)
    for i, c in enumerate(counts):
        if c == 0:
            continue
        rows = torch.cat([x[offsets[i]:offsets[i + 1]], pad[c:]])
        full = ops.fp4_gemm(rows, w[i], s[i], "fp8", backend="cpu/native")
        assert torch.equal(y[offsets[i]:offsets[i + 1]], full[:c]), f"expert {i} ({c} rows)"
