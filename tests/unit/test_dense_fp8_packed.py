"""``_C.dense_fp8_pack`` / ``_C.dense_fp8_packed`` (csrc/dense_fp8_packed.cpp): a weight kept in its released FP8
form gives, bit for bit, ``dense_gemm`` on its bf16 dequantisation, for every row count, both block sizes,
N and K with partial tiles, -0 weight bytes and zeros in x; the pack refuses (None) what would not dequantise
exactly (a NaN byte, a scale byte outside [10, 246]); bad arguments are errors that name them.

Skipped, saying so, where the kernel does not run (no dsv4rt._C, or a CPU without AVX512-BF16 + VBMI)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4rt.formats import dequant_fp8_block

try:
    from dsv4rt import _C
except ImportError:  # pragma: no cover - the extension was not built
    _C = None


def _runs() -> bool:
    if _C is None or not hasattr(_C, "dense_fp8_packed"):
        return False
    w = np.zeros((8, 32), np.uint8)
    packed = _C.dense_fp8_pack(w, np.full((1, 1), 127, np.uint8), 128)
    return bool(_C.dense_fp8_packed(np.zeros((1, 32), np.int16), *packed, 8, np.zeros((1, 8), np.int16)))


pytestmark = pytest.mark.skipif(not _runs(), reason="SKIPPED: dense_fp8_packed needs dsv4rt._C and a CPU with "
                                                     "AVX512-BF16 and AVX512-VBMI")


def _weight(n: int, k: int, bs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (n, k), dtype=torch.int32, generator=g).to(torch.uint8)
    w[(w & 0x7F) == 0x7F] = 0x80                          # no NaN byte; more -0 bytes
    s = torch.randint(100, 150, (-(-n // bs), -(-k // bs)), dtype=torch.int32, generator=g).to(torch.uint8)
    return w, s


def _bf16(w: torch.Tensor, s: torch.Tensor, bs: int) -> torch.Tensor:
    return dequant_fp8_block(w.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu), bs,
                             torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("n,k,bs", [(1024, 512, 128), (40, 200, 32), (136, 384, 128), (64, 96, 32), (8, 32, 128)])
def test_bits_equal_dense_gemm_on_the_bf16_dequantisation(n: int, k: int, bs: int) -> None:
    w, s = _weight(n, k, bs, n + k)
    wb = _bf16(w, s, bs)
    wp, off = _C.dense_fp8_pack(w.numpy(), s.numpy(), bs)
    assert wp.dtype == np.uint8 and wp.nbytes == -(-n // 8) * -(-k // 32) * 256     # 1 byte a value, padded
    g = torch.Generator().manual_seed(k)
    for m in (1, 2, 4, 5, 9):
        x = (torch.randn(m, k, generator=g) * 2).bfloat16()
        x[:, ::7] = 0
        ref = torch.empty(m, n, dtype=torch.bfloat16)
        _C.dense_gemm(x.view(torch.int16).numpy(), wb.view(torch.int16).numpy(), ref.view(torch.int16).numpy())
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16)      # poisoned
        assert _C.dense_fp8_packed(x.view(torch.int16).numpy(), wp, off, n, out.view(torch.int16).numpy())
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), m


def test_pack_refuses_what_would_not_dequantise_exactly() -> None:
    w, s = _weight(16, 64, 32, 1)
    assert _C.dense_fp8_pack(w.numpy(), s.numpy(), 32) is not None
    for bad in (9, 247, 255):
        s2 = s.clone()
        s2[0, 1] = bad
        assert _C.dense_fp8_pack(w.numpy(), s2.numpy(), 32) is None, bad
    w2 = w.clone()
    w2[3, 5] = 0xFF                                         # E4M3 NaN
    assert _C.dense_fp8_pack(w2.numpy(), s.numpy(), 32) is None


def test_bad_arguments_name_themselves() -> None:
    w, s = _weight(16, 64, 32, 2)
    with pytest.raises(ValueError, match="block_size"):
        _C.dense_fp8_pack(w.numpy(), s.numpy(), 64)
    with pytest.raises(ValueError, match="w_scale"):
        _C.dense_fp8_pack(w.numpy(), s[:, :1].numpy().copy(), 32)
    wp, off = _C.dense_fp8_pack(w.numpy(), s.numpy(), 32)
    x = np.zeros((1, 96), np.int16)
    with pytest.raises(ValueError, match="w_packed"):
        _C.dense_fp8_packed(x, wp, off, 16, np.zeros((1, 16), np.int16))
    with pytest.raises(ValueError, match="offsets"):
        _C.dense_fp8_packed(np.zeros((1, 64), np.int16), wp, off.astype(np.int32), 16, np.zeros((1, 16), np.int16))
