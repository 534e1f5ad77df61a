// The MXFP4 GEMM of the batch-invariant mode for 1..kFewRows rows of x: bf16_gemm.h gemm()'s bits (the
// blocked AVX512-BF16 path's numerics, which every row count of that mode gives), computed with the output
// columns in the vector lanes and the weight decoded straight into the registers that vdpbf16ps reads.
//
// gemm() sums, per output and per 128-wide K block, one vdpbf16ps chain over the block's 64 bf16 pairs in
// order (the E8M0 scale folded into the bf16 weight), then c = fma(chain, 1, c) over the blocks in order.
// bf16_rows.cpp gemm_few runs that chain with lane = column on a tile decoded to bf16 pairs, stored
// transposed, and read back: at one row most of its instructions were the decode's shifts and blends and the
// stores and loads of the decoded pairs. Here, per 16 columns and K block:
//  * the 16 rows' 64 bytes are loaded and transposed as dwords (a dword = 8 codes = 4 pairs), kept in L1;
//    their scale bytes are transposed the same way once per 16 K blocks (a dword = one block's 4 scales);
//  * pair p = 4q + i of the 16 columns is one vpmultishiftqb on dword q (byte i's low nibble to the low word,
//    its high nibble to the high word: a byte holds exactly one pair), one vpermw on a bf16 table of the E2M1
//    values and one saturating subtract that puts the column's scale into the exponent and keeps zero codes
//    zero (kScaledTbl, fp4_scaled.h): gemm()'s weight values (-0 as +0, which changes no sum). Then one
//    vdpbf16ps per row of x (its pair broadcast); 3 vector instructions of decode per 32 weights, shared by
//    the rows (fp4_packed_avx512.cpp needs 1-2 on weights packed at load);
//  * up to 3 column groups run side by side, so each row has 3 independent chains in flight.
// Pairs past K in the last block are skipped: gemm()'s chain adds x * 0 = +0 there, which leaves a float32
// sum unchanged (the chain starts at +0 and vdpbf16ps never leaves a subnormal in it).
#include "fp4_kernels.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>

#include "fp4_scaled.h"
#include "transpose16.h"

namespace dsv4rt {
namespace fp4 {

#define FEW __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi"), always_inline)) inline
#define FEW_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi")))

namespace {

constexpr int64_t kKb = 128;      // bf16_gemm.h kKb: the K block of gemm()'s chains
constexpr int64_t kPairs = kKb / 2;
constexpr int kGroups = 3;        // 16-column groups per task (48 columns, gemm()'s kNt)
constexpr int64_t kCols = 16 * kGroups;

// vpmultishiftqb control for byte i of each dword: word 0 <- bits 8i.., word 1 <- bits 8i + 4.. (vpermw reads
// the low 5 bits of a word; the table repeats, so the bit above the nibble does not matter)
FEW __m512i pair_ctrl(int i) {
    const uint64_t b = 8u * static_cast<uint64_t>(i);
    return _mm512_set1_epi64(static_cast<long long>(b | (b + 4) << 16 | (b + 32) << 32 | (b + 36) << 48));
}

// One 16-column group of one K block, ready for the dot: the bytes transposed (t[q] lane j = dword q of
// column j) and per 32-block kBias - (e - 127) * 128 in both words of each lane.
struct Group {
    __m512i t[kKb / 8];
    __m512i sub[kKb / 32];
};

// A task's view of one 16-column group: the columns' rows of bytes (lanes past the last column repeat it)
// and their scale bytes of 16 K blocks at a time, transposed (sv[b] lane j = the 4 scale bytes of column j
// in block kb0 + b)
struct Cols {
    const uint8_t* w[16];
    const uint8_t* s[16];
    __m512i sv[16];
};

FEW void cols_init(const Fp4Expert& ex, int64_t c0, int64_t cols, Cols& c) {
    for (int j = 0; j < 16; ++j) {
        const int64_t col = c0 + std::min<int64_t>(j, cols - 1);
        c.w[j] = ex.w + col * (ex.k / 2);
        c.s[j] = ex.s + col * (ex.k / 32);
    }
}

// the scale bytes of blocks [kb0, kb0 + 16) (zero past K)
FEW void cols_scales(const Fp4Expert& ex, int64_t kb0, Cols& c) {
    const int64_t left = ex.k / 32 - 4 * kb0;
    const __mmask64 mask = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    for (int j = 0; j < 16; ++j) c.sv[j] = _mm512_maskz_loadu_epi8(mask, c.s[j] + 4 * kb0);
    transpose16(c.sv);
}

// K block kb (kw values) of the group
FEW void load_group(const Cols& c, int64_t kb, int64_t kw, Group& g) {
    const int64_t off = kb * (kKb / 2);
    if (kw >= kKb) {
        for (int j = 0; j < 16; ++j) {
            g.t[j] = _mm512_loadu_si512(c.w[j] + off);
        }
    } else {
        const __mmask64 bytes = (__mmask64(1) << (kw / 2)) - 1;
        for (int j = 0; j < 16; ++j) g.t[j] = _mm512_maskz_loadu_epi8(bytes, c.w[j] + off);
    }
    transpose16(g.t);
    scaled_subs(c.sv[kb % 16], g.sub);   // blocks past kw get a value that no pair reads
}

// R rows of x (pairs xp[r * pstride + p]) times G groups over the first `pairs` pairs of a block: c[r][g] =
// fma(chain, 1, c[r][g])
template <int R, int G>
FEW void dot(const uint32_t* xp, int64_t pstride, const Group* grp, int64_t pairs, __m512* c) {
    const __m512i tbl = _mm512_load_si512(kScaledTbl);
    const __m512i ctrl[4] = {pair_ctrl(0), pair_ctrl(1), pair_ctrl(2), pair_ctrl(3)};
    __m512 acc[R][G];
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
    for (int64_t q = 0; q < pairs / 4; ++q) {
        for (int i = 0; i < 4; ++i) {
            const int64_t p = 4 * q + i;
            __m512bh xb[R];
            for (int r = 0; r < R; ++r) xb[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * pstride + p]));
            for (int g = 0; g < G; ++g) {
                const __m512i w = _mm512_subs_epu16(
                    _mm512_permutexvar_epi16(_mm512_multishift_epi64_epi8(ctrl[i], grp[g].t[q]), tbl), grp[g].sub[q / 4]);
                for (int r = 0; r < R; ++r) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], xb[r], (__m512bh)w);
            }
        }
    }
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < G; ++g) c[r * G + g] = _mm512_fmadd_ps(acc[r][g], one, c[r * G + g]);
}

