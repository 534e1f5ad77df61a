// AVX-512 kernels of the MXFP4 GEMMs (see fp4_gemm.cpp for the design). Every function carries a target
// attribute, so this file compiles for plain x86-64 and the driver calls it only where the CPU has AVX-512.
#include "fp4_kernels.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>

#include "transpose16.h"

namespace dsv4rt {
namespace fp4 {

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), always_inline)) inline
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))

void permute_x_avx512(const float* x, int64_t k, float* out) {
    const int64_t full = k / 128 * 128;
    for (int64_t c = 0; c < full; c += 128)
        for (int j = 0; j < 8; ++j)
            for (int i = 0; i < 16; ++i) out[c + j * 16 + i] = x[c + 8 * i + j];
    permute_x_pairs(x + full, k - full, out + full);
}

// 16 E8M0 bytes -> 16 floats 2^(e-127) (vscalefps handles e = 0, the subnormal 2^-127, exactly)
AVX512 __m512 scale16(const uint8_t* p) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_scalef_ps(_mm512_set1_ps(1.0f), _mm512_cvtepi32_ps(_mm512_sub_epi32(e, _mm512_set1_epi32(127))));
}

// The 4 scales of one 128-chunk, each repeated over the 4 lanes whose codes fall in its 32-block.
AVX512 __m512 scale4(const uint8_t* p) {
    uint32_t u;
    std::memcpy(&u, p, 4);
    const __m128i rep = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i e = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(static_cast<int>(u)), rep));
    return _mm512_scalef_ps(_mm512_set1_ps(1.0f), _mm512_cvtepi32_ps(_mm512_sub_epi32(e, _mm512_set1_epi32(127))));
}

template <int M>
AVX512 void chunk128(const uint8_t* wp, const float* xp, int64_t k, __m512 sv, __m512 tbl, __m512* acc) {
    const __m512i v = _mm512_loadu_si512(wp);
    const __m512 w0 = _mm512_permutexvar_ps(v, tbl);
    const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tbl);
    const __m512 w2 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), tbl);
    const __m512 w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), tbl);
    const __m512 w4 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), tbl);
    const __m512 w5 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), tbl);
    const __m512 w6 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), tbl);
    const __m512 w7 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), tbl);
    if (M == 1) {   // one row: sum the 8 products first, apply the 4 scales once
        __m512 t0 = _mm512_mul_ps(w0, _mm512_loadu_ps(xp));
        __m512 t1 = _mm512_mul_ps(w1, _mm512_loadu_ps(xp + 16));
        t0 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xp + 32), t0);
        t1 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xp + 48), t1);
        t0 = _mm512_fmadd_ps(w4, _mm512_loadu_ps(xp + 64), t0);
        t1 = _mm512_fmadd_ps(w5, _mm512_loadu_ps(xp + 80), t1);
        t0 = _mm512_fmadd_ps(w6, _mm512_loadu_ps(xp + 96), t0);
        t1 = _mm512_fmadd_ps(w7, _mm512_loadu_ps(xp + 112), t1);
        acc[0] = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), sv, acc[0]);
        return;
    }
    // several rows: scale the decoded codes once, then 8 FMAs per row
    const __m512 s0 = _mm512_mul_ps(w0, sv), s1 = _mm512_mul_ps(w1, sv), s2 = _mm512_mul_ps(w2, sv);
    const __m512 s3 = _mm512_mul_ps(w3, sv), s4 = _mm512_mul_ps(w4, sv), s5 = _mm512_mul_ps(w5, sv);
    const __m512 s6 = _mm512_mul_ps(w6, sv), s7 = _mm512_mul_ps(w7, sv);
    for (int m = 0; m < M; ++m) {   // two accumulators per row (acc[2m], acc[2m+1]): shorter FMA chains
        const float* xm = xp + m * k;
        __m512 a = acc[2 * m], b = acc[2 * m + 1];
        a = _mm512_fmadd_ps(s0, _mm512_loadu_ps(xm), a);
        b = _mm512_fmadd_ps(s1, _mm512_loadu_ps(xm + 16), b);
        a = _mm512_fmadd_ps(s2, _mm512_loadu_ps(xm + 32), a);
        b = _mm512_fmadd_ps(s3, _mm512_loadu_ps(xm + 48), b);
        a = _mm512_fmadd_ps(s4, _mm512_loadu_ps(xm + 64), a);
        b = _mm512_fmadd_ps(s5, _mm512_loadu_ps(xm + 80), b);
        a = _mm512_fmadd_ps(s6, _mm512_loadu_ps(xm + 96), a);
        b = _mm512_fmadd_ps(s7, _mm512_loadu_ps(xm + 112), b);
        acc[2 * m] = a;
        acc[2 * m + 1] = b;
    }
}

