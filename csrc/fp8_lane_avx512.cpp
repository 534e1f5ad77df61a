// The bf16 "lane" kernel of fp8_gemm (see fp8_gemm.cpp for the driver and fp8_kernels.h for the contract):
// E4M3 weights dotted with bf16 rows of x by vdpbf16ps with K in the vector lanes, so one pass streams the
// weight at the rate of a GEMV and every output is summed the same way whatever the number of rows.
//
// Decode: 64 E4M3 bytes become 64 bf16 values in six instructions: two vpermt2b look up the high and the low
// byte of each magnitude's bf16 pattern (128-entry tables; E4M3 values, subnormals included, are normal bf16
// values and the NaN magnitude maps to a bf16 NaN), a ternary logic op moves the sign bit in, and two more
// vpermt2b interleave low and high bytes into 16-bit lanes in k order. The decode is exact, so the numerics
// are those of the instruction on exact bf16 operands.
//
// Numerics of one output y[r, n] (identical for every row count, tile shape and thread count):
//  * bs = 128: per K block, one vdpbf16ps chain over the block's 32-wide steps in k order (lane l of step s
//    sums the pair k = 32s + 2l, 32s + 2l + 1 of the block), then tot = fma(chain, scale, tot);
//  * bs = 32: per 32-wide block, tot = fma(vdpbf16ps(0, x, w), scale, tot);
//  * y = the fixed halving tree of tot's 16 lanes (reduce16).
// Zero bytes past K (masked loads) meet the zero padding of x, so the tail needs no other code.
#include "fp8_kernels.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>

