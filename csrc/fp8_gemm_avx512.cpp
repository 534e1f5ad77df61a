// AVX-512 kernel of fp8_gemm (see fp8_gemm.cpp for the driver). Every function carries a target attribute,
// so this file compiles for plain x86-64 and the driver calls it only where the CPU has AVX-512.
//
// E4M3 -> float32 without a table: the byte's 7 magnitude bits shifted left by 7 form an IEEE half whose
// value is the E4M3 value / 256 (exponent bias 15 instead of 7; E4M3 subnormals land on half subnormals,
// so they are exact too), the sign bit moves to bit 15 (see decode32), and vcvtph2ps widens 16 at a
// time. The factor 256 is applied to each 128-block's dot product together with the block scale. A block
// holding an E4M3 NaN byte (0x7F / 0xFF) takes the table path, so NaN weights stay NaN.
#include "fp8_kernels.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>

#include <cmath>

#include "transpose16.h"

namespace dsv4rt {
namespace fp8 {

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c"), always_inline)) inline
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c")))
// the bf16 tile decode runs only on the AVX512-BF16 path (bf16_gemm.h)
#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,avx512bf16"), always_inline)) inline
#define AVX512_BF16_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,avx512bf16")))

namespace {

constexpr int64_t kBlk = 128;
constexpr int64_t kPrefetch = 8192;   // GEMV: software prefetch distance in weight bytes (see fp4_kernels.h)

// true if any of the 128 bytes is an E4M3 NaN (magnitude bits all ones)
AVX512 bool has_nan128(const uint8_t* p) {
    const __m512i m7 = _mm512_set1_epi8(0x7F);
    const __m512i a = _mm512_and_si512(_mm512_loadu_si512(p), m7);
    const __m512i b = _mm512_and_si512(_mm512_loadu_si512(p + 64), m7);
    return (_mm512_cmpeq_epi8_mask(a, m7) | _mm512_cmpeq_epi8_mask(b, m7)) != 0;
}

// 32 E4M3 bytes widened to 16-bit lanes
AVX512 __m512i widen32(const uint8_t* p) {
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 32 widened E4M3 bytes -> two vectors of 16 floats, each the E4M3 value / 256
AVX512 void decode32(__m512i h, __m512& lo, __m512& hi) {
    // t = byte << 7 holds the magnitude at bits 7-13 and the sign at bit 14; adding bit 14 to itself
    // carries the sign into bit 15 (and clears bit 14): three operations instead of five
    const __m512i t = _mm512_slli_epi16(h, 7);
    const __m512i f16 = _mm512_add_epi16(t, _mm512_and_si512(t, _mm512_set1_epi16(0x4000)));
    lo = _mm512_cvtph_ps(_mm512_castsi512_si256(f16));
    hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(f16, 1));
}

// M rows of x against weight rows [n0, n1): y[r, n] = sum over 128-blocks of (block dot) * scale
template <int M>
AVX512 void rows_m(const Fp8Args& a, const float* x, float* y, int64_t n0, int64_t n1) {
    const __m512 k256 = _mm512_set1_ps(256.0f);
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wr = a.w + n * a.k;
        __m512 tot[M];
        float side[M];
        for (int r = 0; r < M; ++r) { tot[r] = _mm512_setzero_ps(); side[r] = 0.0f; }
        for (int64_t kb = 0; kb * kBlk < a.k; ++kb) {
            const int64_t k0 = kb * kBlk, kw = std::min(kBlk, a.k - k0);
            const int64_t si = (n / kBlk) * a.sk + kb;
            const float sc = a.s8 ? kE8M0[a.s8[si]] : a.s32[si];
            // software prefetch kPrefetch bytes ahead (runs on into the next rows, which follow in memory)
            _mm_prefetch(reinterpret_cast<const char*>(wr + k0 + kPrefetch), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(wr + k0 + kPrefetch + 64), _MM_HINT_T0);
            if (kw == kBlk && !has_nan128(wr + k0)) {
                // two accumulators per row (lo and hi halves): with one, a row's 8 FMAs per block form one
                // dependency chain, which bounds the GEMV (M = 1) at 128 bytes per 8 FMA latencies
                __m512 blk[M], blk2[M];
                for (int r = 0; r < M; ++r) blk[r] = blk2[r] = _mm512_setzero_ps();
                for (int64_t j = 0; j < kBlk; j += 32) {
                    __m512 lo, hi;
                    decode32(widen32(wr + k0 + j), lo, hi);
                    for (int r = 0; r < M; ++r) {
                        const float* xr = x + r * a.k + k0 + j;
                        blk[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), blk[r]);
                        blk2[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), blk2[r]);
                    }
                }
                const __m512 scv = _mm512_set1_ps(sc);
                for (int r = 0; r < M; ++r)
                    tot[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_add_ps(blk[r], blk2[r]), k256), scv, tot[r]);
            } else {   // a tail block or a block with NaN bytes: the table
                for (int r = 0; r < M; ++r) {
                    const float* xr = x + r * a.k + k0;
                    float t = 0.0f;
                    for (int64_t j = 0; j < kw; ++j) t += kE4M3[wr[k0 + j]] * xr[j];
                    side[r] += t * sc;
                }
            }
        }
        for (int r = 0; r < M; ++r) y[r * a.n + n] = _mm512_reduce_add_ps(tot[r]) + side[r];
    }
}

