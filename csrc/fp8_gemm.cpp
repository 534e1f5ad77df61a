// FP8 E4M3 GEMM with bs x bs block scales (E8M0 bytes or float32; bs = 128 for V4, 32 for V4.1): fp8_gemm.
//
// One pass over the weight for all M rows of x: threads split the N rows; each bs-wide K block of a
// weight row is decoded once (256-entry E4M3 table) into an L1 buffer and dotted with every row of x,
// the block's scale applied to the block sum (as the reference's dequant, in fp32). For small M this
// streams the weight once (GEMV); for larger M the decoded block is reused M times from L1.
// Where the CPU has AVX-512, fp8_gemm_avx512.cpp decodes E4M3 in registers (no table) and takes 8 rows of
// x per pass over the weight; this portable path is the fallback (and the one set_isa(generic) tests).
// Prefill sizes take the blocked AVX512-BF16 GEMM: with bs = 128 the per-row block scale multiplies each
// 128-block's sums; with bs = 32 the four scales of a 128-block are folded into the bf16 weights (exact
// while every E8M0 byte is in [10, 246]; float32 scales or bytes outside that range take the GEMV).
// Where the CPU also has AVX512-VBMI, the GEMV sizes with x exactly bf16 (act_quant's output, bf16 input)
// take the lane kernel (fp8_lane_avx512.cpp: vdpbf16ps with K in the lanes, one summation order per output);
// in the row-invariant mode it serves every M (a weight tile decoded once for many rows, E8M0 scales folded
// into it where that gives the same bits: fold_exact), and the rows it cannot take (not bf16, or products
// that could be subnormal) get the float32 GEMV, each on its own.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "bf16_gemm.h"
#include "common.h"
#include "fp8_kernels.h"
#include "vec.h"