// one task: columns [n0, n0 + nt) (nt <= kCols) for R rows (x from row r0)
template <int R, int G>
FEW void task(const Fp4Expert& ex, const uint32_t* x32, int64_t pstride, int64_t kblocks, int64_t n0, int64_t nt,
              float* y, int64_t ldy, int64_t ahead) {
    // Prefetch: the weight bytes of the columns this thread probably takes next (`ahead` columns on; the other
    // threads take the tasks between), one slice per K block, so they stream in address order while this
    // task computes. A task's own 48 rows side by side defeat the hardware prefetchers (a prefetch 1 KiB
    // ahead in each row was slower than none). 6 of 64 experts from DRAM, 1 row each, 2 threads, interleaved
    // with the previous build (2026-12-06, load ~1.7): 4096 x 4096 7.70 / 5.76 -> 5.90 / 4.53 ms, 4096 x 2048
    // 3.62 / 3.10 -> 2.93 / 2.59 ms, the same bits.
    const int64_t row = ex.k / 2, pf0 = std::min(ex.n, n0 + ahead), pf1 = std::min(ex.n, n0 + ahead + nt);
    const char* pf = reinterpret_cast<const char*>(ex.w + pf0 * row);
    const int64_t pf_bytes = (pf1 - pf0) * row, pf_step = (pf_bytes + kblocks - 1) / std::max<int64_t>(1, kblocks);
    Group grp[G];
    Cols cols[G];
    for (int g = 0; g < G; ++g) cols_init(ex, n0 + 16 * g, std::min<int64_t>(16, nt - 16 * g), cols[g]);
    __m512 c[R * G];
    for (int i = 0; i < R * G; ++i) c[i] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < kblocks; ++kb) {
        const int64_t kw = std::min(kKb, ex.k - kb * kKb);
        if (kb % 16 == 0)
            for (int g = 0; g < G; ++g) cols_scales(ex, kb, cols[g]);
        for (int64_t b = kb * pf_step; b < std::min(pf_bytes, (kb + 1) * pf_step); b += 64)
                _mm_prefetch(pf + b, _MM_HINT_T0);
        for (int g = 0; g < G; ++g) load_group(cols[g], kb, kw, grp[g]);
        dot<R, G>(x32 + kb * kPairs, pstride, grp, kw / 2, c);
    }
    for (int g = 0; g < G; ++g) {
        const int64_t cols = std::min<int64_t>(16, nt - 16 * g);
        const __mmask16 mask = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
        for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + n0 + 16 * g, mask, c[r * G + g]);
    }
}

using TaskFn = void (*)(const Fp4Expert&, const uint32_t*, int64_t, int64_t, int64_t, int64_t, float*, int64_t,
                        int64_t);

template <int R>
TaskFn task_for(int64_t groups) {
    return groups == 1 ? task<R, 1> : groups == 2 ? task<R, 2> : task<R, 3>;
}

TaskFn pick(int64_t rows, int64_t groups) {
    switch (rows) {
        case 1: return task_for<1>(groups);
        case 2: return task_for<2>(groups);
        case 3: return task_for<3>(groups);
        default: return task_for<4>(groups);
    }
}

}  // namespace

FEW_FN bool few_rows_bf16(const void* ctx, const uint16_t* xb, int64_t m, int64_t kblocks, int64_t n, float* y,
                          int64_t ldy) {
    const Fp4Expert& ex = *static_cast<const Fp4Expert*>(ctx);
    if (m > kFewRows || !lane_available()) return false;
    if (m <= 0 || n <= 0) return true;
    const uint32_t* x32 = reinterpret_cast<const uint32_t*>(xb);
    const int64_t pstride = kblocks * kPairs, tiles = (n + kCols - 1) / kCols;
    // one thread per ~256 K weight values, as gemm_few
    const int64_t threads = pick_threads(static_cast<double>(n) * kblocks * kKb, 256 << 10);
    parallel_tasks(tiles, [&](int64_t t) {
        const int64_t n0 = t * kCols, nt = std::min(kCols, n - n0);
        pick(m, (nt + 15) / 16)(ex, x32, pstride, kblocks, n0, nt, y, ldy, threads * kCols);
    }, threads);
    return true;
}

}  // namespace fp4
}  // namespace dsv4rt

#endif
