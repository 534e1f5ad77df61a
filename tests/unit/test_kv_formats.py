"""V4.1 KV-cache formats (dsv4rt.formats pack/unpack_kv_fp8 / _fp4) against an independent float64 model
of the official quantisers (act_quant block 32 UE8M0; fp4_act_quant block 16 with E4M3 scales)."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

import dsv4rt.formats as F

E4M3_ALL = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
E2M1_ALL = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)


def nearest_even(v: float, grid: np.ndarray, codes: np.ndarray) -> int:
    """Code of the grid value nearest to v (ties to the even code), searched exhaustively in float64."""
    dist = np.abs(grid - v)
    best = np.flatnonzero(dist == dist.min())
    even = [c for c in codes[best] if c % 2 == 0]
    return int(even[0] if even else codes[best][0])


POS_E4M3 = np.array([c for c in range(0x7F)])          # 0x00..0x7E: every finite non-negative E4M3
POS_E2M1 = np.arange(8)


def model_fp8(row: np.ndarray) -> np.ndarray:
    """float64 model of act_quant(x, 32, ue8m0) QDQ: power-of-two scale from float32 amax * float32(1/448)."""
    out = np.empty(row.shape, np.float64)
    for g in range(0, row.size, 32):
        x = row[g:g + 32].astype(np.float64)
        y = float(np.float32(max(np.abs(x).max(), np.float32(1e-4))) * np.float32(1 / 448))
        s = 2.0 ** math.ceil(math.log2(y))
        for i, v in enumerate(x):
            q = min(max(v / s, -448.0), 448.0)
            c = nearest_even(abs(q), E4M3_ALL[POS_E4M3], POS_E4M3)
            out[g + i] = math.copysign(E4M3_ALL[c], q) * s
    return out


def model_fp4(row: np.ndarray) -> np.ndarray:
    """float64 model of fp4_act_quant(x, 16, e4m3) QDQ: s = E4M3(float32(max(amax, 6*2^-9) / 6))."""
    out = np.empty(row.shape, np.float64)
    for g in range(0, row.size, 16):
        x = row[g:g + 16].astype(np.float32)
        amax = max(float(np.abs(x).max()), 6 * 2.0 ** -9)
        s = E4M3_ALL[nearest_even(min(float(np.float32(amax) / np.float32(6)), 448.0), E4M3_ALL[POS_E4M3], POS_E4M3)]
        for i, v in enumerate(x):
            q = min(max(float(np.float32(v) / np.float32(s)), -6.0), 6.0)
            out[g + i] = math.copysign(E2M1_ALL[nearest_even(abs(q), E2M1_ALL[POS_E2M1], POS_E2M1)], q) * s
    return out


def rows(seed: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.randn(n, 1, generator=g) * 4)                  # rows from ~1e-7 to ~1e7
    x = torch.randn(n, d, generator=g) * mag
    x[0, :16] = 0.0                                                       # an all-zero group: the amax floors
    x[1, :32] = 1e-7                                                      # below both floors
    return x.bfloat16()


def test_bytes_per_row_at_512():
    x = torch.randn(3, 512).bfloat16()
    assert F.pack_kv_fp8(x).shape == (3, 528) and F.pack_kv_fp8(x).dtype == torch.uint8
    assert F.pack_kv_fp4(x).shape == (3, 288) and F.pack_kv_fp4(x).dtype == torch.uint8
    assert F.pack_kv_fp8(x).element_size() * 528 == 528 and F.kv_fp8_row_bytes(512) == 528
    assert F.kv_fp4_row_bytes(512) == 288


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_matches_float64_model(seed):
    x = rows(seed, 6, 64)
    got8, got4 = F.unpack_kv_fp8(F.pack_kv_fp8(x)), F.unpack_kv_fp4(F.pack_kv_fp4(x))
    for r in range(x.shape[0]):
        xr = x[r].float().numpy()
        np.testing.assert_array_equal(got8[r].numpy().astype(np.float64), model_fp8(xr))
        np.testing.assert_array_equal(got4[r].numpy().astype(np.float64), model_fp4(xr))


def test_torch_and_numpy_give_the_same_bytes():
    x = rows(3, 32, 512)
    for pack in (F.pack_kv_fp8, F.pack_kv_fp4):
        np.testing.assert_array_equal(pack(x).numpy(), pack(x.float().numpy()))


def test_qdq_is_exact_in_bf16_and_idempotent():
    x = rows(4, 16, 512)
    for qdq in (F.qdq_kv_fp8, F.qdq_kv_fp4):
        y = qdq(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y.float(), (F.unpack_kv_fp8 if qdq is F.qdq_kv_fp8 else F.unpack_kv_fp4)(
            (F.pack_kv_fp8 if qdq is F.qdq_kv_fp8 else F.pack_kv_fp4)(x)))
    assert torch.equal(F.qdq_kv_fp4(F.qdq_kv_fp4(x)), F.qdq_kv_fp4(x))
    assert torch.equal(F.qdq_kv_fp8(F.qdq_kv_fp8(x)), F.qdq_kv_fp8(x))


def test_every_e4m3_code_decodes():
    packed = np.zeros((8, 264), np.uint8)
    packed[:, :256] = np.arange(2048).reshape(8, 256) % 256
    packed[:, 256:] = 127                                                 # scale 2^0
    got = F.unpack_kv_fp8(packed).reshape(-1)[:256]
    want = E4M3_ALL.astype(np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got).sum() == 2   # 0x7F, 0xFF
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
    packed[:, 256:] = 130                                                 # scale 2^3
    np.testing.assert_array_equal(F.unpack_kv_fp8(packed).reshape(-1)[:126], want[:126] * 8)


def test_every_e2m1_code_decodes():
    codes = np.arange(16, dtype=np.uint8)
    packed = np.concatenate([codes[0::2] | (codes[1::2] << 4), [0x38]]).astype(np.uint8)   # E4M3 0x38 = 1.0
    np.testing.assert_array_equal(F.unpack_kv_fp4(packed), E2M1_ALL.astype(np.float32))
    packed[-1] = 0x01                                                     # 2^-9, the smallest E4M3 scale
    np.testing.assert_array_equal(F.unpack_kv_fp4(packed), (E2M1_ALL * 2.0 ** -9).astype(np.float32))


def test_amax_floors():
    z = torch.zeros(1, 32)
    p8, p4 = F.pack_kv_fp8(z), F.pack_kv_fp4(z)
    # fp8: s = 2^ceil(log2(1e-4 / 448)) = 2^-22; fp4: s = E4M3(2^-9) = byte 0x01 (nonzero even for zeros)
    assert p8[0, 32].item() == 127 - 22 and p4[0, 16:].tolist() == [0x01, 0x01]
    assert torch.equal(F.unpack_kv_fp8(p8), z) and torch.equal(F.unpack_kv_fp4(p4), z)
    tiny = torch.full((1, 32), 2.0 ** -12)
    assert torch.equal(F.unpack_kv_fp8(F.pack_kv_fp8(tiny)), tiny)        # s = 2^-20: 2^-12 is code 256 exactly
    below = F.unpack_kv_fp8(F.pack_kv_fp8(torch.full((1, 32), 1e-5)))
    assert torch.equal(below, torch.full((1, 32), 40 * 2.0 ** -22))      # floor 1e-4: s = 2^-22, 41.9 -> 40
    tiny4 = F.unpack_kv_fp4(F.pack_kv_fp4(torch.full((1, 16), 2.0 ** -12)))
    assert torch.equal(tiny4, torch.zeros(1, 16))                         # 2^-12 / 2^-9 = 0.125 rounds to 0


def test_ties_round_to_even():
    s = 1.0                                                               # group amax 6 -> s = E4M3(1.0)
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 0, 0, 0, 0, 0]])
    want = torch.tensor([[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -4.0, 0, 0, 0, 0, 0]]) * s
    assert torch.equal(F.unpack_kv_fp4(F.pack_kv_fp4(x)), want)
    # E4M3 ties under a 2^0 scale (amax 448): 17 lies between 16 and 18, 19 between 18 and 20
    x8 = torch.zeros(1, 32)
    x8[0, :4] = torch.tensor([448.0, 17.0, 19.0, 0.5 + 2.0 ** -5])
    assert F.unpack_kv_fp8(F.pack_kv_fp8(x8))[0, :4].tolist() == [448.0, 16.0, 20.0, 0.5]


def test_non_finite_groups():
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    y8 = F.unpack_kv_fp8(F.pack_kv_fp8(x))
    assert torch.isnan(y8[0, :32]).all() and torch.isfinite(y8[0, 32:]).all()
    assert torch.isnan(y8[1, 32:]).all() and torch.isfinite(y8[1, :32]).all()
    y4 = F.unpack_kv_fp4(F.pack_kv_fp4(x))
    assert torch.isnan(y4[0, :16]).all() and torch.isfinite(y4[0, 16:]).all()
    assert y4[1, 40].item() == 6 * 448 and torch.isfinite(y4[1]).all()  # inf saturates, as the kernel


@pytest.mark.parametrize("fn,shape", [(F.pack_kv_fp8, (2, 48)), (F.pack_kv_fp4, (2, 24)),
                                      (F.unpack_kv_fp8, (2, 50)), (F.unpack_kv_fp4, (2, 20))])
def test_bad_widths_raise(fn, shape):
    arg = torch.zeros(shape, dtype=torch.uint8 if fn.__name__.startswith("unpack") else torch.float32)
    with pytest.raises(ValueError, match=fn.__name__):
        fn(arg)


def test_unpack_refuses_non_bytes():
    with pytest.raises(TypeError, match="uint8"):
        F.unpack_kv_fp8(torch.zeros(2, 33))
