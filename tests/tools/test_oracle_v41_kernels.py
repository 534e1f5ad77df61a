"""tools/oracle_v41_kernels.py: the CPU stand-in for the official V4.1 kernel module, against float64 formulas
and hand cases (and, with DSV4RT_V41_OFFICIAL set to a folder holding the tt-metal ``kernel_cpu.py`` port,
against that port bit for bit)."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import oracle_v41_kernels as K

OFFICIAL = os.environ.get("DSV4RT_V41_OFFICIAL")


@pytest.fixture(autouse=True)
def _mode():
    K.MODE, K.ALT_ORDER = "release", False
    yield
    K.MODE, K.ALT_ORDER = "release", False


def _rand(g, *shape, spread=2.0):
    return (torch.randn(*shape, generator=g) * torch.exp(spread * torch.randn(*shape, generator=g))).to(torch.bfloat16)


def test_act_quant_power_of_two_scales_and_e4m3_values():
    g = torch.Generator().manual_seed(1)
    x = _rand(g, 5, 96)
    q, s = K.act_quant(x, 32, "ue8m0", torch.float8_e8m0fnu)
    s = s.float()
    amax = x.float().unflatten(-1, (-1, 32)).abs().amax(-1).clamp_min(1e-4)
    assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))            # powers of two
    assert bool((s * 448 >= amax * (1 - 1e-6)).all()) and bool((s * 224 < amax).all())  # the smallest such
    back = (q.float().unflatten(-1, (-1, 32)) * s.unsqueeze(-1)).flatten(-2)
    err = (back - x.float()).abs() / x.float().abs().clamp_min(1e-30)
    assert float(err[x.float().abs() > s.repeat_interleave(32, -1) * 2 ** -6].max()) <= 2 ** -4  # e4m3 half-ulp
    y = x.clone()
    assert K.act_quant(y, 32, "ue8m0", torch.float8_e8m0fnu, True) is y
    assert torch.equal(y, back.to(torch.bfloat16))
    q2, s2 = K.act_quant(x, 32)                                                # no scale_fmt: amax / 448
    assert torch.allclose(s2, amax * torch.tensor(1 / 448.0), rtol=0, atol=0)


def test_e2m1_rounds_to_nearest_even_code():
    vals = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.3, 0.74, 1.3, 2.49, 2.51, 4.9, 5.1, 6.0, 0.0]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 0.5, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0, 0.0]
    x = torch.tensor([vals + [-v for v in vals]], dtype=torch.bfloat16)      # amax 6 -> scale 1
    K.fp4_act_quant(x, 32, True)
    assert x[0].tolist() == want + [-w for w in want]


def test_fp4_packing_low_nibble_holds_the_even_element():
    x = torch.tensor([[1.0, -6.0, 0.5, 3.0] + [0.0] * 28], dtype=torch.bfloat16)
    q, s = K.fp4_act_quant(x, 32, False)
    assert float(s.float()) == 1.0
    b = q.view(torch.uint8)[0].tolist()
    assert b[:2] == [0x2 | (0xF << 4), 0x1 | (0x5 << 4)]   # 1.0 = code 2, -6 = 8|7, 0.5 = 1, 3.0 = 5


def test_fp4_e4m3_scales_per_16():
    g = torch.Generator().manual_seed(2)
    x = _rand(g, 3, 64, spread=1.0)
    q, s = K.fp4_act_quant(x, 16, False, torch.float8_e4m3fn)
    amax = x.float().unflatten(-1, (-1, 16)).abs().amax(-1).clamp_min(6 * 2 ** -9)
    assert torch.equal(s.float(), (amax / 6).to(torch.float8_e4m3fn).float())
    y = x.clone()
    K.fp4_act_quant(y, 16, True, torch.float8_e4m3fn)
    assert torch.equal(y.float(), (K._unpack_fp4(q) * s.float().repeat_interleave(16, -1)).to(torch.bfloat16).float())


def _dense(a_q, a_s, block):
    return (a_q.float().unflatten(-1, (-1, block)) * a_s.float().unsqueeze(-1)).flatten(-2)


def test_fp8_gemm_is_the_scaled_product():
    from oracle_v41_official import dequant_fp8
    from oracle_v41_tiny import _fp8

    g = torch.Generator().manual_seed(3)
    a = _rand(g, 2, 3, 96)
    w_q, w_s = _fp8(torch.randn(70, 96, generator=g) / 10)
    a_q, a_s = K.act_quant(a, 32, "ue8m0", torch.float8_e8m0fnu)
    got = K.fp8_gemm(a_q, a_s, w_q, w_s, torch.float8_e8m0fnu, 32)
    want = _dense(a_q, a_s, 32).double() @ dequant_fp8(w_q, w_s).double().T
    assert got.shape == (2, 3, 70) and got.dtype == torch.get_default_dtype()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("act_block", [32, 128])
def test_fp4_gemm_is_the_scaled_product(act_block):
    from oracle_v41_official import dequant_fp4

    g = torch.Generator().manual_seed(4)
    a = _rand(g, 5, 128)
    w_q, w_s = K.fp4_act_quant(torch.randn(40, 128, generator=g).to(torch.bfloat16), 32, False)
    a_q, a_s = K.act_quant(a, act_block, "ue8m0", torch.float8_e8m0fnu)
    got = K.fp4_gemm(a_q, a_s, w_q, w_s, torch.float8_e8m0fnu, act_block)
    want = _dense(a_q, a_s, act_block).double() @ dequant_fp4(w_q, w_s).double().T
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _attn64(q, kv, sink, idx, scale):
    b, m, h, d = q.shape
    out = torch.zeros(b, m, h, d, dtype=torch.float64)
    for bi in range(b):
        for mi in range(m):
            ok = [int(i) for i in idx[bi, mi] if i >= 0]
            if not ok:
                continue
            k = kv[bi, ok].double()
            lg = q[bi, mi].double() @ k.T * scale                               # [h, t]
            mx = lg.amax(-1, keepdim=True)
            p = torch.exp(lg - mx)
            den = p.sum(-1, keepdim=True) + torch.exp(sink.double()[:, None] - mx)
            out[bi, mi] = (p / den) @ k
    return out


@pytest.mark.parametrize("mode", ["fp32", "release"])
def test_sparse_attn_against_float64(mode):
    K.MODE = mode
    g = torch.Generator().manual_seed(5)
    b, m, h, d, n, t = 2, 3, 4, 64, 150, 140
    dt = torch.bfloat16 if mode == "release" else torch.float32                 # fp32 mode: out in q's dtype
    q = torch.randn(b, m, h, d, generator=g).to(dt)
    kv = torch.randn(b, n, d, generator=g).to(dt)
    sink = torch.randn(h, generator=g)
    idx = torch.randint(0, n, (b, m, t), generator=g, dtype=torch.int32)
    idx[torch.rand(b, m, t, generator=g) < 0.3] = -1
    idx[1, 2] = -1                                                              # a row with nothing: zeros
    got = K.sparse_attn(q, kv, sink, idx, d ** -0.5)
    want = _attn64(q, kv, sink, idx, d ** -0.5)
    assert got.dtype == dt and got.shape == (b, m, h, d)
    assert torch.equal(got[1, 2], torch.zeros(h, d, dtype=got.dtype))
    tol = 1e-2 if mode == "release" else 1e-5
    assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max())


def test_hc_split_sinkhorn_against_float64():
    g = torch.Generator().manual_seed(6)
    hc = 4
    mixes = torch.randn(3, 5, (2 + hc) * hc, generator=g)
    sc, base = torch.rand(3, generator=g) + 0.5, torch.randn((2 + hc) * hc, generator=g)
    pre, post, comb = K.hc_split_sinkhorn(mixes, sc, base, hc, 20, 1e-6)
    m, s, bb = mixes.double(), sc.double(), base.double()
    assert torch.allclose(pre.double(), torch.sigmoid(m[..., :hc] * s[0] + bb[:hc]) + 1e-6, atol=1e-6)
    assert torch.allclose(post.double(), 2 * torch.sigmoid(m[..., hc:2 * hc] * s[1] + bb[hc:2 * hc]), atol=1e-6)
    c = torch.softmax((m[..., 2 * hc:] * s[2] + bb[2 * hc:]).unflatten(-1, (hc, hc)), -1) + 1e-6
    c = c / (c.sum(-2, keepdim=True) + 1e-6)
    for _ in range(19):
        c = c / (c.sum(-1, keepdim=True) + 1e-6)
        c = c / (c.sum(-2, keepdim=True) + 1e-6)
    assert torch.allclose(comb.double(), c, atol=1e-5)
    assert float((comb.sum(-2) - 1).abs().max()) < 1e-4 and float((comb.sum(-1) - 1).abs().max()) < 1e-2


def test_fp32_mode_leaves_inplace_calls_alone_but_still_quantises_gemm_inputs():
    K.MODE = "fp32"
    x = torch.randn(2, 64) * 3
    y = x.clone()
    K.act_quant(y, 32, "ue8m0", torch.float8_e8m0fnu, True)
    K.fp4_act_quant(y, 32, True)
    assert torch.equal(x, y)
    q, _ = K.act_quant(x.to(torch.bfloat16), 32, "ue8m0", torch.float8_e8m0fnu)
    assert q.dtype == torch.float8_e4m3fn


def test_bad_block_is_refused():
    with pytest.raises(ValueError, match="multiple of the block"):
        K.act_quant(torch.zeros(2, 40, dtype=torch.bfloat16), 32)
    with pytest.raises(ValueError, match="scale_dtype"):
        K.fp4_act_quant(torch.zeros(2, 32, dtype=torch.bfloat16), 32, False, torch.float32)


def _port():
    path = os.path.join(OFFICIAL or "", "kernel_cpu.py")
    if not OFFICIAL or not os.path.isfile(path):
        pytest.skip("DSV4RT_V41_OFFICIAL is not set to a folder holding the tt-metal kernel_cpu.py port: the "
                    "bit-for-bit comparison of the oracle's kernel module with that port is SKIPPED")
    spec = importlib.util.spec_from_file_location("_v41_kernel_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quantisers_match_the_port_bit_for_bit():
    R = _port()
    g = torch.Generator().manual_seed(7)
    for shape in ((7, 256), (2, 3, 512)):
        x = _rand(g, *shape, spread=3.0)
        for fmt, sd in ((None, torch.float32), ("ue8m0", torch.float8_e8m0fnu)):
            a, b = K.act_quant(x, 32, fmt, sd), R.act_quant(x, 32, fmt, sd)
            assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
            assert torch.equal(a[1].float(), b[1].float())
            xa, xb = x.clone(), x.clone()
            K.act_quant(xa, 32, fmt, sd, True), R.act_quant(xb, 32, fmt, sd, True)
            assert torch.equal(xa, xb)
        for block, sd in ((32, torch.float8_e8m0fnu), (16, torch.float8_e4m3fn)):
            a, b = K.fp4_act_quant(x, block, False, sd), R.fp4_act_quant(x, block, False, sd)
            assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
            assert torch.equal(a[1].float(), b[1].float())
            xa, xb = x.clone(), x.clone()
            K.fp4_act_quant(xa, block, True, sd), R.fp4_act_quant(xb, block, True, sd)
            assert torch.equal(xa, xb)


def test_gemm_attention_and_sinkhorn_match_the_port():
    R = _port()
    g = torch.Generator().manual_seed(8)
    a_q, a_s = K.act_quant(_rand(g, 6, 128), 32, "ue8m0", torch.float8_e8m0fnu)
    from oracle_v41_tiny import _fp8
    w_q, w_s = _fp8(torch.randn(48, 128, generator=g) / 10)
    f_q, f_s = K.fp4_act_quant(torch.randn(48, 128, generator=g).to(torch.bfloat16), 32, False)
    torch.set_default_dtype(torch.bfloat16)
    try:
        for fn, args in (("fp8_gemm", (a_q, a_s, w_q, w_s, torch.float8_e8m0fnu, 32)),
                         ("fp4_gemm", (a_q, a_s, f_q, f_s, torch.float8_e8m0fnu, 32))):
            got, want = getattr(K, fn)(*args), getattr(R, fn)(*args)
            assert got.dtype == want.dtype == torch.bfloat16
            assert float((got.float() - want.float()).abs().max()) <= 2 ** -7 * float(want.float().abs().max())
    finally:
        torch.set_default_dtype(torch.float32)
    q = torch.randn(1, 4, 8, 64, generator=g).to(torch.bfloat16)
    kv = torch.randn(1, 200, 64, generator=g).to(torch.bfloat16)
    sink = torch.randn(8, generator=g)
    idx = torch.randint(-1, 200, (1, 4, 150), generator=g, dtype=torch.int32)
    got, want = K.sparse_attn(q, kv, sink, idx, 0.125), R.sparse_attn(q, kv, sink, idx, 0.125)
    assert float((got.float() - want.float()).abs().max()) <= 2 ** -7 * float(want.float().abs().max())
    mixes, sc, base = torch.randn(2, 3, 24, generator=g), torch.rand(3, generator=g), torch.randn(24, generator=g)
    for x, y in zip(K.hc_split_sinkhorn(mixes, sc, base, 4, 20, 1e-6),
                    R.hc_split_sinkhorn(mixes, sc, base, 4, 20, 1e-6)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    assert not math.isnan(float(got.float().sum()))
