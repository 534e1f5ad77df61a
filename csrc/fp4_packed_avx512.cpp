// The MXFP4 kernels on weights in the packed layout (fp4_gemm.h): gemm()'s bits (bf16_gemm.h) for 1..8 rows of
// x with the output columns in the vector lanes, and the tile decodes of gemm() / gemm_few() for more rows.
//
// On the released layout (fp4_few_avx512.cpp) every 16 columns x 128 K cost a 16 x 16 dword transpose and
// each pair a vpmultishiftqb, all on the shuffle unit with the vpermw that looks the codes up. Packed, one
// 64-byte load is already dword q of 16 columns, and pair i of it is both 16-bit words shifted right by 4i
// (vpermw reads 5 index bits and the table repeats, so the codes above do not matter): per 32 weights one
// vpermw, one shift for 3 pairs of 4, the scale's saturating subtract (fp4_scaled.h) and one vdpbf16ps per
// row. One core, weights in cache, 1 row: 25 GB/s against 9.8 on the released layout (2-core EPYC, 2026-12-07).
// Numerics as fp4_few_avx512.cpp: per column and 128-wide K block one vdpbf16ps chain over the pairs in order,
// then c = c + chain over the blocks in order (fma(chain, 1, c), the same value).
#include "fp4_kernels.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>

#include "fp4_scaled.h"
#include "transpose16.h"

namespace dsv4rt {
namespace fp4 {

#define PK __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi"), always_inline)) inline
#define PK_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi")))

namespace {

constexpr int64_t kKb = 128;            // bf16_gemm.h kKb
constexpr int64_t kPairs = kKb / 2;
constexpr int64_t kGroupBlock = 1024;   // bytes of one group (16 columns) in one K block
constexpr int64_t kNt = 48;             // bf16_gemm.h kNt: the row stride of decode_t's output

// The scale bytes of one group's 16 columns for 16 K blocks from kb0 (zero past K), transposed: sv[b] lane j =
// the 4 scale bytes of column j in block kb0 + b
PK void group_scales(const uint8_t* s, int64_t ks, int64_t kb0, __m512i sv[16]) {
    const int64_t left = ks - 4 * kb0;
    const __mmask64 mask = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    for (int j = 0; j < 16; ++j) sv[j] = _mm512_maskz_loadu_epi8(mask, s + j * ks + 4 * kb0);
    transpose16(sv);
}

// pair i (0..3) of packed dword vector v: the 16 columns' bf16 pairs, scaled by sub (fp4_scaled.h)
PK __m512i pair_of(__m512i v, int i, __m512i tbl, __m512i sub) {
    const __m512i idx = i == 0 ? v : _mm512_srli_epi16(v, static_cast<unsigned>(4 * i));
    return _mm512_subs_epu16(_mm512_permutexvar_epi16(idx, tbl), sub);
}

// One task: G groups of 16 columns from column n0, R rows of x (bf16 pairs, row stride pstride): y rows
// [0, R) columns [n0, n0 + 16 G)
template <int R, int G>
PK void task(const Fp4Expert& ex, const uint32_t* x32, int64_t pstride, int64_t kblocks, int64_t n0, float* y,
             int64_t ldy) {
    const __m512i tbl = _mm512_load_si512(kScaledTbl);
    const int64_t ks = ex.k / 32, gstride = 16 * (ex.k / 2);
    const uint8_t* w0 = ex.w + n0 * (ex.k / 2);
    __m512i sv[G][16];
    __m512 c[R][G];
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < G; ++g) c[r][g] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < kblocks; ++kb) {
        if (kb % 16 == 0)
            for (int g = 0; g < G; ++g) group_scales(ex.s + (n0 + 16 * g) * ks, ks, kb, sv[g]);
        __m512i sub[G][4];
        for (int g = 0; g < G; ++g) scaled_subs(sv[g][kb % 16], sub[g]);
        __m512 acc[R][G];
        for (int r = 0; r < R; ++r)
            for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
        const uint8_t* wb = w0 + kb * kGroupBlock;
        for (int q = 0; q < 16; ++q) {
            __m512i v[G];
            for (int g = 0; g < G; ++g) v[g] = _mm512_loadu_si512(wb + g * gstride + 64 * q);
            for (int i = 0; i < 4; ++i) {
                const int64_t p = kb * kPairs + 4 * q + i;
                __m512bh xb[R];
                for (int r = 0; r < R; ++r) xb[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(x32[r * pstride + p]));
                for (int g = 0; g < G; ++g) {
                    const __m512bh w = (__m512bh)pair_of(v[g], i, tbl, sub[g][q / 4]);
                    for (int r = 0; r < R; ++r) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], xb[r], w);
                }
            }
        }
        for (int r = 0; r < R; ++r)
            for (int g = 0; g < G; ++g) c[r][g] = _mm512_add_ps(acc[r][g], c[r][g]);
    }
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < G; ++g) _mm512_storeu_ps(y + r * ldy + n0 + 16 * g, c[r][g]);
}

