"""dsv4rt.formats against independent decoders (ml_dtypes, torch's own float8 casts) and its own invariants."""
import ml_dtypes
import numpy as np
import pytest
import torch

import dsv4rt.formats as F

ALL_BYTES = np.arange(256, dtype=np.uint8)


def rng(seed=0):
    return np.random.default_rng(seed)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def same(a, b):
    """Bit-for-bit equality of two float arrays, torch or NumPy (-0 != +0; any NaN equals any NaN)."""
    a = a.float().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32)
    b = b.float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float32)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    return np.array_equal(np.where(np.isnan(a), 0, a).view(np.uint32), np.where(np.isnan(b), 0, b).view(np.uint32))


def fp4_ref(codes):
    """Independent E2M1 decoder: ml_dtypes float4_e2m1fn (stored one code per byte)."""
    return np.asarray(codes, np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def random_packed(shape, seed=0):
    return rng(seed).integers(0, 256, shape, dtype=np.uint8)


def random_mx(lead, N, K, seed=0, lo=110, hi=140):
    g = rng(seed)
    return (g.integers(0, 256, (*lead, N, K // 2), dtype=np.uint8),
            g.integers(lo, hi, (*lead, N, K // 32), dtype=np.uint8))


def log_uniform(shape, lo, hi, seed=0):
    g = rng(seed)
    return (np.exp2(g.uniform(lo, hi, shape)) * g.choice([-1.0, 1.0], shape)).astype(np.float32)


# ---------------------------------------------------------------- E2M1 ---------------------------------
def test_fp4_values_match_ml_dtypes():
    assert same(np.array(F.FP4_VALUES, np.float32), fp4_ref(np.arange(16)))


def test_unpack_order_and_pack_roundtrip():
    assert F.unpack_fp4(np.array([0x21, 0xF0], np.uint8)).tolist() == [1, 2, 0, 15]
    p = random_packed((3, 5, 64), seed=1)
    codes = F.unpack_fp4(p)
    assert codes.shape == (3, 5, 128) and codes.dtype == np.uint8
    assert np.array_equal(codes[..., 0::2], p & 15) and np.array_equal(codes[..., 1::2], p >> 4)
    assert np.array_equal(F.pack_fp4(codes), p)
    assert np.array_equal(F.pack_fp4(t(codes)).numpy(), p)
    assert np.array_equal(F.unpack_fp4(t(p).view(torch.float4_e2m1fn_x2)).numpy(), codes)


def test_decode_fp4_against_ml_dtypes_and_views():
    p = random_packed((7, 96), seed=2)
    ref = fp4_ref(F.unpack_fp4(p))
    assert same(F.decode_fp4(p), ref)
    assert same(F.decode_fp4(p.view(np.int8)), ref)
    tp = t(p)
    for view in (tp, tp.view(torch.int8), tp.view(torch.float4_e2m1fn_x2)):
        out = F.decode_fp4(view)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and same(out, ref)
    assert F.decode_fp4(p, dtype=torch.float16).dtype == np.float16              # torch dtypes map for NumPy
    bf = F.decode_fp4(tp, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and same(bf, ref)
    # every byte value decodes as (low code, high code)
    assert same(F.decode_fp4(ALL_BYTES), fp4_ref(np.stack([ALL_BYTES & 15, ALL_BYTES >> 4], -1).reshape(-1)))


def test_as_bytes_views_without_copy():
    base = t(random_packed((4, 8)))
    for dt in (torch.uint8, torch.int8, torch.float4_e2m1fn_x2, torch.float8_e8m0fnu, torch.float8_e4m3fn):
        v = F.as_bytes(base.view(dt))
        assert v.dtype == torch.uint8 and v.data_ptr() == base.data_ptr()
    a = random_packed((4, 8)).view(np.int8)
    assert F.as_bytes(a).dtype == np.uint8 and np.shares_memory(F.as_bytes(a), a)
    with pytest.raises(TypeError, match=r"as_bytes.*float32"):
        F.as_bytes(torch.zeros(3))
    with pytest.raises(TypeError, match=r"as_bytes.*int16"):
        F.as_bytes(np.zeros(3, np.int16))


# ---------------------------------------------------------------- E8M0 ---------------------------------
def test_e8m0_all_bytes_against_ml_dtypes_and_torch():
    ref = ALL_BYTES.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    assert same(F.e8m0_to_float(ALL_BYTES), ref)
    assert np.isnan(F.e8m0_to_float(ALL_BYTES)[255]) and F.e8m0_to_float(ALL_BYTES)[0] == 2.0 ** -127
    tb = t(ALL_BYTES)
    assert same(F.e8m0_to_float(tb), ref) and same(F.e8m0_to_float(tb.view(torch.float8_e8m0fnu)), ref)
    assert same(tb.view(torch.float8_e8m0fnu).float(), ref)


def test_float_to_e8m0_roundtrip_and_rejects():
    vals = F.e8m0_to_float(ALL_BYTES[:255])
    assert np.array_equal(F.float_to_e8m0(vals), ALL_BYTES[:255])
    assert np.array_equal(F.float_to_e8m0(t(vals)).numpy(), ALL_BYTES[:255])
    assert np.array_equal(F.float_to_e8m0(vals.astype(np.float64)), ALL_BYTES[:255])
    for bad in (3.0, 0.0, -2.0, np.inf, np.nan, 2.0 ** 128, 2.0 ** -128, 1.0 + 2.0 ** -40):
        with pytest.raises(ValueError, match="float_to_e8m0"):
            F.float_to_e8m0(np.array([1.0, bad]))
    with pytest.raises(TypeError, match="float_to_e8m0"):
        F.float_to_e8m0(np.array([1, 2], np.int32))


# ---------------------------------------------------------------- E4M3 ---------------------------------
def test_decode_e4m3_all_bytes():
    ref = ALL_BYTES.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert same(F.decode_e4m3(ALL_BYTES), ref)
    tb = t(ALL_BYTES)
    assert same(F.decode_e4m3(tb), ref) and same(F.decode_e4m3(tb.view(torch.float8_e4m3fn)), ref)
    assert same(tb.view(torch.float8_e4m3fn).float(), ref)


def test_encode_e4m3_rne_against_ml_dtypes_and_torch():
    x = np.concatenate([log_uniform(20000, -13, 8.8, seed=3), np.float32([0.0, -0.0, 448.0, -448.0])])
    grid = np.unique(F.decode_e4m3(ALL_BYTES[:0x7F]))
    mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)           # exact ties: must go to the even code
    x = np.concatenate([x, mids, -mids, np.nextafter(mids, 0), np.nextafter(mids, 1000)])
    ref = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    enc = F.encode_e4m3(x)
    assert enc.dtype == np.uint8 and np.array_equal(enc, ref)
    assert np.array_equal(F.encode_e4m3(t(x)).numpy(), ref)
    assert np.array_equal(t(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy(), ref)
    assert np.array_equal(F.encode_e4m3(x.astype(ml_dtypes.bfloat16)), x.astype(ml_dtypes.bfloat16)
                          .astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    # saturation and NaN
    special = np.float32([500.0, -1e6, np.inf, -np.inf, np.nan])
    assert F.encode_e4m3(special).tolist() == [0x7E, 0xFE, 0x7E, 0xFE, 0x7F]
    assert F.encode_e4m3(t(special)).tolist() == [0x7E, 0xFE, 0x7E, 0xFE, 0x7F]


# ---------------------------------------------------------------- MXFP4 --------------------------------
def mx_ref(p, s):
    """Independent dequant in float64: ml_dtypes E2M1 codes times 2^(b-127)."""
    vals = fp4_ref(F.unpack_fp4(p)).astype(np.float64)
    return vals * np.repeat(np.exp2(s.astype(np.float64) - 127), 32, -1)


def test_dequant_mxfp4_against_reference_all_views():
    p, s = random_mx((3,), 16, 256, seed=4)
    ref = mx_ref(p, s)
    out = F.dequant_mxfp4(p, s)
    assert out.shape == (3, 16, 256) and out.dtype == np.float32 and np.array_equal(out, ref)
    tp, ts = t(p), t(s)
    for wv in (tp, tp.view(torch.int8), tp.view(torch.float4_e2m1fn_x2)):
        for sv in (ts, ts.view(torch.float8_e8m0fnu)):
            assert same(F.dequant_mxfp4(wv, sv), out)
    assert F.dequant_mxfp4(tp, ts, torch.bfloat16).dtype == torch.bfloat16
    part = F.dequant_mxfp4(p, s, k_range=(64, 160))
    assert part.shape == (3, 16, 96) and np.array_equal(part, out[..., 64:160])
    assert same(F.dequant_mxfp4(tp, ts, k_range=(224, 256)), out[..., 224:])


def test_quant_mxfp4_scales_error_and_independent_rounding():
    w = (rng(5).standard_normal((2, 24, 320)) * np.exp2(rng(6).integers(-20, 20, (2, 24, 1)))).astype(np.float32)
    p, s = F.quant_mxfp4(w)
    assert p.shape == (2, 24, 160) and s.shape == (2, 24, 10) and p.dtype == s.dtype == np.uint8
    blocks = w.reshape(2, 24, 10, 32).astype(np.float64)
    amax = np.abs(blocks).max(-1)
    scale = np.exp2(np.ceil(np.log2(np.maximum(amax, 6 * 2.0 ** -126) / 6)))
    assert np.array_equal(F.e8m0_to_float(s), scale)                       # power of two, spec 2.2 rule
    # codes = RNE of clamp(w/s, +-6) onto E2M1, with ml_dtypes as the independent rounder
    q = np.clip(blocks / scale[..., None], -6, 6).astype(np.float32).reshape(w.shape)
    assert np.array_equal(fp4_ref(F.unpack_fp4(p)), q.astype(ml_dtypes.float4_e2m1fn).astype(np.float32))
    dq = F.dequant_mxfp4(p, s).reshape(blocks.shape)
    half_step = np.where(np.abs(dq) < 2 * scale[..., None], 0.25, np.where(np.abs(dq) < 4 * scale[..., None], 0.5, 1.0))
    assert np.all(np.abs(dq - blocks) <= half_step * scale[..., None])
    pt, st = F.quant_mxfp4(t(w))
    assert np.array_equal(pt.numpy(), p) and np.array_equal(st.numpy(), s)
    assert same(F.fp4_fake_quant(w), F.dequant_mxfp4(p, s))


def test_quant_mxfp4_ties_to_even_and_exact_grid():
    row = np.float32([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0] + [0.5] * 22)
    p, s = F.quant_mxfp4(row[None])
    assert s.tolist() == [[127]]
    assert F.decode_fp4(p)[0, :10].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]
    # amax = 6 * 2^k gives scale exactly 2^k; grid values come back exactly
    codes = rng(7).integers(0, 16, (4, 64), dtype=np.uint8)
    codes[:, 0] = 7
    vals = fp4_ref(codes) * np.float32(2.0 ** -30)
    p, s = F.quant_mxfp4(vals)
    assert (s == 97).all() and np.array_equal(F.unpack_fp4(p) & 7, codes & 7)
    assert np.array_equal(F.dequant_mxfp4(p, s), vals)


def test_fp4_fake_quant_dtypes():
    x = t(rng(8).standard_normal((3, 4, 128)).astype(np.float32)).to(torch.bfloat16)
    y = F.fp4_fake_quant(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    p, s = F.quant_mxfp4(x)
    assert torch.equal(y, F.dequant_mxfp4(p, s, torch.bfloat16))
    assert same(F.fp4_fake_quant(x.float().numpy()), y.float())


# ---------------------------------------------------------------- FP8 ----------------------------------
def test_quant_fp8_block_roundtrip_partial_tiles():
    w = (rng(9).standard_normal((2, 200, 300)) * np.exp2(rng(10).integers(-8, 8, (2, 200, 1)))).astype(np.float32)
    w8, s8 = F.quant_fp8_block(w)
    assert w8.dtype == np.uint8 and w8.shape == w.shape and s8.shape == (2, 2, 3)
    pad = np.zeros((2, 256, 384), np.float64)
    pad[:, :200, :300] = np.abs(w)
    amax = pad.reshape(2, 2, 128, 3, 128).max((2, 4))
    scale = np.exp2(np.ceil(np.log2(np.maximum(amax, 1e-4) / 448)))
    assert np.array_equal(F.e8m0_to_float(s8), scale)
    full = np.repeat(np.repeat(scale, 128, 1), 128, 2)[:, :200, :300]
    ref = np.clip(w / full, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert np.array_equal(w8, ref)
    dq = F.dequant_fp8_block(w8, s8)
    assert np.all(np.abs(dq - w) <= np.maximum(np.abs(w) * 2.0 ** -4, full * 2.0 ** -10))
    w8t, s8t = F.quant_fp8_block(t(w))
    assert w8t.dtype == torch.float8_e4m3fn and np.array_equal(w8t.view(torch.uint8).numpy(), w8)
    assert np.array_equal(s8t.numpy(), s8)
    for sv in (s8t, s8t.view(torch.float8_e8m0fnu), t(F.e8m0_to_float(s8))):
        assert same(F.dequant_fp8_block(w8t, sv), dq)
    assert same(F.dequant_fp8_block(w8, F.e8m0_to_float(s8)), dq)
    assert F.dequant_fp8_block(w8t, s8t, dtype=torch.bfloat16).dtype == torch.bfloat16
    w8b, s8b = F.quant_fp8_block(w[0], block=64)
    full_b = np.repeat(np.repeat(F.e8m0_to_float(s8b), 64, 0), 64, 1)[:200, :300]
    err = np.abs(F.dequant_fp8_block(w8b, s8b, block=64) - w[0])
    assert s8b.shape == (4, 5) and np.all(err <= np.maximum(np.abs(w[0]) * 2.0 ** -4, full_b * 2.0 ** -10))


def test_act_quant_fp8_against_torch_cast():
    x = t(log_uniform((5, 300), -12, 10, seed=11))
    x[0, :128] = 1e-9                                                     # amax below the 1e-4 floor
    q, s = F.act_quant_fp8(x)
    assert q.shape == (5, 300) and s.shape == (5, 3) and q.dtype == s.dtype == torch.float32
    amax = torch.stack([x[:, i:i + 128].abs().amax(-1) for i in range(0, 300, 128)], -1).double()
    assert torch.equal(s.double(), torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-4) / 448))))
    sf = s.repeat_interleave(128, -1)[:, :300]
    assert same(q, (x / sf).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    qn, sn = F.act_quant_fp8(x.numpy())
    assert same(qn, q) and same(sn, s)
    assert same(F.fp8_fake_quant(x, 128), q * sf)


def test_fp8_fake_quant_block64_bf16():
    x = t(rng(12).standard_normal((2, 3, 448)).astype(np.float32)).to(torch.bfloat16)
    y = F.fp8_fake_quant(x, 64)
    q, s = F.act_quant_fp8(x, 64)
    assert y.dtype == torch.bfloat16 and s.shape == (2, 3, 7)
    assert torch.equal(y, (q * s.repeat_interleave(64, -1)).to(torch.bfloat16))
    assert same(F.fp8_fake_quant(x.float().numpy(), 64), y.float())


# ---------------------------------------------------------------- FP4 -> FP8 ---------------------------
def test_fp4_to_fp8_tiles_is_exact():
    p, s = random_mx((), 192, 320, seed=13, lo=100, hi=115)               # scale span 14, partial tiles
    s[128:, 8:] = rng(16).integers(0, 4, (64, 2))                        # tile max < 6: its byte clamps to 0
    w8, s8 = F.fp4_to_fp8_tiles(p, s)
    assert w8.dtype == np.uint8 and w8.shape == (192, 320) and s8.shape == (2, 3)
    assert same(F.dequant_fp8_block(w8, s8), F.dequant_mxfp4(p, s))
    w8t, s8t = F.fp4_to_fp8_tiles(t(p).view(torch.int8), t(s).view(torch.float8_e8m0fnu))
    assert w8t.dtype == torch.float8_e4m3fn and np.array_equal(w8t.view(torch.uint8).numpy(), w8)
    assert np.array_equal(s8t.numpy(), s8)
    ps, ss = random_mx((2,), 128, 256, seed=14, lo=120, hi=135)
    w8s, s8s = F.fp4_to_fp8_tiles(ps, ss)
    assert same(F.dequant_fp8_block(w8s, s8s), F.dequant_mxfp4(ps, ss))


def test_fp4_to_fp8_tiles_rejects_span_beyond_2_14():
    p, s = random_mx((), 128, 128, seed=15, lo=120, hi=121)
    p[5, :16] = 0x11                                                       # block (5, 0): nonzero codes
    s[5, 0] = 120 - 15
    with pytest.raises(ValueError, match=r"fp4_to_fp8_tiles.*2\^15"):
        F.fp4_to_fp8_tiles(p, s)
    w8, s8 = F.fp4_to_fp8_tiles(p, s, check_lossless=False)              # rounds: 0.5 * 2^-9 -> 0 (tie, even)
    assert not same(F.dequant_fp8_block(w8, s8), F.dequant_mxfp4(p, s))
    p[5, :16] = 0                                                          # an all-zero block is exact at any scale
    w8, s8 = F.fp4_to_fp8_tiles(p, s)
    assert same(F.dequant_fp8_block(w8, s8), F.dequant_mxfp4(p, s))
    s[5, 0] = 120 - 14
    p[5, :16] = 0x11
    w8, s8 = F.fp4_to_fp8_tiles(p, s)                                     # span exactly 2^14 is still exact
    assert same(F.dequant_fp8_block(w8, s8), F.dequant_mxfp4(p, s))


# ---------------------------------------------------------------- bad inputs ---------------------------
def test_order_key_sorts_as_the_floats():
    """Every non-NaN float32 class (infinities, extremes, subnormals, signed zeros) and random values: the
    int32 keys sort as the floats, torch and NumPy give the same keys, and ORDER_KEY_FLOOR is below all."""
    special = np.array([-np.inf, -3.4028235e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3.4028235e38, np.inf], np.float32)
    x = np.concatenate([special, log_uniform((500,), -149, 127, seed=4)])
    np.random.default_rng(5).shuffle(x)
    kn, kt = F.order_key(x), F.order_key(t(x))
    assert kn.dtype == np.int32 and kt.dtype == torch.int32 and np.array_equal(kn, kt.numpy())
    by_key = x[np.argsort(kn)]
    assert np.all(by_key[1:] >= by_key[:-1])                             # ascending keys, ascending floats
    assert len(np.unique(kn)) == len(np.unique(x.view(np.uint32)))       # distinct floats, distinct keys
    assert F.order_key(np.float32([-0.0]))[0] < F.order_key(np.float32([0.0]))[0]
    assert int(kn.min()) > F.ORDER_KEY_FLOOR == np.iinfo(np.int32).min
    assert F.order_key(torch.tensor([0.5, -2.0], dtype=torch.bfloat16)).tolist() == F.order_key(t(np.float32([0.5, -2.0]))).tolist()


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: F.decode_fp4(np.zeros(4, np.float32)), TypeError, r"decode_fp4: packed .*float32"),
    (lambda: F.unpack_fp4([1, 2]), TypeError, r"unpack_fp4: packed .*list"),
    (lambda: F.pack_fp4(np.ones(3, np.uint8)), ValueError, r"pack_fp4: codes .*K even"),
    (lambda: F.pack_fp4(np.array([1, 16], np.uint8)), ValueError, r"pack_fp4: codes .*0\.\.15"),
    (lambda: F.pack_fp4(np.ones(4, np.float32)), TypeError, r"pack_fp4: codes .*integer"),
    (lambda: F.e8m0_to_float(np.zeros(2, np.int8)), TypeError, r"e8m0_to_float: scale .*int8"),
    (lambda: F.quant_mxfp4(np.ones((2, 48), np.float32)), ValueError, r"quant_mxfp4: w .*K % 32"),
    (lambda: F.quant_mxfp4(np.full((1, 32), np.nan, np.float32)), ValueError, r"quant_mxfp4: w must be finite"),
    (lambda: F.quant_mxfp4(np.ones((1, 32), np.uint8)), TypeError, r"quant_mxfp4: w .*uint8"),
    (lambda: F.dequant_mxfp4(np.zeros((4, 16), np.uint8), np.zeros((4, 2), np.uint8)), ValueError,
     r"dequant_mxfp4: expected w .*\(4, 16\).*\(4, 2\)"),
    (lambda: F.dequant_mxfp4(np.zeros((4, 32), np.uint8), np.zeros((4, 2), np.uint8), k_range=(16, 64)),
     ValueError, r"dequant_mxfp4: k_range"),
    (lambda: F.dequant_mxfp4(torch.zeros(4, 16, dtype=torch.uint8), np.zeros((4, 1), np.uint8)), TypeError,
     r"dequant_mxfp4: w_scale .*same kind.*ndarray"),
    (lambda: F.dequant_mxfp4(np.zeros((4, 16), np.uint8), np.zeros((4, 1), np.float32)), TypeError,
     r"dequant_mxfp4: w_scale .*float32"),
    (lambda: F.dequant_fp8_block(np.zeros((4, 4), np.uint8), np.zeros((2, 1), np.uint8)), ValueError,
     r"dequant_fp8_block: expected .*\(2, 1\)"),
    (lambda: F.dequant_fp8_block(np.zeros((4, 4), np.float32), np.zeros((1, 1), np.uint8)), TypeError,
     r"dequant_fp8_block: w .*float32"),
    (lambda: F.quant_fp8_block(np.ones(8, np.float32)), ValueError, r"quant_fp8_block: w must be \[\.\.\., N, K\]"),
    (lambda: F.act_quant_fp8(np.ones(8, np.float32), block=0), ValueError, r"act_quant_fp8: block"),
    (lambda: F.fp4_fake_quant(np.ones(40, np.float32)), ValueError, r"fp4_fake_quant: last dim"),
    (lambda: F.fp4_to_fp8_tiles(np.zeros((4, 16), np.uint8), np.full((4, 1), 255, np.uint8)), ValueError,
     r"fp4_to_fp8_tiles: w_scale must not hold NaN"),
    (lambda: F.decode_fp4(np.zeros(4, np.uint8), dtype="nope"), TypeError, r"decode_fp4: dtype .*'nope'"),
    (lambda: F.decode_fp4(torch.zeros(4, dtype=torch.uint8), dtype="nope"), TypeError, r"decode_fp4: dtype"),
])
def test_bad_inputs_name_the_function(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