namespace dsv4rt {
namespace fp8 {

#define LANE __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi"), always_inline)) inline
#define LANE_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi")))

namespace {

constexpr int64_t kPrefetch = 4096;   // weight bytes ahead per row stream (the C rows of a tile are C streams)

// the high and the low byte of the bf16 pattern of each E4M3 magnitude 0..127 (127: NaN)
struct ByteTables {
    alignas(64) uint8_t hi[128];
    alignas(64) uint8_t lo[128];
    ByteTables() {
        for (int m = 0; m < 128; ++m) {
            const uint16_t b = m == 127 ? uint16_t{0x7FC0} : f32_to_bf16(kE4M3[m]);
            hi[m] = static_cast<uint8_t>(b >> 8);
            lo[m] = static_cast<uint8_t>(b & 0xFF);
        }
    }
};

struct Decoder {
    __m512i hi0, hi1, lo0, lo1, ilo, ihi;
    LANE explicit Decoder(const ByteTables& t) {
        hi0 = _mm512_load_si512(t.hi), hi1 = _mm512_load_si512(t.hi + 64);
        lo0 = _mm512_load_si512(t.lo), lo1 = _mm512_load_si512(t.lo + 64);
        alignas(64) uint8_t a[64], b[64];
        for (int i = 0; i < 32; ++i) {   // output byte 2i: low byte i; 2i + 1: high byte i (index bit 6: 2nd table)
            a[2 * i] = static_cast<uint8_t>(i), a[2 * i + 1] = static_cast<uint8_t>(64 + i);
            b[2 * i] = static_cast<uint8_t>(32 + i), b[2 * i + 1] = static_cast<uint8_t>(96 + i);
        }
        ilo = _mm512_load_si512(a), ihi = _mm512_load_si512(b);
    }
    // 64 bytes (masked: zero where the mask is clear) -> bf16 values k 0..31 (w0) and 32..63 (w1)
    LANE void run(const uint8_t* p, __mmask64 mask, __m512i& w0, __m512i& w1) const {
        const __m512i b = _mm512_maskz_loadu_epi8(mask, p);
        __m512i h = _mm512_permutex2var_epi8(hi0, b, hi1);
        const __m512i l = _mm512_permutex2var_epi8(lo0, b, lo1);
        h = _mm512_ternarylogic_epi32(h, b, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);   // h | (b & 0x80)
        w0 = _mm512_permutex2var_epi8(l, ilo, h);
        w1 = _mm512_permutex2var_epi8(l, ihi, h);
    }
};

// the fixed reduction of one output's 16 lanes
LANE float reduce16(__m512 v) {
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

// R rows of x (bf16 [R][kp]) x C weight rows n .. n + C - 1: y[r * ldy + n + c]
template <int R, int C>
LANE void tile(const Fp8Args& a, const Decoder& dec, const uint16_t* xb, int64_t kp, float* y, int64_t ldy,
               int64_t n) {
    const int64_t bs = a.bs;
    __m512 tot[R][C], acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) tot[r][c] = acc[r][c] = _mm512_setzero_ps();
    const uint8_t* wr[C];
    int64_t srow[C];
    for (int c = 0; c < C; ++c) wr[c] = a.w + (n + c) * a.k, srow[c] = ((n + c) / bs) * a.sk;
    auto scale = [&](int c, int64_t k) { const int64_t si = srow[c] + k / bs; return a.s8 ? kE8M0[a.s8[si]] : a.s32[si]; };
    for (int64_t k0 = 0; k0 < a.k; k0 += 64) {
        const int64_t left = a.k - k0;
        const __mmask64 mask = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
        __m512i w[C][2];
        for (int c = 0; c < C; ++c) {
            _mm_prefetch(reinterpret_cast<const char*>(wr[c] + k0 + kPrefetch), _MM_HINT_T0);
            dec.run(wr[c] + k0, mask, w[c][0], w[c][1]);
        }
        for (int h = 0; h < 2; ++h) {
            const int64_t k = k0 + 32 * h;
            if (k >= a.k) break;
            const bool end = bs == 32 || (k + 32) % 128 == 0 || k + 32 >= a.k;   // the last step of a K block
            for (int r = 0; r < R; ++r) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + r * kp + k);
                for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, (__m512bh)w[c][h]);
            }
            if (end) {
                for (int c = 0; c < C; ++c) {
                    const __m512 s = _mm512_set1_ps(scale(c, k));
                    for (int r = 0; r < R; ++r) {
                        tot[r][c] = _mm512_fmadd_ps(acc[r][c], s, tot[r][c]);
                        acc[r][c] = _mm512_setzero_ps();
                    }
                }
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) y[r * ldy + n + c] = reduce16(tot[r][c]);
}

// R rows against weight rows [n0, n1): C rows of the weight at a time while the tile's chains fit
template <int R>
LANE void rows_r(const Fp8Args& a, const Decoder& dec, const uint16_t* xb, int64_t kp, float* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
    constexpr int C = R == 1 ? 4 : R == 2 ? 3 : R <= 4 ? 2 : 1;   // R * C chains; acc, tot and w fit the registers
    int64_t n = n0;
    for (; n + C <= n1; n += C) tile<R, C>(a, dec, xb, kp, y, ldy, n);
    for (; n < n1; ++n) tile<R, 1>(a, dec, xb, kp, y, ldy, n);
}

}  // namespace

bool lane_available() {
    static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
    return vbmi && active_isa() >= Isa::avx512_bf16;
}

LANE_FN void lane_rows(const Fp8Args& a, const uint16_t* xb, int64_t kp, int64_t rows, float* y, int64_t ldy,
                       int64_t n0, int64_t n1) {
    static const ByteTables tables;
    const Decoder dec(tables);
    int64_t r0 = 0;
    for (; r0 + 8 <= rows; r0 += 8) rows_r<8>(a, dec, xb + r0 * kp, kp, y + r0 * ldy, ldy, n0, n1);
    const uint16_t* x = xb + r0 * kp;
    float* yr = y + r0 * ldy;
    switch (rows - r0) {
        case 1: rows_r<1>(a, dec, x, kp, yr, ldy, n0, n1); break;
        case 2: rows_r<2>(a, dec, x, kp, yr, ldy, n0, n1); break;
        case 3: rows_r<3>(a, dec, x, kp, yr, ldy, n0, n1); break;
        case 4: rows_r<4>(a, dec, x, kp, yr, ldy, n0, n1); break;
        case 5: rows_r<5>(a, dec, x, kp, yr, ldy, n0, n1); break;
        case 6: rows_r<6>(a, dec, x, kp, yr, ldy, n0, n1); break;
        case 7: rows_r<7>(a, dec, x, kp, yr, ldy, n0, n1); break;
        default: break;
    }
}

}  // namespace fp8
}  // namespace dsv4rt

#else

namespace dsv4rt {
namespace fp8 {
bool lane_available() { return false; }
void lane_rows(const Fp8Args&, const uint16_t*, int64_t, int64_t, float*, int64_t, int64_t, int64_t) {}
}  // namespace fp8
}  // namespace dsv4rt

#endif