template <int M>
AVX512 void row_span(const uint8_t* wr, const uint8_t* sr, const float* xr, int64_t k, int64_t c0, int64_t c1,
                     bool tail, __m512 tbl, __m512* acc) {
    const __m512i sel0 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i four = _mm512_set1_epi32(4);
    const int64_t n128 = k / 128, ks = k / 32, gend = std::min(c1, k / 512 * 4);
    int64_t ch = c0;
    for (; ch + 4 <= gend; ch += 4) {   // 512 codes: their 16 scales decoded at once
        // software prefetch kPrefetch bytes ahead (runs on into the next rows, which follow in memory):
        // more misses in flight than the hardware streamer alone keeps, so one core streams faster
        _mm_prefetch(reinterpret_cast<const char*>(wr + ch * 64 + kPrefetch), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wr + ch * 64 + kPrefetch + 64), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wr + ch * 64 + kPrefetch + 128), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wr + ch * 64 + kPrefetch + 192), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(sr + ch * 4 + kPrefetch / 16), _MM_HINT_T0);
        const __m512 s16 = scale16(sr + ch * 4);
        __m512i sel = sel0;
        for (int c = 0; c < 4; ++c) {
            chunk128<M>(wr + (ch + c) * 64, xr + (ch + c) * 128, k, _mm512_permutexvar_ps(sel, s16), tbl, acc);
            sel = _mm512_add_epi32(sel, four);
        }
    }
    for (; ch < c1; ++ch) chunk128<M>(wr + ch * 64, xr + ch * 128, k, scale4(sr + ch * 4), tbl, acc);
    if (!tail) return;
    for (int64_t b = n128 * 4; b < ks; ++b) {   // K % 128: 32-blocks, even/odd x layout
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + b * 16)));
        const __m512 lo = _mm512_permutexvar_ps(v, tbl);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tbl);
        const __m512 sv = _mm512_set1_ps(kE8M0[sr[b]]);
        for (int m = 0; m < M; ++m) {
            const float* xm = xr + m * k + b * 32;
            const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xm + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xm)));
            acc[M == 1 ? 0 : 2 * m] = _mm512_fmadd_ps(t, sv, acc[M == 1 ? 0 : 2 * m]);
        }
    }
}

// Rows [n0, n1): groups of kRG rows walk K in blocks small enough that the M rows of x stay in L1
// (16 KiB), with the per-row vector accumulators parked in an L1 buffer between blocks.
template <int M>
AVX512 void gemv_rows_avx512_t(const float* xr, int64_t k, const uint8_t* w, const uint8_t* s, int64_t n0,
                               int64_t n1, float* y, int64_t ldy) {
    constexpr int kRG = 16;
    const int64_t kb = k / 2, ks = k / 32, n128 = k / 128;
    const int64_t cb = std::max<int64_t>(4, (4096 / M) / 512 * 4);   // chunks of 128 per K block (16 KiB of x)
    const __m512 tbl = _mm512_loadu_ps(kE2M1);
    constexpr int NA = M == 1 ? 1 : 2 * M;   // accumulators per row (see chunk128)
    __m512 park[kRG][NA];
    for (int64_t nb = n0; nb < n1; nb += kRG) {
        const int64_t ne = std::min<int64_t>(n1, nb + kRG);
        for (int64_t c0 = 0;; c0 += cb) {
            const int64_t c1 = std::min(n128, c0 + cb);
            const bool last = c1 >= n128;
            for (int64_t n = nb; n < ne; ++n) {
                __m512 acc[NA];
                for (int a = 0; a < NA; ++a) acc[a] = c0 == 0 ? _mm512_setzero_ps() : park[n - nb][a];
                row_span<M>(w + n * kb, s + n * ks, xr, k, c0, c1, last, tbl, acc);
                if (last) {
                    for (int m = 0; m < M; ++m)
                        y[m * ldy + n] = _mm512_reduce_add_ps(M == 1 ? acc[0] : _mm512_add_ps(acc[2 * m], acc[2 * m + 1]));
                } else {
                    for (int a = 0; a < NA; ++a) park[n - nb][a] = acc[a];
                }
            }
            if (last) break;
        }
    }
}