namespace dsv4rt {
namespace {

constexpr int64_t kBlk = 128;

using Fp8Problem = fp8::Fp8Args;

DSV4RT_CLONES void fp8_rows(const Fp8Problem& p, int64_t n0, int64_t n1) {
    alignas(64) float wd[kBlk];
    std::vector<float> acc(static_cast<size_t>(p.m));
    for (int64_t n = n0; n < n1; ++n) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        const uint8_t* wr = p.w + n * p.k;
        for (int64_t kb = 0; kb * p.bs < p.k; ++kb) {
            const int64_t k0 = kb * p.bs, kw = std::min(p.bs, p.k - k0);
            const int64_t si = (n / p.bs) * p.sk + kb;
            const float sc = p.s8 ? kE8M0[p.s8[si]] : p.s32[si];
            for (int64_t j = 0; j < kw; ++j) wd[j] = kE4M3[wr[k0 + j]];
            for (int64_t j = kw; j < kBlk; ++j) wd[j] = 0.0f;
            for (int64_t r = 0; r < p.m; ++r) {
                const float* xr = p.x + r * p.k + k0;
                v16f a = v16f{};
                int64_t j = 0;
                for (; j + 16 <= kw; j += 16) a += load16(wd + j) * load16(xr + j);
                float t = hsum16(a);
                for (; j < kw; ++j) t += wd[j] * xr[j];
                acc[static_cast<size_t>(r)] += t * sc;
            }
        }
        for (int64_t r = 0; r < p.m; ++r) p.y[r * p.n + n] = acc[static_cast<size_t>(r)];
    }
}

// The GEMV over every row of p (threads split the N rows; a row's numerics never depend on the others)
void fp8_gemv(const Fp8Problem& p) {
    if (p.m <= 0 || p.n <= 0) return;
    if (p.k == 0) {
        std::fill(p.y, p.y + p.m * p.n, 0.0f);
        return;
    }
    const double bytes = static_cast<double>(p.n) * p.k * (1 + 0.25 * (p.m - 1));
#if defined(DSV4RT_X86)
    if (active_isa() >= Isa::avx512) {
        parallel_for(p.n, [&](int64_t a, int64_t b) { fp8::rows_avx512(p, a, b); }, pick_threads(bytes, 256 << 10));
        return;
    }
#endif
    parallel_for(p.n, [&](int64_t a, int64_t b) { fp8_rows(p, a, b); }, pick_threads(bytes, 256 << 10));
}

#if defined(DSV4RT_X86)
uint16_t* align64(uint16_t* p) {
    return reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

// Row r of x (float32, or bf16 bits) as bf16 bits into o[0, k) (o is zero past k); returns the smallest biased
// exponent of a nonzero value (255: none), or -1 if a float32 value is not a bf16 value; emax: the largest
// biased exponent (0: none)
int lane_pack_row(const void* x, bool is_bf16, int64_t r, int64_t k, uint16_t* o, int& emax) {
    uint32_t emin = 255, hi = 0;
    if (is_bf16) {
        const uint16_t* p = static_cast<const uint16_t*>(x) + r * k;
        std::memcpy(o, p, static_cast<size_t>(k) * 2);
        for (int64_t i = 0; i < k; ++i)
            if (p[i] & 0x7FFFu) {
                const uint32_t e = (p[i] >> 7) & 0xFFu;
                emin = std::min(emin, e), hi = std::max(hi, e);
            }
        emax = static_cast<int>(hi);
        return static_cast<int>(emin);
    }
    const float* p = static_cast<const float*>(x) + r * k;
    for (int64_t i = 0; i < k; ++i) {
        const uint32_t u = f32_bits(p[i]);
        if (u & 0xFFFFu) return -1;
        if (u & 0x7FFF0000u) {
            const uint32_t e = (u >> 23) & 0xFFu;
            emin = std::min(emin, e), hi = std::max(hi, e);
        }
        o[i] = static_cast<uint16_t>(u >> 16);
    }
    emax = static_cast<int>(hi);
    return static_cast<int>(emin);
}

// Whether the scale-folded tiles (fp8::lane_decode's fold) give a row the lane kernel's bits. With x's biased
// exponents in [emin, emax] and the folded weights' in [bmin - 9, bmax - 127 + 135], every product is a
// multiple of u = 2^(emin + bmin - 9 - 268): u >= 2^-126 keeps every nonzero partial sum normal (nothing
// is flushed, scaling by a power of two commutes with each rounding), and a block's chain (<= 128 products,
// each < 2^(emax - 126 + 9 + b - 127)) stays below 2^127 scaled and unscaled (no overflow). Then the folded
// chain is exactly chain * scale, and tot + chain * scale is fma(chain, scale, tot).
bool fold_exact(int emin, int emax, int bmin, int bmax) {
    return emin + bmin - 9 >= 142 && emax + std::max(bmax, 127) <= 364;
}

// The lane kernel (fp8_kernels.h) for the rows of x (float32 or bf16 bits) that are bf16 and keep every
// product normal (w >= 2^-9: the rule of bf16gemm::products_normal); their outputs go to p.y. Returns the
// other rows, untouched; with all_or_none, any such row makes it compute nothing and return every row.
std::vector<int64_t> lane_gemm(const Fp8Problem& p, const void* x, bool x_bf16, bool all_or_none) {
    const int64_t kp = (p.k + 63) / 64 * 64;
    // rows of x on 64-byte boundaries (kp is a multiple of 64 values): no load of the kernels splits a cache line
    std::vector<uint16_t> xbuf(static_cast<size_t>(p.m * kp + 32), 0);
    uint16_t* const xb = align64(xbuf.data());
    std::vector<int64_t> good, bad;
    std::vector<int> lo, hi;   // the good rows' exponent ranges
    for (int64_t r = 0; r < p.m; ++r) {
        uint16_t* o = xb + static_cast<int64_t>(good.size()) * kp;
        int emax = 0;
        const int e = lane_pack_row(x, x_bf16, r, p.k, o, emax);
        if (e >= 0 && e + (127 - 9) - 127 >= bf16gemm::kMinProductExp) {
            good.push_back(r);
            lo.push_back(e), hi.push_back(emax);
            continue;
        }
        std::fill(o, o + kp, uint16_t{0});
        if (all_or_none) {
            std::vector<int64_t> all(static_cast<size_t>(p.m));
            for (int64_t i = 0; i < p.m; ++i) all[static_cast<size_t>(i)] = i;
            return all;
        }
        bad.push_back(r);
    }
    const int64_t ng = static_cast<int64_t>(good.size());
    if (ng == 0) return bad;
    std::vector<float> yg(bad.empty() ? 0 : static_cast<size_t>(ng * p.n));
    float* y = bad.empty() ? p.y : yg.data();
    const int64_t threads = pick_threads(static_cast<double>(p.n) * p.k * (1 + 0.25 * (std::min<int64_t>(ng, 8) - 1)),
                                         256 << 10);
    if (ng <= 8) {   // the GEMV: threads split N, one pass over the weight for all rows
        parallel_for(p.n, [&](int64_t a, int64_t b) { fp8::lane_rows(p, xb, kp, ng, y, p.n, a, b); }, threads);
    } else {
        // rows whose bits the scale-folded tiles give (fold_exact) first: nf of them
        int bmin = 255, bmax = 0;
        const int64_t ns = ((p.n + p.bs - 1) / p.bs) * p.sk;
        for (int64_t i = 0; p.s8 && i < ns; ++i) bmin = std::min<int>(bmin, p.s8[i]), bmax = std::max<int>(bmax, p.s8[i]);
        const bool fold_w = p.s8 && bmin >= 10 && bmax <= 246;
        std::vector<int64_t> order;
        for (int pass = 0; pass < 2; ++pass)
            for (int64_t i = 0; i < ng; ++i)
                if ((fold_w && fold_exact(lo[static_cast<size_t>(i)], hi[static_cast<size_t>(i)], bmin, bmax)) == (pass == 0))
                    order.push_back(i);
        int64_t nf = 0;
        for (int64_t i = 0; i < ng; ++i)
            nf += fold_w && fold_exact(lo[static_cast<size_t>(i)], hi[static_cast<size_t>(i)], bmin, bmax);
        const bool moved = !std::is_sorted(order.begin(), order.end());
        std::vector<uint16_t> xmoved;
        std::vector<float> ymoved;
        const uint16_t* xs = xb;
        float* ys = y;
        if (moved) {
            xmoved.resize(static_cast<size_t>(ng * kp + 32));
            uint16_t* xm = align64(xmoved.data());
            for (int64_t i = 0; i < ng; ++i)
                std::memcpy(xm + i * kp, xb + order[static_cast<size_t>(i)] * kp, static_cast<size_t>(kp) * 2);
            ymoved.resize(static_cast<size_t>(ng * p.n));
            xs = xm, ys = ymoved.data();
        }
        // tasks of a weight tile (decoded once, ~256 KiB of bf16 in L2) x 48 rows (L1-sized row groups)
        const int64_t mb = 48, nt = std::max<int64_t>(6, std::min<int64_t>(96, (128 << 10) / kp)) / 3 * 3;
        const int64_t ntiles = (p.n + nt - 1) / nt;
        parallel_tasks(ntiles, [&](int64_t t) {
            const int64_t n0 = t * nt, n1 = std::min(p.n, n0 + nt);
            thread_local std::vector<uint16_t> wd;
            wd.resize(static_cast<size_t>(nt * kp + 32));
            uint16_t* const wt = align64(wd.data());
            auto run = [&](int64_t r0, int64_t r1, bool folded) {
                for (int64_t r = r0; r < r1; r += mb)
                    fp8::lane_rows_decoded(p, wt, xs + r * kp, kp, std::min(mb, r1 - r), ys + r * p.n, p.n, n0, n1,
                                           folded);
            };
            int64_t done = 0;
            if (nf > 0 && fp8::lane_decode(p, n0, n1 - n0, kp, wt, true)) {
                run(0, nf, true);
                done = nf;
            }
            if (done < ng) {
                fp8::lane_decode(p, n0, n1 - n0, kp, wt, false);
                run(done, ng, false);
            }
        }, threads);
        if (moved)
            for (int64_t i = 0; i < ng; ++i)
                std::memcpy(y + order[static_cast<size_t>(i)] * p.n, ys + i * p.n, static_cast<size_t>(p.n) * sizeof(float));
    }
    if (!bad.empty())
        for (int64_t i = 0; i < ng; ++i)
            std::memcpy(p.y + good[static_cast<size_t>(i)] * p.n, y + i * p.n, static_cast<size_t>(p.n) * sizeof(float));
    return bad;
}
#endif

// bf16 paths for bs = 32 fold the E8M0 scales into the weights: usable when every byte is in [10, 246]
// (E4M3 magnitudes 2^-9 .. 448 times 2^(e - 127) stay normal bf16); returns the smallest folded biased
// exponent (bf16gemm::products_normal's w_min_exp), or -1 where folding would not be exact
int fold32_min_exp(const uint8_t* s8, int64_t count) {
    if (!s8) return -1;   // float32 scales are not powers of two
    uint8_t lo = 255, hi = 0;
    for (int64_t i = 0; i < count; ++i) {
        lo = std::min(lo, s8[i]);
        hi = std::max(hi, s8[i]);
    }
    return count > 0 && lo >= 10 && hi <= 246 ? lo - 9 : -1;
}

// true if some scale times 256 overflows float32 (E8M0 bytes >= 247, NaN included, or float32 scales above
// FLT_MAX / 256): the block-32 GEMV then multiplies its chunk sums by 256 before the scale
bool scales_wide(const uint8_t* s8, const float* s32, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
        if (s8 ? s8[i] >= 247 : !(std::fabs(s32[i]) <= std::numeric_limits<float>::max() / 256.0f)) return true;
    return false;
}

void fp8_gemm(py::handle x_, py::handle w_, py::handle s_, py::handle out_, bool act_quant, int64_t gemv_max_m,
              bool row_invariant, int64_t block_size) {
    const char* fn = "fp8_gemm";
    if (block_size != 32 && block_size != 128)
        value_error({fn, "block_size"}, "must be 32 or 128, got " + std::to_string(block_size));
    const int64_t bs = block_size;
    auto x = need({fn, "x"}, x_, 2, {Kind::f32, Kind::bf16});
    auto w = need({fn, "w"}, w_, 2, {Kind::u8});
    auto s = need({fn, "w_scale"}, s_, 2, {Kind::u8, Kind::f32});
    auto out = need({fn, "out"}, out_, 2, {Kind::f32, Kind::bf16}, true);
    const int64_t m = dim(x, 0), k = dim(x, 1), n = dim(w, 0);
    const int64_t sn = (n + bs - 1) / bs, sk = (k + bs - 1) / bs;
    need_shape({fn, "w"}, w, {n, k}, "[N, K]");
    need_shape({fn, "w_scale"}, s, {sn, sk}, bs == 32 ? "[ceil(N/32), ceil(K/32)]" : "[ceil(N/128), ceil(K/128)]");
    need_shape({fn, "out"}, out, {m, n}, "[M, N]");
    if (gemv_max_m < 0) value_error({fn, "gemv_max_m"}, "must be >= 0, got " + std::to_string(gemv_max_m));
    const bool s_f32 = kind_of(s) == Kind::f32;
    F32Out y(out);
    F32In xf(x);
    py::gil_scoped_release nogil;
    Fp8Problem p{nullptr, static_cast<const uint8_t*>(w.data()),
                 s_f32 ? nullptr : static_cast<const uint8_t*>(s.data()),
                 s_f32 ? static_cast<const float*>(s.data()) : nullptr, y.ptr, m, n, k, sk, bs};
    if (bs == 32) p.wide = scales_wide(p.s8, p.s32, sn * sk);
    if (act_quant) xf.load_gemm(true, m, k, bs);   // without act_quant, x is loaded below if the bf16 path declines
#if defined(DSV4RT_X86)
    // the lane kernel: the GEMV sizes, and every M in the row-invariant mode (one summation order per output
    // whatever M; the rows it cannot take, there, get the float32 GEMV)
    if ((row_invariant || m <= gemv_max_m) && m > 0 && n > 0 && k > 0 && fp8::lane_available()) {
        const std::vector<int64_t> bad = lane_gemm(p, act_quant ? xf.ptr : xf.data, !act_quant && xf.bf16,
                                                   !row_invariant);
        if (row_invariant && !bad.empty()) {
            if (!act_quant) xf.load();
            const int64_t nb = static_cast<int64_t>(bad.size());
            std::vector<float> xr(static_cast<size_t>(nb * k)), yr(static_cast<size_t>(nb * n));
            for (int64_t i = 0; i < nb; ++i)
                std::memcpy(xr.data() + i * k, xf.ptr + bad[static_cast<size_t>(i)] * k, static_cast<size_t>(k) * sizeof(float));
            Fp8Problem q = p;
            q.x = xr.data(), q.y = yr.data(), q.m = nb;
            fp8_gemv(q);
            for (int64_t i = 0; i < nb; ++i)
                std::memcpy(p.y + bad[static_cast<size_t>(i)] * n, yr.data() + i * n, static_cast<size_t>(n) * sizeof(float));
        }
        if (row_invariant || bad.empty()) {
            y.finish();
            return;
        }
    }
    // the smallest biased exponent of a nonzero (folded, for bs = 32) bf16 weight; -1: no bf16 path
    const bool bf16_wanted = (row_invariant || m > gemv_max_m) && m > 0 && n > 0 && k > 0 && bf16gemm::available();
    const int w_min_exp = !bf16_wanted ? -1 : bs == 128 ? 127 - 9 : fold32_min_exp(p.s8, sn * sk);
    if (row_invariant && w_min_exp >= 0) {
        // each row on its own: bf16 numerics (gemm_few up to gemv_max_m such rows, the blocked GEMM above)
        // where the row allows them, the GEMV otherwise
        bf16gemm::run_rows({act_quant ? xf.ptr : xf.data, !act_quant && xf.bf16, m, k, n, w_min_exp,
                            fp8::decode_tile_bf16, fp8::decode_tile_bf16_t, &p, y.ptr, n}, gemv_max_m,
                           [&p](const float* xr, int64_t rows, float* yr) {
                               Fp8Problem q = p;
                               q.x = xr, q.y = yr, q.m = rows;
                               fp8_gemv(q);
                           });
        y.finish();
        return;
    }
    // prefill sizes: the blocked AVX512-BF16 path, when x is exactly bf16 (bf16 input, or act_quant's
    // E4M3 x power-of-two values) and every product with a nonzero weight (>= 2^-9) stays normal
    bf16gemm::PackedX px;
    if (!row_invariant && w_min_exp >= 0 &&
        bf16gemm::pack_x(act_quant ? xf.ptr : xf.data, xf.bf16, m, k, px) &&
        bf16gemm::products_normal(px, w_min_exp)) {
        bf16gemm::gemm(px, n, fp8::decode_tile_bf16, &p, y.ptr, n);
        y.finish();
        return;
    }
#endif
    // the GEMV (and the only path of row_invariant without AVX512-BF16: a GEMV's rows are independent)
    if (!act_quant) xf.load();
    p.x = xf.ptr;
    fp8_gemv(p);
    y.finish();
}

}  // namespace

void bind_fp8_gemm(py::module_& m) {
    m.def("fp8_gemm", &fp8_gemm, py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("out"),
          py::arg("act_quant") = false, py::arg("gemv_max_m") = 8, py::arg("row_invariant") = false,
          py::arg("block_size") = 128,
          "out[M, N] = x[M, K] @ dequant(w, w_scale)^T for E4M3 weights with bs x bs block scales.\n\n"
          "block_size bs: 128 (V4) or 32 (V4.1). x float32 or bf16 bits [M, K], w uint8 [N, K] (E4M3 bytes), w_scale\n"
          "uint8 (E8M0) or float32 [ceil(N/bs), ceil(K/bs)], out float32 or bf16 bits [M, N]; all C-contiguous.\n"
          "act_quant: x goes through act_quant='fp8' first (as dsv4rt.formats.act_quant_fp8(x, bs)). Small M reads\n"
          "each weight byte once for\n"
          "all rows; above gemv_max_m rows, where the CPU has AVX512-BF16 and x is exactly bf16, a blocked vdpbf16ps\n"
          "GEMM; up to gemv_max_m rows, where the CPU also has AVX512-VBMI, the vdpbf16ps lane GEMV. row_invariant:\n"
          "each row's result depends on that row alone, whatever M (the batch-invariant mode): with AVX512-BF16\n"
          "and AVX512-VBMI the lane kernel's numerics for every row that allows them (any M), else the blocked\n"
          "GEMM's (a kernel with the same bits for up to gemv_max_m rows); the float32 GEMV for the others.");
    m.def("fp8_lane_available", &fp8::lane_available,
          "True where fp8_gemm's lane kernel runs (AVX512-BF16 active and AVX512-VBMI): its GEMV sizes reach higher M.");
}

}  // namespace dsv4rt