// true if any of the 32 widened bytes is an E4M3 NaN
AVX512 bool has_nan32(__m512i h) {
    const __m512i m7 = _mm512_set1_epi16(0x7F);
    return _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, m7), m7) != 0;
}

// the table path of one 32-chunk (NaN bytes, or the K % 32 tail of kw < 32 values)
template <int M>
AVX512 void chunk_table(const Fp8Args& a, const float* x, const uint8_t* wr, int64_t k0, int64_t kw, float sc,
                        float* side) {
    for (int r = 0; r < M; ++r) {
        const float* xr = x + r * a.k + k0;
        float t = 0.0f;
        for (int64_t j = 0; j < kw; ++j) t += kE4M3[wr[k0 + j]] * xr[j];
        side[r] += t * sc;
    }
}

// one 32-chunk without NaN bytes: acc[r] += (chunk dot of row r) * scv (times 256 first when `wide`)
template <int M>
AVX512 void chunk32(const Fp8Args& a, const float* x, const uint8_t* wp, int64_t k0, __m512 scv, __m512* acc) {
    __m512 lo, hi;
    decode32(widen32(wp), lo, hi);
    for (int r = 0; r < M; ++r) {
        const float* xr = x + r * a.k + k0;
        __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xr)));
        if (a.wide) t = _mm512_mul_ps(t, _mm512_set1_ps(256.0f));
        acc[r] = _mm512_fmadd_ps(t, scv, acc[r]);
    }
}

// Block size 32 (V4.1): every 32 k of a weight row has its own scale (row block n / 32), so each 32-chunk's
// partial dot product (one vector per row) is scaled on its own: y = sum over chunks of (chunk dot) * sc.
// The decode's factor 256 is folded into the scale (sc * 256), unless some scale of the call is so large that
// this overflows (`wide`): then the chunk sum is multiplied by 256 first, as the 128 path does. The main loop
// takes 128 bytes per step (one NaN test, four scales); two accumulators per row (even / odd chunks) keep the
// M = 1 FMA chain short. Chunks with NaN bytes and the K % 32 tail take the table.
template <int M>
AVX512 void rows_m32(const Fp8Args& a, const float* x, float* y, int64_t n0, int64_t n1) {
    const float pre = a.wide ? 1.0f : 256.0f;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wr = a.w + n * a.k;
        const int64_t srow = (n / 32) * a.sk;
        __m512 tot[2][M];
        float side[M];
        for (int r = 0; r < M; ++r) { tot[0][r] = tot[1][r] = _mm512_setzero_ps(); side[r] = 0.0f; }
        auto scale = [&](int64_t k0) { const int64_t si = srow + k0 / 32; return a.s8 ? kE8M0[a.s8[si]] : a.s32[si]; };
        int64_t k0 = 0;
        for (; k0 + kBlk <= a.k; k0 += kBlk) {
            // software prefetch kPrefetch bytes ahead, as rows_m
            _mm_prefetch(reinterpret_cast<const char*>(wr + k0 + kPrefetch), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(wr + k0 + kPrefetch + 64), _MM_HINT_T0);
            if (has_nan128(wr + k0)) {
                for (int64_t c = 0; c < kBlk; c += 32) {
                    if (has_nan32(widen32(wr + k0 + c))) chunk_table<M>(a, x, wr, k0 + c, 32, scale(k0 + c), side);
                    else chunk32<M>(a, x, wr + k0 + c, k0 + c, _mm512_set1_ps(scale(k0 + c) * pre), tot[(c >> 5) & 1]);
                }
                continue;
            }
            chunk32<M>(a, x, wr + k0, k0, _mm512_set1_ps(scale(k0) * pre), tot[0]);
            chunk32<M>(a, x, wr + k0 + 32, k0 + 32, _mm512_set1_ps(scale(k0 + 32) * pre), tot[1]);
            chunk32<M>(a, x, wr + k0 + 64, k0 + 64, _mm512_set1_ps(scale(k0 + 64) * pre), tot[0]);
            chunk32<M>(a, x, wr + k0 + 96, k0 + 96, _mm512_set1_ps(scale(k0 + 96) * pre), tot[1]);
        }
        for (int c = 0; k0 + 32 <= a.k; k0 += 32, c ^= 1) {   // the K % 128 rest, 32 at a time
            if (has_nan32(widen32(wr + k0))) chunk_table<M>(a, x, wr, k0, 32, scale(k0), side);
            else chunk32<M>(a, x, wr + k0, k0, _mm512_set1_ps(scale(k0) * pre), tot[c]);
        }
        if (k0 < a.k) chunk_table<M>(a, x, wr, k0, a.k - k0, scale(k0), side);   // the K % 32 tail
        for (int r = 0; r < M; ++r) y[r * a.n + n] = _mm512_reduce_add_ps(_mm512_add_ps(tot[0][r], tot[1][r])) + side[r];
    }
}

