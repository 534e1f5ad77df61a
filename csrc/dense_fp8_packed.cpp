// A dense GEMM on a weight kept in its released FP8 form (E4M3 + E8M0 block scales) with the bits of dense_gemm
// on that weight dequantised to bf16: for the grouped output projection wo_a, which the released checkpoint
// stores in FP8 and the reference computes in bf16 (runtime/model/attention.py). Kept as FP8, the weight
// is half the bytes of its bf16 copy (at V4-Flash widths 32 MiB instead of 64 per layer), and a decode-size
// call reads half as much.
//
// dense_fp8_pack checks that the bf16 dequantisation is exact for every value (no NaN byte; every scale byte
// in [10, 246], where E4M3 x 2^(e - 127) is a normal bf16) and writes the bytes as [ceil(N/8), ceil(K/32), 8,
// 32] (zeros past N and K, the layout of glue_bf16_packed.cpp) with one exponent offset per 8 columns x 32 k
// (bs = 128 or 32: each such tile lies in one scale block). dense_fp8_packed decodes each tile to bf16 (the
// E4M3 tables of fp8_lane_avx512.cpp's decode, the offset added to the exponent of the nonzero values: the
// dequantised bf16 value, -0 kept) and sums it exactly as dense_gemm's AVX512-BF16 path does: one vdpbf16ps
// chain over k in steps of 32 from zero (x zero past K), then the hsum tree (l + 8, + 4, + 2, + 1), rounded to
// bf16 (more than 4 rows: each 8-column group decoded once into glue_bf16_packed.cpp's bf16 layout and summed
// by its code). So dense_fp8_packed(x, dense_fp8_pack(w, s)) == dense_gemm(x, bf16(dequant(w, s))), bit for bit.
// Needs AVX512-BF16 and AVX512-VBMI; elsewhere it declines (returns False) and the caller keeps bf16.
#include "common.h"
#include "dense_bf16_group.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>
#endif

namespace dsv4rt {
namespace {

constexpr int64_t kCols = 8, kStep = 32;
constexpr int kMinScale = 10, kMaxScale = 246;

#if defined(DSV4RT_X86)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi")

// the bf16 pattern of each E4M3 magnitude (0..126; 127 is NaN, which dense_fp8_pack refuses) as a high and a low
// byte table, and the byte interleave that makes 16-bit lanes of them in k order
struct Tables {
    alignas(64) uint8_t hi[128], lo[128], ilo[64], ihi[64];
    Tables() {
        for (int m = 0; m < 128; ++m) {
            const uint16_t b = m == 127 ? uint16_t{0x7FC0} : f32_to_bf16(kE4M3[m]);
            hi[m] = static_cast<uint8_t>(b >> 8);
            lo[m] = static_cast<uint8_t>(b & 0xFF);
        }
        for (int i = 0; i < 32; ++i) {
            ilo[2 * i] = static_cast<uint8_t>(i), ilo[2 * i + 1] = static_cast<uint8_t>(64 + i);
            ihi[2 * i] = static_cast<uint8_t>(32 + i), ihi[2 * i + 1] = static_cast<uint8_t>(96 + i);
        }
    }
};

struct Decode {
    __m512i hi0, hi1, lo0, lo1, ilo, ihi;
    explicit Decode(const Tables& t)
        : hi0(_mm512_load_si512(t.hi)), hi1(_mm512_load_si512(t.hi + 64)), lo0(_mm512_load_si512(t.lo)),
          lo1(_mm512_load_si512(t.lo + 64)), ilo(_mm512_load_si512(t.ilo)), ihi(_mm512_load_si512(t.ihi)) {}
    // 64 bytes = two columns' 32 k values -> their bf16 values, the exponent offset d added where nonzero
    __attribute__((always_inline)) inline void run(const uint8_t* p, __m512i d, __m512i& w0, __m512i& w1) const {
        const __m512i b = _mm512_loadu_si512(p);
        __m512i h = _mm512_permutex2var_epi8(hi0, b, hi1);
        const __m512i l = _mm512_permutex2var_epi8(lo0, b, lo1);
        h = _mm512_ternarylogic_epi32(h, b, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);   // h | (b & 0x80)
        w0 = _mm512_permutex2var_epi8(l, ilo, h);
        w1 = _mm512_permutex2var_epi8(l, ihi, h);
        const __m512i mag = _mm512_set1_epi16(0x7FFF);
        w0 = _mm512_mask_add_epi16(w0, _mm512_test_epi16_mask(w0, mag), w0, d);
        w1 = _mm512_mask_add_epi16(w1, _mm512_test_epi16_mask(w1, mag), w1, d);
    }
};

// dense_gemm.cpp's hsum tree: (l, l + 8), then (l, l + 4), (l, l + 2), (0, 1)
__attribute__((always_inline)) inline float hsum_tree(__m512 v) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(s2) + _mm_cvtss_f32(_mm_shuffle_ps(s2, s2, 1));
}

// rows m0 .. m0 + R - 1 of x against the 8 columns of group g (tiles wg, offsets dg): y [m, n] float
template <int R>
__attribute__((always_inline)) inline void group_rows(const Decode& dec, const uint16_t* x, const uint8_t* wg,
                                                      const int16_t* dg, float* y, int64_t m0, int64_t n, int64_t k,
                                                      int64_t steps, int64_t n0) {
    __m512 acc[R][kCols];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < steps; ++s) {
        const int64_t k0 = s * kStep;
        const __mmask32 mask = k - k0 >= 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << (k - k0)) - 1);
        __m512bh xv[R];
        for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (m0 + r) * k + k0);
        const __m512i d = _mm512_set1_epi16(dg[s]);
        const uint8_t* ws = wg + s * kCols * kStep;
        for (int c = 0; c < kCols; c += 2) {
            __m512i w0, w1;
            dec.run(ws + c * kStep, d, w0, w1);
            for (int r = 0; r < R; ++r) {
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv[r], (__m512bh)w0);
                acc[r][c + 1] = _mm512_dpbf16_ps(acc[r][c + 1], xv[r], (__m512bh)w1);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < kCols && n0 + c < n; ++c) y[(m0 + r) * n + n0 + c] = hsum_tree(acc[r][c]);
}