using TaskFn = void (*)(const Fp4Expert&, const uint32_t*, int64_t, int64_t, int64_t, float*, int64_t);

template <int R>
TaskFn task_for(int64_t groups) {
    return groups == 1 ? task<R, 1> : groups == 2 ? task<R, 2> : groups == 3 ? task<R, 3> : task<R, 4>;
}

constexpr int64_t kMaxRows = 8;

// groups per task for `rows` rows: 4 (64 columns) keep 4 chains per row in flight; more rows take fewer so the
// chains, sums, weights and x stay in the 32 vector registers
constexpr int64_t width_for(int64_t rows) { return rows <= 2 ? 4 : rows <= 4 ? 3 : 2; }

TaskFn pick(int64_t rows, int64_t groups) {
    switch (rows) {
        case 1: return task_for<1>(groups);
        case 2: return task_for<2>(groups);
        case 3: return task_for<3>(groups);
        case 4: return task_for<4>(groups);
        case 5: return task_for<5>(groups);
        case 6: return task_for<6>(groups);
        case 7: return task_for<7>(groups);
        default: return task_for<8>(groups);
    }
}

// the 16 columns of group g (from column n0 + 16 g of the tile) in K block kb as pairs: out[p] lane j = pair p
// of column j (scale folded, +0 for zero codes)
PK void group_pairs(const Fp4Expert& ex, int64_t col0, int64_t kb, __m512i out[kPairs]) {
    const __m512i tbl = _mm512_load_si512(kScaledTbl);
    const int64_t ks = ex.k / 32;
    // lane j: the 4 scale bytes of column col0 + j in block kb
    const __m512i soff = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(ks)));
    const __m512i sv = _mm512_i32gather_epi32(soff, ex.s + col0 * ks + 4 * kb, 1);
    __m512i sub[4];
    scaled_subs(sv, sub);
    const uint8_t* wb = ex.w + col0 * (ex.k / 2) + kb * kGroupBlock;
    for (int q = 0; q < 16; ++q) {
        const __m512i v = _mm512_loadu_si512(wb + 64 * q);
        for (int i = 0; i < 4; ++i) out[4 * q + i] = pair_of(v, i, tbl, sub[q / 4]);
    }
}

}  // namespace

PK_FN bool decode_packed_t(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint32_t* wt, float* sc) {
    const Fp4Expert& ex = *static_cast<const Fp4Expert*>(ctx);
    if (ex.k / 32 * 16 >= (int64_t(1) << 31)) return false;   // the scale gather's 32-bit offsets
    __m512i pairs[kPairs];
    for (int64_t g = 0; g < nt; g += 16) {
        group_pairs(ex, n0 + g, kb, pairs);
        for (int64_t p = 0; p < kPairs; ++p) _mm512_storeu_si512(wt + p * kNt + g, pairs[p]);
    }
    for (int64_t r = 0; r < nt; ++r) sc[r] = 1.0f;
    return true;
}

PK_FN void decode_packed(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint16_t* wd, float* sc) {
    const Fp4Expert& ex = *static_cast<const Fp4Expert*>(ctx);
    __m512i pairs[kPairs];
    for (int64_t g = 0; g < nt; g += 16) {
        group_pairs(ex, n0 + g, kb, pairs);
        // 16 pairs x 16 columns at a time, transposed: column j's 16 pairs = 32 bf16 values of row g + j
        for (int c = 0; c < 4; ++c) {
            transpose16(pairs + 16 * c);
            for (int j = 0; j < 16; ++j) _mm512_storeu_si512(wd + (g + j) * kKb + 32 * c, pairs[16 * c + j]);
        }
    }
    for (int64_t r = 0; r < nt; ++r) sc[r] = 1.0f;
}

PK_FN bool few_rows_packed(const void* ctx, const uint16_t* xb, int64_t m, int64_t kblocks, int64_t n, float* y,
                           int64_t ldy) {
    const Fp4Expert& ex = *static_cast<const Fp4Expert*>(ctx);
    if (m > kMaxRows || !lane_available()) return false;
    if (m <= 0 || n <= 0) return true;
    const uint32_t* x32 = reinterpret_cast<const uint32_t*>(xb);
    const int64_t pstride = kblocks * kPairs, width = width_for(m), groups = n / 16;
    const int64_t tasks = (groups + width - 1) / width;
    const int64_t threads = pick_threads(static_cast<double>(n) * kblocks * kKb, 256 << 10);
    parallel_tasks(tasks, [&](int64_t t) {
        const int64_t g0 = t * width;
        pick(m, std::min(width, groups - g0))(ex, x32, pstride, kblocks, 16 * g0, y, ldy);
    }, threads);
    return true;
}

}  // namespace fp4
}  // namespace dsv4rt

#endif