// 32 E4M3 bytes -> 32 bf16 patterns of their values (exact: E4M3 values are bf16 values, all normal
// floats once the 1/256 is undone, so vcvtne2ps2bf16 neither rounds nor flushes); NaN bytes -> NaN
// mult: 256 (undoes the decode's 1/256), or 256 * 2^(e - 127) to fold a block-32 E8M0 scale in (exact while
// the products are normal: the caller keeps e in [10, 246])
AVX512_BF16 __m512i decode32_bf16(const uint8_t* p, __m512 mult = _mm512_set1_ps(256.0f)) {
    const __m512i h = widen32(p);
    __m512 lo, hi;
    decode32(h, lo, hi);
    const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, mult), _mm512_mul_ps(lo, mult));
    const __m512i m7 = _mm512_set1_epi16(0x7F);
    const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(h, m7), m7);
    return _mm512_mask_mov_epi16(b, nan, _mm512_set1_epi16(0x7FC0));
}

}  // namespace

namespace {
template <template <int> class K>
AVX512 void rows_all(const Fp8Args& a, int64_t n0, int64_t n1) {
    int64_t r0 = 0;
    for (; r0 + 8 <= a.m; r0 += 8) K<8>::run(a, a.x + r0 * a.k, a.y + r0 * a.n, n0, n1);
    const float* x = a.x + r0 * a.k;
    float* y = a.y + r0 * a.n;
    switch (a.m - r0) {
        case 1: K<1>::run(a, x, y, n0, n1); break;
        case 2: K<2>::run(a, x, y, n0, n1); break;
        case 3: K<3>::run(a, x, y, n0, n1); break;
        case 4: K<4>::run(a, x, y, n0, n1); break;
        case 5: K<5>::run(a, x, y, n0, n1); break;
        case 6: K<6>::run(a, x, y, n0, n1); break;
        case 7: K<7>::run(a, x, y, n0, n1); break;
        default: break;
    }
}
template <int M>
struct Rows128 {
    AVX512 static void run(const Fp8Args& a, const float* x, float* y, int64_t n0, int64_t n1) {
        rows_m<M>(a, x, y, n0, n1);
    }
};
template <int M>
struct Rows32 {
    AVX512 static void run(const Fp8Args& a, const float* x, float* y, int64_t n0, int64_t n1) {
        rows_m32<M>(a, x, y, n0, n1);
    }
};
}  // namespace

AVX512_FN void rows_avx512(const Fp8Args& a, int64_t n0, int64_t n1) {
    if (a.bs == 32) return rows_all<Rows32>(a, n0, n1);
    rows_all<Rows128>(a, n0, n1);
}