AVX512_FN void gemv_rows_avx512(int m, const float* xr, int64_t k, const uint8_t* w, const uint8_t* s, int64_t n0,
                                int64_t n1, float* y, int64_t ldy) {
    switch (m) {
        case 1: gemv_rows_avx512_t<1>(xr, k, w, s, n0, n1, y, ldy); break;
        case 2: gemv_rows_avx512_t<2>(xr, k, w, s, n0, n1, y, ldy); break;
        case 3: gemv_rows_avx512_t<3>(xr, k, w, s, n0, n1, y, ldy); break;
        case 4: gemv_rows_avx512_t<4>(xr, k, w, s, n0, n1, y, ldy); break;
        case 5: gemv_rows_avx512_t<5>(xr, k, w, s, n0, n1, y, ldy); break;
        case 6: gemv_rows_avx512_t<6>(xr, k, w, s, n0, n1, y, ldy); break;
        case 7: gemv_rows_avx512_t<7>(xr, k, w, s, n0, n1, y, ldy); break;
        default: gemv_rows_avx512_t<8>(xr, k, w, s, n0, n1, y, ldy); break;
    }
}

// The blocked path's tile decode: 16 rows at a time, one gathered dword (8 codes) per row and step.
AVX512_FN void decode_tile_avx512(const uint8_t* w, const uint8_t* s, int64_t k, int64_t n0, int64_t nvalid, int64_t k0,
                                  int64_t kw, float* wt) {
    const int64_t kb = k / 2, ks = k / 32;
    const __m512 tbl = _mm512_loadu_ps(kE2M1);
    alignas(64) float st[(kKB / 32) * 16];
    for (int64_t g = 0; g < kNB / 16; ++g) {
        const int64_t rows = std::min<int64_t>(16, std::max<int64_t>(1, nvalid - 16 * g));
        const int64_t base_row = n0 + std::min<int64_t>(16 * g, nvalid - 1);
        const uint8_t* base = w + base_row * kb + k0 / 2;
        alignas(64) int32_t offs[16];
        for (int r = 0; r < 16; ++r) {
            const int64_t rr = std::min<int64_t>(r, rows - 1);
            offs[r] = static_cast<int32_t>(rr * kb);
            for (int64_t b = 0; b < kw / 32; ++b) st[b * 16 + r] = kE8M0[s[(base_row + rr) * ks + k0 / 32 + b]];
        }
        __m512i off = _mm512_load_si512(offs);
        const __m512i step = _mm512_set1_epi32(4);
        for (int64_t q = 0; q < kw / 8; ++q) {
            const __m512i v = _mm512_i32gather_epi32(off, base, 1);
            off = _mm512_add_epi32(off, step);
            const __m512 sv = _mm512_load_ps(st + (q / 4) * 16);
            float* out = wt + (8 * q) * kNB + 16 * g;
            _mm512_store_ps(out + 0 * kNB, _mm512_mul_ps(_mm512_permutexvar_ps(v, tbl), sv));
            _mm512_store_ps(out + 1 * kNB, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tbl), sv));
            _mm512_store_ps(out + 2 * kNB, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), tbl), sv));
            _mm512_store_ps(out + 3 * kNB, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), tbl), sv));
            _mm512_store_ps(out + 4 * kNB, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), tbl), sv));
            _mm512_store_ps(out + 5 * kNB, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), tbl), sv));
            _mm512_store_ps(out + 6 * kNB, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), tbl), sv));
            _mm512_store_ps(out + 7 * kNB, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), tbl), sv));
        }
    }
}

namespace {
// bf16 patterns of the 16 E2M1 values (codes 8-15 negative), padded to the 32 entries of vpermw
alignas(64) const uint16_t kE2M1Bf16[32] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                           0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};

// one 32-block (16 bytes, low nibble = even k) -> its 32 values in k order as bf16, times 2^(e - 127)
// (exact where 2 <= e <= 252: every nonzero value times 2^(e - 127) is a normal bf16)
AVX512 __m512i decode32_bf16(const uint8_t* p, uint8_t e, __m512i tbl) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i idx = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(0xF)),
                                        _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0xF0)), 12));
    const __m512i b = _mm512_permutexvar_epi16(idx, tbl);
    const __mmask32 nz = _mm512_test_epi16_mask(b, _mm512_set1_epi16(0x7FFF));
    return _mm512_mask_add_epi16(b, nz, b, _mm512_set1_epi16(static_cast<int16_t>((e - 127) * 128)));
}
}  // namespace

