"""cpu/native fp8_gemm in the batch-invariant mode at prefill sizes: every row's bits equal its M = 1 result.

With AVX512-BF16 + VBMI, more than 8 rows take the lane kernel's tiled path (a weight tile decoded once for many
rows); with E8M0 scales that tile holds the weights times their block scales, which gives the M = 1 bits only
while nothing underflows or overflows (fp8_gemm.cpp's fold_exact, per row). The cases cross that rule: typical
scales (folded), scale bytes near the top of the range with one large row (that row unfolded), bytes down to
10 with every other row large (those fold, the rest would flush subnormal sums: the tile mixes both), bytes below 10
(no fold at all), float32 scales (no fold), one row so small that folded products would be subnormal, a NaN
weight byte (its tile unfolded); block 128 and 32, odd N tails, K not a multiple of 64. On other CPUs the same
comparisons check the mode's other paths.
"""
from __future__ import annotations

import pytest
import torch

from dsv4rt import invariant, ops

try:
    from dsv4rt import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extension was not built
    pytest.skip(f"dsv4rt._C failed to build or import: {exc}", allow_module_level=True)

NATIVE = "cpu/native"
SCALE_BYTES = {"typical": (110, 130), "wide": (200, 247), "small": (10, 40), "low": (5, 20)}


def _weight(n: int, k: int, bs: int, scales: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0
    b[n // 2, k - 3] = 0x7F          # one NaN byte: its column is NaN, its tile is decoded without the fold
    sn, sk = -(-n // bs), -(-k // bs)
    if scales == "f32":
        s = torch.rand(sn, sk, generator=g) * 0.01 + 1e-3
    else:
        lo, hi = SCALE_BYTES[scales]
        s = torch.randint(lo, hi, (sn, sk), generator=g, dtype=torch.int32).to(torch.uint8)
    return b.view(torch.float8_e4m3fn), s


def _rows(m: int, k: int, seed: int, scales: str) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    if scales == "small":   # scales down to 2^-117: the large rows fold, the others would underflow folded
        x[1::2] *= 2.0 ** 30
    if scales == "wide":    # scales up to 2^119: these rows fold and stay finite; row 9 below overflows (inf / NaN)
        x *= 2.0 ** -20
    x[7] *= 2.0 ** -90      # products with the smallest weights and scales fall below the fold's normal range
    x[9] *= 2.0 ** 40       # with scale bytes near 246 a block's folded chain could overflow: unfolded
    x[11, ::3] = 0.0
    return x.to(torch.bfloat16).float()   # bf16 values, float32 out: every bit of the sums is compared


@pytest.mark.parametrize("block_size", [128, 32])
@pytest.mark.parametrize("n,k", [(131, 1000), (97, 2048), (64, 130)])
@pytest.mark.parametrize("scales", ["typical", "wide", "small", "low", "f32"])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_fp8_gemm_prefill_rows_have_their_m1_bits(block_size, n, k, scales, act_quant):
    w, s = _weight(n, k, block_size, scales, seed=n + k)
    x = _rows(200, k, seed=k, scales=scales)
    with invariant.mode(True):
        full = ops.fp8_gemm(x, w, s, act_quant, block_size, backend=NATIVE)
        rest = torch.cat([full[:9], full[10:]]) if scales == "wide" else full
        assert full[:, n // 2].isnan().all() and not rest[:, : n // 2].isnan().any()
        for m in (3, 64):
            assert torch.equal(ops.fp8_gemm(x[:m], w, s, act_quant, block_size, backend=NATIVE).view(torch.int32),
                               full[:m].view(torch.int32)), f"M={m}"
        for r in (0, 5, 7, 9, 11, 63, 64, 150, 199):
            one = ops.fp8_gemm(x[r:r + 1], w, s, act_quant, block_size, backend=NATIVE)
            assert torch.equal(one.view(torch.int32), full[r:r + 1].view(torch.int32)), f"row {r}"