// decode_tile_bf16 for block size 32: each 32-chunk's values times its E8M0 scale 2^(e - 127), folded into the
// decode's multiplier (exact: the caller keeps e in [10, 246])
AVX512_BF16 void decode_tile_bf16_32(const Fp8Args& a, int64_t n0, int64_t nt, int64_t kb, uint16_t* wd, float* sc) {
    const int64_t k0 = kb * kBlk, kw = std::min(kBlk, a.k - k0);
    for (int64_t r = 0; r < nt; ++r) {
        const int64_t n = n0 + r;
        const uint8_t* wr = a.w + n * a.k + k0;
        const uint8_t* sr = a.s8 + (n / 32) * a.sk + k0 / 32;
        uint16_t* out = wd + r * kBlk;
        sc[r] = 1.0f;
        int64_t j = 0;
        if (kw == kBlk) {
            _mm_prefetch(reinterpret_cast<const char*>(wr + kBlk), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(wr + kBlk + 64), _MM_HINT_T0);
        }
        for (; j + 32 <= kw; j += 32)   // 256 * 2^(e - 127) = 2^(e - 119), a normal float for e >= 10
            _mm512_storeu_si512(out + j, decode32_bf16(wr + j, _mm512_set1_ps(bits_f32(static_cast<uint32_t>(sr[j / 32] + 8) << 23))));
        for (; j < kw; ++j) {   // the K % 32 tail
            const uint8_t byte = wr[j];
            out[j] = (byte & 0x7F) == 0x7F ? static_cast<uint16_t>(0x7FC0 | ((byte & 0x80) << 8))
                                           : f32_to_bf16(kE4M3[byte] * kE8M0[sr[j / 32]]);
        }
        std::fill(out + kw, out + kBlk, uint16_t{0});
    }
}

AVX512_BF16_FN void decode_tile_bf16(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint16_t* wd, float* sc) {
    const Fp8Args& a = *static_cast<const Fp8Args*>(ctx);
    if (a.bs == 32) return decode_tile_bf16_32(a, n0, nt, kb, wd, sc);
    const int64_t k0 = kb * kBlk, kw = std::min(kBlk, a.k - k0);
    for (int64_t r = 0; r < nt; ++r) {
        const int64_t n = n0 + r;
        const uint8_t* wr = a.w + n * a.k + k0;
        uint16_t* out = wd + r * kBlk;
        const int64_t si = (n / kBlk) * a.sk + kb;
        sc[r] = a.s8 ? kE8M0[a.s8[si]] : a.s32[si];
        if (kw == kBlk) {
            // the same rows' next K block is decoded next: fetch it while this block is multiplied (48
            // strided rows are more streams than the hardware prefetcher follows)
            _mm_prefetch(reinterpret_cast<const char*>(wr + kBlk), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(wr + kBlk + 64), _MM_HINT_T0);
            for (int64_t j = 0; j < kBlk; j += 32)
                _mm512_storeu_si512(out + j, decode32_bf16(wr + j));
            continue;
        }
        for (int64_t j = 0; j < kw; ++j) {   // the K % 128 tail block
            const uint8_t b = wr[j];
            out[j] = (b & 0x7F) == 0x7F ? static_cast<uint16_t>(0x7FC0 | ((b & 0x80) << 8)) : f32_to_bf16(kE4M3[b]);
        }
        std::fill(out + kw, out + kBlk, uint16_t{0});
    }
}

namespace {
// bf16 bits of the E4M3 magnitudes 0..127 (127: NaN), four 32-entry tables for vpermt2w
struct E4M3Tables {
    alignas(64) uint16_t t[128];
    E4M3Tables() {
        for (int m = 0; m < 127; ++m) t[m] = f32_to_bf16(kE4M3[m]);
        t[127] = 0x7FC0;
    }
};

// 32 E4M3 bytes in 16-bit lanes -> their bf16 values (decode32_bf16's bits, except that a NaN keeps its sign)
AVX512 __m512i e4m3_bf16(__m512i h, const __m512i tb[4]) {
    // vpermt2w reads 6 index bits: magnitudes 0-63 from the first table pair, 64-127 from the second
    const __m512i lo = _mm512_permutex2var_epi16(tb[0], h, tb[1]);
    const __m512i hi = _mm512_permutex2var_epi16(tb[2], h, tb[3]);
    const __m512i b = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(h, _mm512_set1_epi16(0x40)), lo, hi);
    // b | (h << 8 & 0x8000): the sign bit
    return _mm512_ternarylogic_epi32(b, _mm512_slli_epi16(h, 8), _mm512_set1_epi16(static_cast<int16_t>(0x8000)), 0xF8);
}
// bf16 values b plus `add` (e - 127 in the exponent field) where b is nonzero and not NaN
AVX512 __m512i fold_exp(__m512i b, __m512i add) {
    const __m512i mag = _mm512_set1_epi16(0x7FFF);
    const __mmask32 live = _mm512_test_epi16_mask(b, mag) &
                           ~_mm512_cmpeq_epi16_mask(_mm512_and_si512(b, mag), _mm512_set1_epi16(0x7FC0));
    return _mm512_mask_add_epi16(b, live, b, add);
}
}  // namespace