AVX512_FN void decode_tile_bf16(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint16_t* wd, float* sc) {
    const Fp4Expert& ex = *static_cast<const Fp4Expert*>(ctx);
    const __m512i tbl = _mm512_load_si512(kE2M1Bf16);
    const int64_t k0 = kb * kKB, kw = std::min(kKB, ex.k - k0);
    for (int64_t r = 0; r < nt; ++r) {
        const uint8_t* wr = ex.w + (n0 + r) * (ex.k / 2) + k0 / 2;
        const uint8_t* sr = ex.s + (n0 + r) * (ex.k / 32) + k0 / 32;
        uint16_t* out = wd + r * kKB;
        _mm_prefetch(reinterpret_cast<const char*>(wr + kKB / 2), _MM_HINT_T0);   // this row's next K block
        for (int64_t b = 0; b < kw / 32; ++b) _mm512_storeu_si512(out + 32 * b, decode32_bf16(wr + 16 * b, sr[b], tbl));
        std::fill(out + kw, out + kKB, uint16_t{0});
        sc[r] = 1.0f;
    }
}

namespace {
// kE2M1Bf16 with entries 16-31 repeating 0-15: vpermw reads 5 index bits, so bit 4 may hold anything
alignas(64) const uint16_t kE2M1Bf16x2[32] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                             0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0,
                                             0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                             0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};
}  // namespace

// decode_tile_bf16's values transposed: the 16 rows' 64 bytes of the block are transposed as dwords in
// registers, then each dword (8 codes = 4 pairs) is decoded (the same table and exponent add) straight into
// 16-row vectors of pairs
AVX512_FN bool decode_tile_bf16_t(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint32_t* wt, float* sc) {
    const Fp4Expert& ex = *static_cast<const Fp4Expert*>(ctx);
    const int64_t k0 = kb * kKB, kbytes = ex.k / 2, ks = ex.k / 32;
    if (ex.k - k0 < kKB || 16 * ks >= (int64_t(1) << 31)) return false;
    const __m512i tbl = _mm512_load_si512(kE2M1Bf16x2);
    const __m512i mag = _mm512_set1_epi16(0x7FFF), ff = _mm512_set1_epi32(0xFF), e127 = _mm512_set1_epi32(127);
    constexpr int64_t kNt = 48;   // bf16_gemm.h kNt: the row stride of wt
    for (int64_t g = 0; g < nt; g += 16) {
        const int64_t rows = std::min<int64_t>(16, nt - g);
        alignas(64) int32_t soff[16];
        __m512i v[16];
        for (int j = 0; j < 16; ++j) {
            const int64_t r = std::min<int64_t>(j, rows - 1);
            const uint8_t* wr = ex.w + (n0 + g + r) * kbytes + k0 / 2;
            _mm_prefetch(reinterpret_cast<const char*>(wr + 8 * kKB), _MM_HINT_T0);
            v[j] = _mm512_loadu_si512(wr);
            soff[j] = static_cast<int32_t>(r * ks);
        }
        // lane j: the 4 scale bytes of row j's block; per 32-block b, (e - 127) * 128 in both 16-bit halves
        const __m512i sv = _mm512_i32gather_epi32(_mm512_load_si512(soff), ex.s + (n0 + g) * ks + k0 / 32, 1);
        __m512i add[kKB / 32];
        for (int b = 0; b < kKB / 32; ++b) {
            const __m512i e = _mm512_slli_epi32(
                _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(sv, 8 * b), ff), e127), 7);
            add[b] = _mm512_or_si512(_mm512_and_si512(e, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(e, 16));
        }
        transpose16(v);   // v[q] lane j: dword q of row j = codes 8q .. 8q + 7, pairs 4q .. 4q + 3
        for (int64_t q = 0; q < kKB / 8; ++q)
            for (int i = 0; i < 4; ++i) {
                // low half: the low nibble of byte i (even k), high half: its high nibble (odd k)
                const __m512i t = _mm512_srli_epi32(v[q], 8 * i);
                const __m512i idx = _mm512_mask_blend_epi16(0xAAAAAAAA, t, _mm512_slli_epi32(t, 12));
                const __m512i b = _mm512_permutexvar_epi16(idx, tbl);
                _mm512_storeu_si512(wt + (4 * q + i) * kNt + g,
                                    _mm512_mask_add_epi16(b, _mm512_test_epi16_mask(b, mag), b, add[q / 4]));
            }
    }
    for (int64_t r = 0; r < nt; ++r) sc[r] = 1.0f;
    return true;
}

std::pair<int, int> scale_range(const Fp4Expert& ex) {
    const uint8_t* s = ex.s;
    const int64_t n = ex.n * (ex.k / 32);
    uint8_t lo = 255, hi = 0;
    for (int64_t i = 0; i < n; ++i) {
        lo = std::min(lo, s[i]);
        hi = std::max(hi, s[i]);
    }
    return {lo, hi};
}

}  // namespace fp4
}  // namespace dsv4rt
#endif