void groups_fp8(const uint16_t* x, const uint8_t* w, const int16_t* d, float* y, int64_t m, int64_t n, int64_t k,
                int64_t steps, int64_t g0, int64_t g1) {
    static const Tables tables;
    const Decode dec(tables);
    thread_local std::vector<uint16_t> buf;
    for (int64_t g = g0; g < g1; ++g) {
        const uint8_t* wg = w + g * steps * kCols * kStep;
        const int16_t* dg = d + g * steps;
        if (m > 4) {   // more rows than one register tile: the group decoded once, then read as bf16 by every tile
            buf.resize(static_cast<size_t>(steps * kCols * kStep));
            for (int64_t s = 0; s < steps; ++s) {
                const __m512i dv = _mm512_set1_epi16(dg[s]);
                for (int c = 0; c < kCols; c += 2) {
                    __m512i w0, w1;
                    dec.run(wg + (s * kCols + c) * kStep, dv, w0, w1);
                    _mm512_storeu_si512(buf.data() + (s * kCols + c) * kStep, w0);
                    _mm512_storeu_si512(buf.data() + (s * kCols + c + 1) * kStep, w1);
                }
            }
            dense_bf16_group(x, buf.data(), y, m, n, k, steps, g * kCols);
            continue;
        }
        int64_t r = 0;
        for (; r + 4 <= m; r += 4) group_rows<4>(dec, x, wg, dg, y, r, n, k, steps, g * kCols);
        for (; r < m; ++r) group_rows<1>(dec, x, wg, dg, y, r, n, k, steps, g * kCols);
    }
}
#pragma GCC pop_options

bool fast() {
    static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
    return vbmi && active_isa() >= Isa::avx512_bf16;
}
#else
bool fast() { return false; }
#endif