// decode_tile_bf16's values transposed: the 16 rows' bytes are transposed as dwords in registers (64 bytes
// at a time), then each dword (4 bytes = 2 pairs) is spread into 16-bit lanes and decoded by table straight
// into 16-row vectors of pairs
AVX512_FN bool decode_tile_bf16_t(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint32_t* wt, float* sc) {
    const Fp8Args& a = *static_cast<const Fp8Args*>(ctx);
    const int64_t k0 = kb * kBlk;
    if (a.k - k0 < kBlk || (a.bs != 128 && !a.s8)) return false;
    const bool fold = a.bs == 32;   // block 32: E8M0 scales folded into the values (the caller checked the range)
    static const E4M3Tables tables;
    __m512i tb[4];
    for (int i = 0; i < 4; ++i) tb[i] = _mm512_load_si512(tables.t + 32 * i);
    // per dword: bytes (0, 1) and (2, 3) into the two 16-bit halves
    const __m512i spread0 = _mm512_set4_epi32(static_cast<int>(0x800D800C), static_cast<int>(0x80098008),
                                              static_cast<int>(0x80058004), static_cast<int>(0x80018000));
    const __m512i spread1 = _mm512_set4_epi32(static_cast<int>(0x800F800E), static_cast<int>(0x800B800A),
                                              static_cast<int>(0x80078006), static_cast<int>(0x80038002));
    constexpr int64_t kNt = 48;   // bf16_gemm.h kNt: the row stride of wt
    for (int64_t g = 0; g < nt; g += 16) {
        const int64_t rows = std::min<int64_t>(16, nt - g);
        const uint8_t* wr[16];
        for (int j = 0; j < 16; ++j) {
            const int64_t r = std::min<int64_t>(j, rows - 1);
            wr[j] = a.w + (n0 + g + r) * a.k + k0;
            _mm_prefetch(reinterpret_cast<const char*>(wr[j] + 8 * kBlk), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(wr[j] + 8 * kBlk + 64), _MM_HINT_T0);
            if (j < rows && !fold) {
                const int64_t n = n0 + g + j, si = (n / kBlk) * a.sk + kb;
                sc[g + j] = a.s8 ? kE8M0[a.s8[si]] : a.s32[si];
            }
            if (j < rows && fold) sc[g + j] = 1.0f;
        }
        // block 32: per 32-block c of the K block, lane j's exponent offset (e - 127) in both 16-bit halves
        __m512i add[kBlk / 32];
        if (fold) {
            alignas(64) uint32_t e[kBlk / 32][16];
            for (int j = 0; j < 16; ++j) {
                const int64_t n = n0 + g + std::min<int64_t>(j, rows - 1);
                const uint8_t* sr = a.s8 + (n / 32) * a.sk + kb * (kBlk / 32);
                for (int c = 0; c < kBlk / 32; ++c) {
                    const uint32_t u = static_cast<uint16_t>((static_cast<int>(sr[c]) - 127) * 128);
                    e[c][j] = u | (u << 16);
                }
            }
            for (int c = 0; c < kBlk / 32; ++c) add[c] = _mm512_load_si512(e[c]);
        }
        for (int64_t half = 0; half < kBlk; half += 64) {
            __m512i v[16];
            for (int j = 0; j < 16; ++j) v[j] = _mm512_loadu_si512(wr[j] + half);
            transpose16(v);   // v[q] lane j: bytes half + 4q .. + 3 of row j = pairs half / 2 + 2q, + 1
            for (int64_t q = 0; q < 16; ++q) {
                uint32_t* out = wt + (half / 2 + 2 * q) * kNt + g;
                const int c = static_cast<int>((half + 4 * q) / 32);
                __m512i b0 = e4m3_bf16(_mm512_shuffle_epi8(v[q], spread0), tb);
                __m512i b1 = e4m3_bf16(_mm512_shuffle_epi8(v[q], spread1), tb);
                if (fold) {
                    b0 = fold_exp(b0, add[c]);
                    b1 = fold_exp(b1, add[c]);
                }
                _mm512_storeu_si512(out, b0);
                _mm512_storeu_si512(out + kNt, b1);
            }
        }
    }
    return true;
}

}  // namespace fp8
}  // namespace dsv4rt

#endif  // DSV4RT_X86
