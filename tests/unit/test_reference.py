"""Unit tests of dsv4rt.reference, the float64 golden ops (small, hand-checkable cases)."""

import math

import pytest
import torch

import dsv4rt.reference as ref
from dsv4rt.reference import _decode

F64 = torch.float64
F32 = torch.float32


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_fp4(n, k, seed, scale_lo=120, scale_hi=134):
    g = gen(seed)
    w = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.int64).to(torch.uint8)
    s = torch.randint(scale_lo, scale_hi, (n, k // 32), generator=g, dtype=torch.int64).to(torch.uint8)
    return w, s


def hand_dequant_fp4(w, s):
    """Element by element, straight from spec 1.1-1.3, with the table written out."""
    table = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, 6: 4.0, 7: 6.0,
             8: -0.0, 9: -0.5, 10: -1.0, 11: -1.5, 12: -2.0, 13: -3.0, 14: -4.0, 15: -6.0}
    n, half = w.shape
    out = torch.empty((n, 2 * half), dtype=F64)
    for r in range(n):
        for j in range(half):
            byte = int(w[r, j])
            for k, code in ((2 * j, byte & 0xF), (2 * j + 1, byte >> 4)):
                out[r, k] = table[code] * 2.0 ** (int(s[r, k // 32]) - 127)
    return out


# ----------------------------------------------------------------------------- decoding

def test_e2m1_decode_matches_spec_table_all_bytes():
    table = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    b = torch.arange(256, dtype=torch.int64).to(torch.uint8)[None, :]
    vals = _decode.decode_e2m1(b)
    assert vals.shape == (1, 512) and vals.dtype == F64
    for byte in range(256):
        assert vals[0, 2 * byte].item() == table[byte & 0xF]        # low nibble = even k
        assert vals[0, 2 * byte + 1].item() == table[byte >> 4]     # high nibble = odd k
    assert math.copysign(1.0, vals[0, 2 * 8].item()) == -1.0        # code 8 is -0


def test_e2m1_accepts_int8_and_float4_x2():
    w, _ = rand_fp4(4, 64, seed=1)
    base = _decode.decode_e2m1(w)
    assert torch.equal(_decode.decode_e2m1(w.view(torch.int8)), base)
    assert torch.equal(_decode.decode_e2m1(w.view(torch.float4_e2m1fn_x2)), base)


def test_e8m0_and_e4m3_decode():
    b = torch.tensor([0, 1, 126, 127, 128, 134, 254, 255], dtype=torch.uint8)
    v = _decode.decode_e8m0(b)
    assert v[:7].tolist() == [2.0 ** (x - 127) for x in [0, 1, 126, 127, 128, 134, 254]]
    assert math.isnan(v[7].item())
    assert torch.equal(_decode.decode_e8m0(b.view(torch.float8_e8m0fnu))[:7], v[:7])
    e = torch.tensor([0x38, 0xB8, 0x7E, 0x01], dtype=torch.uint8)   # 1, -1, 448, 2^-9
    assert _decode.decode_e4m3(e).tolist() == [1.0, -1.0, 448.0, 2.0 ** -9]


# ----------------------------------------------------------------------------- fp4 / fp8 GEMM

def test_fp4_gemm_equals_hand_dequantised_matmul():
    w, s = rand_fp4(5, 96, seed=2)
    x = torch.randn(3, 96, generator=gen(3), dtype=torch.float32)
    want = x.to(F64) @ hand_dequant_fp4(w, s).T
    got = ref.fp4_gemm(x, w, s)
    assert got.dtype == F64 and got.shape == (3, 5)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    # dtype variants of the same bits give the same answer
    got2 = ref.fp4_gemm(x, w.view(torch.int8), s.view(torch.float8_e8m0fnu))
    got3 = ref.fp4_gemm(x, w.view(torch.float4_e2m1fn_x2), s)
    assert torch.equal(got2, got) and torch.equal(got3, got)


def test_fp4_gemm_tiny_by_hand():
    # one row of K=32: codes 2 (=1.0) at k=0 and 7 (=6.0) at k=1, 0 elsewhere; scale 2^1
    w = torch.zeros((1, 16), dtype=torch.uint8)
    w[0, 0] = 0x72
    s = torch.tensor([[128]], dtype=torch.uint8)
    x = torch.zeros((1, 32))
    x[0, 0], x[0, 1], x[0, 2] = 3.0, -0.5, 100.0
    assert ref.fp4_gemm(x, w, s).item() == (3.0 * 1.0 - 0.5 * 6.0) * 2.0


def _brief_act_quant(x):
    """The brief's float32 formula (torch.log2), to compare on generic data."""
    x32 = x.float()
    out = torch.empty(x32.shape, dtype=F64)
    for k0 in range(0, x32.shape[1], 128):
        xb = x32[:, k0:k0 + 128]
        amax = xb.abs().amax(dim=1, keepdim=True)
        s = torch.exp2(torch.ceil(torch.log2(torch.clamp(amax, min=1e-4) / 448)))
        out[:, k0:k0 + 128] = torch.clamp(xb / s, -448, 448).to(torch.float8_e4m3fn).to(F64) * s.to(F64)
    return out


def test_act_quant_values_are_e4m3_times_power_of_two():
    x = (torch.randn(6, 300, generator=gen(4)) * torch.logspace(-3, 3, 6)[:, None]).to(torch.bfloat16)
    q = ref.act_quant_fp8(x)
    s = ref.act_scales_fp8(x)
    assert s.shape == (6, 3)                                   # last K block (44 wide) is partial
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)   # powers of two
    for blk in range(3):
        cols = slice(128 * blk, 128 * blk + 128)
        qs = q[:, cols] / s[:, blk:blk + 1]
        assert qs.abs().max() <= 448
        assert torch.equal(qs.to(torch.float8_e4m3fn).to(F64), qs)   # exactly representable
        amax = x[:, cols].float().abs().amax(dim=1).to(F64)
        assert torch.all(amax / s[:, blk] <= 448) and torch.all(amax / s[:, blk] > 224)
    assert torch.equal(q, _brief_act_quant(x))                 # same as the float32 formula here
    # relative error of E4M3 (3 mantissa bits) is at most 2^-4
    assert torch.all((q - x.to(F64)).abs() <= x.to(F64).abs() * 2.0 ** -4 + 1e-30)


def test_act_quant_exact_ceil_just_above_power_of_two_and_tiny_amax():
    # amax = next float32 above 448 * 2^-9: the kernel's exact ceil gives s = 2^-8 (torch.log2 in
    # float32 would round log2 down to -9 and clamp).
    a = torch.nextafter(torch.tensor(0.875), torch.tensor(1.0))
    x = torch.tensor([[a.item(), 0.3, -0.1]], dtype=torch.float32)
    assert ref.act_scales_fp8(x).item() == 2.0 ** -8
    # exact power-of-two boundary: amax = 448 * 2^-9 -> s = 2^-9, q(amax) = amax
    x = torch.tensor([[0.875, -0.2]], dtype=torch.float32)
    assert ref.act_scales_fp8(x).item() == 2.0 ** -9
    assert ref.act_quant_fp8(x)[0, 0].item() == 0.875
    # all-zero / tiny block: amax clamped to 1e-4
    x = torch.zeros((1, 128))
    x[0, 5] = 1e-7
    assert ref.act_scales_fp8(x).item() == 2.0 ** math.ceil(math.log2(1e-4 / 448))
    assert torch.equal(ref.act_quant_fp8(torch.zeros(2, 64)), torch.zeros(2, 64, dtype=F64))


def test_fp4_gemm_act_quant_fp8_uses_quantised_x():
    w, s = rand_fp4(7, 256, seed=5)
    x = torch.randn(4, 256, generator=gen(6)).to(torch.bfloat16)
    got = ref.fp4_gemm(x, w, s, act_quant="fp8")
    want = ref.act_quant_fp8(x) @ hand_dequant_fp4(w, s).T
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert not torch.equal(got, ref.fp4_gemm(x, w, s))


@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_grouped_gemm_equals_per_expert_with_empty_experts(act_quant):
    e_count, n, k = 5, 6, 64
    g = gen(7)
    w = torch.randint(0, 256, (e_count, n, k // 2), generator=g, dtype=torch.int64).to(torch.uint8)
    s = torch.randint(122, 132, (e_count, n, k // 32), generator=g, dtype=torch.int64).to(torch.uint8)
    counts = [0, 3, 0, 4, 0]                                   # empty first, middle and last
    offsets = torch.tensor([0, 0, 3, 3, 7, 7], dtype=torch.int32)
    x = torch.randn(sum(counts), k, generator=g)
    y = ref.fp4_grouped_gemm(x, w, s, offsets, act_quant)
    assert y.shape == (7, n) and y.dtype == F64
    assert torch.equal(y[0:3], ref.fp4_gemm(x[0:3], w[1], s[1], act_quant))
    assert torch.equal(y[3:7], ref.fp4_gemm(x[3:7], w[3], s[3], act_quant))
    y0 = ref.fp4_grouped_gemm(x[:0], w, s, torch.zeros(6, dtype=torch.int32), act_quant)
    assert y0.shape == (0, n)


def test_fp8_gemm_block_scales_partial_blocks():
    n, k = 200, 300                                            # 2 x 3 scale blocks, both partial
    g = gen(8)
    wv = (torch.randn(n, k, generator=g) * 4).to(torch.float8_e4m3fn)
    sb = torch.randint(120, 132, (2, 3), generator=g, dtype=torch.int64).to(torch.uint8)
    x = torch.randn(3, k, generator=g)
    wd = torch.empty((n, k), dtype=F64)
    for r in range(n):
        for c in range(k):
            wd[r, c] = wv[r, c].item() * 2.0 ** (int(sb[r // 128, c // 128]) - 127)
    want = x.to(F64) @ wd.T
    got = ref.fp8_gemm(x, wv, sb)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert torch.equal(ref.fp8_gemm(x, wv, sb.view(torch.float8_e8m0fnu)), got)
    sf = _decode.decode_e8m0(sb).to(torch.float32)
    assert torch.equal(ref.fp8_gemm(x, wv, sf), got)           # fp32 scales
    got_q = ref.fp8_gemm(x, wv, sb, act_quant="fp8")
    torch.testing.assert_close(got_q, ref.act_quant_fp8(x) @ wd.T, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- indexer

def test_indexer_scores_by_hand():
    q = torch.tensor([[[[1.0, 2.0], [-1.0, 0.5]]]])            # B=S=1, H=2, D=2
    k = torch.tensor([[[1.0, 1.0], [-2.0, 1.0], [0.0, -1.0]]])  # N=3
    w = torch.tensor([[[0.5, 2.0]]])
    sc = ref.indexer_scores(q, k, w, torch.tensor([[3]], dtype=torch.int32))
    # t=0: 0.5*relu(3) + 2*relu(-0.5) = 1.5; t=1: 0.5*relu(0) + 2*relu(2.5) = 5; t=2: 0.5*0 + 2*0 = 0
    assert sc[0, 0].tolist() == [1.5, 5.0, 0.0]
    idx, val = ref.indexer_topk(q, k, w, torch.tensor([[3]], dtype=torch.int32), 2, return_scores=True)
    assert idx.dtype == torch.int32 and sorted(idx[0, 0].tolist()) == [0, 1]
    assert sorted(val[0, 0].tolist()) == [1.5, 5.0]
    sc2 = ref.indexer_scores(q, k, w, torch.tensor([[2]], dtype=torch.int32))
    assert sc2[0, 0, 2].item() == float("-inf")


def _rand_indexer(seed, b=2, s=12, h=4, n=5, d=8):
    g = gen(seed)
    q = torch.randn(b, s, h, d, generator=g).to(torch.bfloat16)
    k = torch.randn(b, n, d, generator=g).to(torch.bfloat16)
    w = torch.rand(b, s, h, generator=g)
    return q, k, w


def test_indexer_causal_visible_and_padding():
    q, k, w = _rand_indexer(9)
    b, s, n = 2, 12, 5
    topk = 4
    visible = torch.tensor([[(si + 1) // 4 for si in range(s)]] * b, dtype=torch.int32)
    visible[1, -1] = 99                                        # clamped to N
    visible[1, 0] = -3                                         # clamped to 0
    idx, val = ref.indexer_topk(q, k, w, visible, topk, return_scores=True)
    scores = ref.indexer_scores(q, k, w, visible)
    assert idx.shape == (b, s, topk) and val.shape == (b, s, topk)
    for bi in range(b):
        for si in range(s):
            vis = min(max(int(visible[bi, si]), 0), n)
            cnt = min(topk, vis)
            row = idx[bi, si].tolist()
            assert row[cnt:] == [-1] * (topk - cnt)            # -1 padding when visible < topk
            chosen = row[:cnt]
            assert len(set(chosen)) == cnt and all(0 <= t < vis for t in chosen)   # causal
            best = sorted(range(vis), key=lambda t: -scores[bi, si, t].item())[:cnt]
            assert sorted(scores[bi, si, chosen].tolist()) == sorted(scores[bi, si, best].tolist())
            assert val[bi, si, :cnt].tolist() == scores[bi, si, chosen].tolist()
            assert all(v == float("-inf") for v in val[bi, si, cnt:].tolist())
    assert torch.all(idx[1, 0] == -1)
    assert not torch.any(torch.isinf(scores[1, -1]))           # visible 99 -> all N keys visible
    assert torch.equal(ref.indexer_topk(q, k, w, visible, topk), idx)


def test_indexer_fp8_keys_with_scale_equal_bf16_path():
    q, _, w = _rand_indexer(10)
    g = gen(11)
    b, n, d = 2, 5, 8
    k8 = (torch.randn(b, n, d, generator=g) * 8).to(torch.float8_e4m3fn)
    k_scale = torch.exp2(torch.randint(-4, 4, (b, n), generator=g).to(torch.float32))
    kb = (k8.to(torch.float32) * k_scale[..., None]).to(torch.bfloat16)   # exact in bf16
    assert torch.equal(kb.to(F64), k8.to(F64) * k_scale.to(F64)[..., None])
    visible = torch.full((b, 12), 4, dtype=torch.int32)
    s8 = ref.indexer_scores(q, k8, w, visible, k_scale=k_scale)
    sb = ref.indexer_scores(q, kb, w, visible)
    assert torch.equal(s8, sb)
    i8 = ref.indexer_topk(q, k8, w, visible, 3, k_scale=k_scale)
    assert torch.equal(i8, ref.indexer_topk(q, kb, w, visible, 3))


# ----------------------------------------------------------------------------- kv_compress

def _softmax_pool(logits, vals):
    m = max(logits)
    e = [math.exp(l - m) for l in logits]
    return sum(a * v for a, v in zip(e, vals)) / sum(e)


def test_kv_compress_ratio4_overlap_entry0_without_and_with_prev():
    g = gen(12)
    b, s, d, r = 1, 8, 3, 4
    kv = torch.randn(b, s, 2 * d, generator=g)
    gate = torch.randn(b, s, 2 * d, generator=g)
    ape = torch.randn(r, 2 * d, generator=g)
    out = ref.kv_compress(kv, gate, ape, r, True)
    assert out.shape == (1, 2, d) and out.dtype == F64
    for c in range(d):
        # j = 0, no prev: own block only, second-half channels
        want = _softmax_pool([gate[0, i, d + c].item() + ape[i, d + c].item() for i in range(4)],
                             [kv[0, i, d + c].item() for i in range(4)])
        assert out[0, 0, c].item() == pytest.approx(want, rel=1e-12)
        # j = 1: previous block (tokens 0-3) first half + own block (tokens 4-7) second half
        logits = [gate[0, i, c].item() + ape[i, c].item() for i in range(4)]
        logits += [gate[0, i, d + c].item() + ape[i - 4, d + c].item() for i in range(4, 8)]
        vals = [kv[0, i, c].item() for i in range(4)] + [kv[0, i, d + c].item() for i in range(4, 8)]
        assert out[0, 1, c].item() == pytest.approx(_softmax_pool(logits, vals), rel=1e-12)
    prev_kv = torch.randn(b, r, 2 * d, generator=g)
    prev_gate = torch.randn(b, r, 2 * d, generator=g)
    out_p = ref.kv_compress(kv, gate, ape, r, True, prev_kv, prev_gate)
    for c in range(d):
        logits = [prev_gate[0, p, c].item() + ape[p, c].item() for p in range(4)]
        logits += [gate[0, i, d + c].item() + ape[i, d + c].item() for i in range(4)]
        vals = [prev_kv[0, p, c].item() for p in range(4)] + [kv[0, i, d + c].item() for i in range(4)]
        assert out_p[0, 0, c].item() == pytest.approx(_softmax_pool(logits, vals), rel=1e-12)
    assert torch.equal(out_p[:, 1], out[:, 1])                 # prev only touches entry 0


def test_kv_compress_equal_gates_give_mean():
    g = gen(13)
    b, s, d = 2, 8, 4
    kv = torch.randn(b, s, 2 * d, generator=g)
    gate = torch.full((b, s, 2 * d), 0.7)
    ape = torch.zeros(4, 2 * d)
    out = ref.kv_compress(kv, gate, ape, 4, True).to(F64)
    kv = kv.to(F64)
    torch.testing.assert_close(out[:, 0], kv[:, 0:4, d:].mean(dim=1), rtol=1e-12, atol=1e-12)
    want1 = torch.cat([kv[:, 0:4, :d], kv[:, 4:8, d:]], dim=1).mean(dim=1)
    torch.testing.assert_close(out[:, 1], want1, rtol=1e-12, atol=1e-12)
    # no-overlap, ratio 4: plain mean of each block
    out_h = ref.kv_compress(kv[..., :d], gate[..., :d], ape[:, :d], 4, False)
    torch.testing.assert_close(out_h, kv[..., :d].reshape(b, 2, 4, d).mean(dim=2), rtol=1e-12, atol=1e-12)


def test_kv_compress_ratio128_no_overlap():
    g = gen(14)
    b, s, d, r = 1, 256, 3, 128
    kv = torch.randn(b, s, d, generator=g)
    gate = torch.randn(b, s, d, generator=g)
    ape = torch.randn(r, d, generator=g)
    prev = torch.randn(b, r, d, generator=g)
    out = ref.kv_compress(kv, gate, ape, r, False)
    assert out.shape == (1, 2, d)
    assert torch.equal(ref.kv_compress(kv, gate, ape, r, False, prev, prev), out)   # prev ignored
    for j in range(2):
        for c in range(d):
            toks = range(128 * j, 128 * j + 128)
            want = _softmax_pool([gate[0, i, c].item() + ape[i % 128, c].item() for i in toks],
                                 [kv[0, i, c].item() for i in toks])
            assert out[0, j, c].item() == pytest.approx(want, rel=1e-12, abs=1e-14)


# ----------------------------------------------------------------------------- sparse attention

def test_sparse_attention_one_entry_with_sink_closed_form():
    g = gen(15)
    d, h = 4, 2
    q = torch.randn(1, 1, h, d, generator=g)
    kv = torch.randn(1, 3, d, generator=g)
    sink = torch.tensor([0.3, -1.2])
    scale = 0.5
    idx = torch.tensor([[[2, -1, -1]]], dtype=torch.int32)
    o, lse = ref.sparse_attention(q, kv, idx, sink, scale, return_lse=True)
    for hh in range(h):
        logit = scale * float(q[0, 0, hh].double() @ kv[0, 2].double())
        a = math.exp(logit) / (math.exp(logit) + math.exp(sink[hh].item()))
        torch.testing.assert_close(o[0, 0, hh], a * kv[0, 2].double(), rtol=1e-12, atol=1e-12)
        assert lse[0, 0, hh].item() == pytest.approx(math.log(math.exp(logit) + math.exp(sink[hh].item())), rel=1e-12)
    # no sink: one entry -> o = kv_j exactly (weight 1), lse = logit
    o2, lse2 = ref.sparse_attention(q, kv, idx, None, scale, return_lse=True)
    torch.testing.assert_close(o2[0, 0], kv[0, 2].double().expand(h, d), rtol=1e-12, atol=1e-12)


def test_sparse_attention_skips_minus_one_counts_duplicates_and_zero_rows():
    # the exact softmax (P unrounded, p_dtype=float32); the rounded P is tests/unit/test_precision.py's
    g = gen(16)
    b, s, h, d, n = 2, 3, 2, 8, 6
    q = torch.randn(b, s, h, d, generator=g).to(torch.bfloat16)
    kv = torch.randn(b, n, d, generator=g).to(torch.bfloat16)
    sink = torch.randn(h, generator=g)
    scale = d ** -0.5
    idx = torch.tensor([[[0, -1, 3, -1], [5, 1, 2, 4], [-1, -1, -1, -1]],
                        [[-1, 2, -1, 0], [1, 1, -1, -1], [3, -1, -1, -1]]], dtype=torch.int32)
    o, lse = ref.sparse_attention(q, kv, idx, sink, scale, return_lse=True, p_dtype=F32)
    assert o.shape == (b, s, h, d) and lse.shape == (b, s, h)
    # -1 entries are skipped: same as the compacted list
    o_c = ref.sparse_attention(q[:1, :1], kv[:1], torch.tensor([[[0, 3]]], dtype=torch.int32), sink, scale,
                               p_dtype=F32)
    torch.testing.assert_close(o[0, 0], o_c[0, 0], rtol=1e-13, atol=1e-13)
    # brute force with a dense softmax over [selected..., sink] (null value for the sink)
    for bi in range(b):
        for si in range(s):
            sel = [j for j in idx[bi, si].tolist() if j >= 0]
            if not sel:
                assert torch.equal(o[bi, si], torch.zeros(h, d, dtype=F64))   # no valid index
                torch.testing.assert_close(lse[bi, si], sink.double())
                continue
            keys = kv[bi, sel].double()
            logits = scale * q[bi, si].double() @ keys.T
            full = torch.cat([logits, sink.double()[:, None]], dim=1)
            p = torch.softmax(full, dim=1)[:, :-1]
            torch.testing.assert_close(o[bi, si], p @ keys, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(lse[bi, si], torch.logsumexp(full, dim=1), rtol=1e-12, atol=1e-12)
    # duplicates count twice: [1, 1] equals weight doubling of entry 1 (logit + log 2)
    keys = kv[1, [1]].double()
    logit = scale * q[1, 1].double() @ keys.T + math.log(2.0)
    full = torch.cat([logit, sink.double()[:, None]], dim=1)
    torch.testing.assert_close(o[1, 1], torch.softmax(full, dim=1)[:, :1] @ keys, rtol=1e-12, atol=1e-12)
    # no sink and no valid index: zeros, lse -inf
    o_n, lse_n = ref.sparse_attention(q, kv, idx, None, scale, return_lse=True, p_dtype=F32)
    assert torch.equal(o_n[0, 2], torch.zeros(h, d, dtype=F64))
    assert torch.all(lse_n[0, 2] == float("-inf"))


def test_sparse_attention_stable_for_large_logits():
    q = torch.full((1, 1, 1, 4), 100.0)
    kv = torch.tensor([[[100.0, 0, 0, 0], [99.0, 0, 0, 0]]])
    o, lse = ref.sparse_attention(q, kv, torch.tensor([[[0, 1]]], dtype=torch.int32),
                                  torch.tensor([0.0]), 1.0, return_lse=True)
    assert torch.all(torch.isfinite(o)) and torch.isfinite(lse).all()
    a = 1.0 / (1.0 + math.exp(-100.0))
    assert o[0, 0, 0, 0].item() == pytest.approx(100.0 * a + 99.0 * (1 - a), rel=1e-12)


# ----------------------------------------------------------------------------- MoE

def _sqrt_softplus(z):
    return math.sqrt(z if z > 20 else math.log1p(math.exp(z)))


def test_moe_route_weights_sum_and_values():
    g = gen(17)
    t, e, topk, rs = 5, 16, 6, 1.5
    logits = torch.randn(t, e, generator=g) * 3
    logits[0, 3] = 25.0                                        # linear region of softplus
    ids, w = ref.moe_route(logits, None, topk, rs)
    assert ids.dtype == torch.int32 and w.dtype == F64 and ids.shape == (t, topk)
    torch.testing.assert_close(w.sum(dim=1), torch.full((t,), rs, dtype=F64), rtol=1e-13, atol=1e-13)
    s = ref.moe_scores(logits, None)
    assert s[0, 3].item() == 5.0
    for ti in range(t):
        chosen = ids[ti].tolist()
        assert len(set(chosen)) == topk
        assert min(s[ti, chosen]) >= max(s[ti, [x for x in range(e) if x not in chosen]])
        ss = [_sqrt_softplus(logits[ti, x].item()) for x in chosen]
        assert w[ti].tolist() == pytest.approx([v / sum(ss) * rs for v in ss], rel=1e-13)
    assert 3 in ids[0].tolist()


def test_moe_route_bias_changes_selection_only():
    g = gen(18)
    t, e, topk, rs = 4, 8, 2, 2.5
    logits = torch.randn(t, e, generator=g)
    bias = torch.zeros(e)
    bias[6] = 100.0                                            # forces expert 6 everywhere
    bias[1] = 50.0                                             # and then expert 1
    ids, w = ref.moe_route(logits, bias, topk, rs)
    assert all(sorted(r) == [1, 6] for r in ids.tolist())
    s = ref.moe_scores(logits, None)
    for ti in range(t):
        a, b_ = s[ti, ids[ti, 0]].item(), s[ti, ids[ti, 1]].item()
        assert w[ti].tolist() == pytest.approx([a / (a + b_) * rs, b_ / (a + b_) * rs], rel=1e-13)
    assert torch.equal(w, ref.moe_route_weights(logits, ids, rs))
    torch.testing.assert_close(ref.moe_scores(logits, bias), s + bias.double())
    ids0, _ = ref.moe_route(logits, None, topk, rs)
    assert any(sorted(a) != sorted(b) for a, b in zip(ids0.tolist(), ids.tolist()))


def test_moe_route_hash_ids():
    g = gen(19)
    t, e, topk = 3, 8, 3
    logits = torch.randn(t, e, generator=g)
    hash_ids = torch.tensor([[0, 5, 7], [2, 2, 1], [4, 3, 6]], dtype=torch.int64)
    bias = torch.full((e,), 9.0)
    ids, w = ref.moe_route(logits, bias, topk, 1.5, hash_ids=hash_ids)
    assert ids.dtype == torch.int32 and torch.equal(ids, hash_ids.to(torch.int32))
    assert torch.equal(w, ref.moe_route_weights(logits, hash_ids, 1.5))
    torch.testing.assert_close(w.sum(dim=1), torch.full((t,), 1.5, dtype=F64))


def test_moe_dispatch_by_hand():
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    ids = torch.tensor([[2, 0], [0, 2], [3, 0]], dtype=torch.int32)
    xs, off, src = ref.moe_dispatch(x, ids, 5)
    assert off.dtype == torch.int32 and src.dtype == torch.int32
    assert off.tolist() == [0, 3, 3, 5, 6, 6]                  # expert 1 and 4 empty
    assert src.tolist() == [1, 2, 5, 0, 3, 4]                  # expert 0: (0,1),(1,0),(2,1); ...
    assert xs[:, 0].tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]


def test_dispatch_combine_round_trip():
    g = gen(20)
    t, h, e, topk = 7, 5, 6, 3
    x = torch.randn(t, h, generator=g)
    logits = torch.randn(t, e, generator=g)
    ids, w = ref.moe_route(logits, None, topk, 1.5)
    xs, off, src = ref.moe_dispatch(x, ids, e)
    assert xs.shape == (t * topk, h) and off[-1].item() == t * topk
    for ex in range(e):                                        # grouped by expert, token order
        rows = src[off[ex]:off[ex + 1]].tolist()
        assert rows == sorted(rows)
        assert all(ids.view(-1)[r].item() == ex for r in rows)
    y = ref.moe_combine(xs, src, w)
    torch.testing.assert_close(y, w.sum(dim=1, keepdim=True) * x.double(), rtol=1e-13, atol=1e-13)
    y1 = ref.moe_combine(xs, src, None, topk=topk)
    torch.testing.assert_close(y1, topk * x.double(), rtol=1e-13, atol=1e-13)
    # a per-row transform survives the trip: combine(f(dispatch(x))) = sum_j w_j f_e(x)
    scale_e = torch.arange(1, e + 1, dtype=F64)
    ys = xs.clone()
    for ex in range(e):
        ys[off[ex]:off[ex + 1]] *= scale_e[ex]
    want = torch.stack([sum(w[ti, j] * scale_e[ids[ti, j]] for j in range(topk)) * x[ti].double()
                        for ti in range(t)])
    torch.testing.assert_close(ref.moe_combine(ys, src, w), want, rtol=1e-13, atol=1e-13)