// (packed [G, S, 8, 32] uint8, offsets [G, S] int16) or None where the bf16 dequantisation is not exact
py::object dense_fp8_pack(py::handle w_, py::handle s_, int64_t bs) {
    const char* fn = "dense_fp8_pack";
    if (bs != 32 && bs != 128) value_error({fn, "block_size"}, "must be 32 or 128, got " + std::to_string(bs));
    auto w = need({fn, "w"}, w_, 2, {Kind::u8});
    auto sc = need({fn, "w_scale"}, s_, 2, {Kind::u8});
    const int64_t n = dim(w, 0), k = dim(w, 1);
    need_shape({fn, "w_scale"}, sc, {(n + bs - 1) / bs, (k + bs - 1) / bs}, "[ceil(N/bs), ceil(K/bs)] (E8M0 bytes)");
    const int64_t groups = (n + kCols - 1) / kCols, steps = (k + kStep - 1) / kStep, sk = (k + bs - 1) / bs;
    const uint8_t* src = static_cast<const uint8_t*>(w.data());
    const uint8_t* sp = static_cast<const uint8_t*>(sc.data());
    for (int64_t i = 0; i < n * k; ++i)
        if ((src[i] & 0x7F) == 0x7F) return py::none();
    for (int64_t i = 0; i < sc.size(); ++i)
        if (sp[i] < kMinScale || sp[i] > kMaxScale) return py::none();
    py::array_t<uint8_t> out({groups, steps, kCols, kStep});
    py::array_t<int16_t> off({groups, steps});
    uint8_t* dst = out.mutable_data();
    int16_t* dp = off.mutable_data();
    {
        py::gil_scoped_release nogil;
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t s = 0; s < steps; ++s) {
                const int64_t k0 = s * kStep, rb = std::min(g * kCols, n - 1) / bs;
                dp[g * steps + s] = static_cast<int16_t>((sp[rb * sk + k0 / bs] - 127) * 128);
                for (int64_t c = 0; c < kCols; ++c) {
                    uint8_t* o = dst + ((g * steps + s) * kCols + c) * kStep;
                    const int64_t row = g * kCols + c, valid = row < n ? std::min<int64_t>(kStep, k - k0) : 0;
                    for (int64_t j = 0; j < kStep; ++j) o[j] = j < valid ? src[row * k + k0 + j] : uint8_t(0);
                }
            }
    }
    return py::make_tuple(out, off);
}

bool dense_fp8_packed(py::handle x_, py::handle wp_, py::handle off_, int64_t n, py::handle out_) {
    const char* fn = "dense_fp8_packed";
    auto x = need({fn, "x"}, x_, 2, {Kind::bf16});
    auto wp = need({fn, "w_packed"}, wp_, 4, {Kind::u8});
    auto off = need({fn, "offsets"}, off_, 2, {Kind::any});
    auto out = need({fn, "out"}, out_, 2, {Kind::bf16}, true);
    const int64_t m = dim(x, 0), k = dim(x, 1);
    if (n < 0) value_error({fn, "n"}, "must be >= 0, got " + std::to_string(n));
    const int64_t groups = (n + kCols - 1) / kCols, steps = (k + kStep - 1) / kStep;
    need_shape({fn, "w_packed"}, wp, {groups, steps, kCols, kStep},
               "[ceil(N/8), ceil(K/32), 8, 32] (dense_fp8_pack of the [N, K] weight; K = x.shape[1])");
    need_shape({fn, "offsets"}, off, {groups, steps}, "[ceil(N/8), ceil(K/32)] (dense_fp8_pack's second output)");
    if (off.itemsize() != 2) value_error({fn, "offsets"}, "must be int16 (dense_fp8_pack's second output)");
    need_shape({fn, "out"}, out, {m, n}, "[M, N]");
    if (!fast()) return false;
#if defined(DSV4RT_X86)
    const uint16_t* xp = static_cast<const uint16_t*>(x.data());
    const uint8_t* wpp = static_cast<const uint8_t*>(wp.data());
    const int16_t* dp = static_cast<const int16_t*>(off.data());
    uint16_t* op = static_cast<uint16_t*>(out.mutable_data());
    py::gil_scoped_release nogil;
    groups_to_bf16(m, n, k, groups, op, [&](float* y, int64_t g0, int64_t g1) {
        groups_fp8(xp, wpp, dp, y, m, n, k, steps, g0, g1);
    });
    return true;
#else
    return false;
#endif
}

}  // namespace

void bind_dense_fp8_packed(py::module_& m) {
    m.def("dense_fp8_pack", &dense_fp8_pack, py::arg("w"), py::arg("w_scale"), py::arg("block_size") = 128,
          "w [N, K] E4M3 bytes with E8M0 block scales w_scale [ceil(N/bs), ceil(K/bs)] (bs = block_size, 128 or\n"
          "32) -> (w_packed uint8 [ceil(N/8), ceil(K/32), 8, 32], offsets int16 [ceil(N/8), ceil(K/32)]), the form\n"
          "dense_fp8_packed reads; None where dequantising to bf16 would not be exact (a NaN byte, a scale byte\n"
          "outside [10, 246]): keep the bf16 weight then.");
    m.def("dense_fp8_packed", &dense_fp8_packed, py::arg("x"), py::arg("w_packed"), py::arg("offsets"), py::arg("n"),
          py::arg("out"),
          "out[M, N] (bf16 bits) = x[M, K] @ W^T for bf16 x and (w_packed, offsets) = dense_fp8_pack(w, w_scale):\n"
          "bit for bit dense_gemm(x, W) with W = dequant(w, w_scale) in bf16. Returns False (out untouched) where\n"
          "the CPU lacks AVX512-BF16 or AVX512-VBMI.");
}

}  // namespace dsv4rt
