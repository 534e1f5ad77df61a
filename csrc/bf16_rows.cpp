// The row-invariant mode of the blocked AVX512-BF16 GEMMs (see bf16_gemm.h): gemm_few, which gives
// gemm()'s bits with the output columns in the vector lanes, and run_rows, which picks each row's numerics
// from that row alone.
//
// gemm() sums, per output and per 128-wide K block, one vdpbf16ps chain over the block's 64 bf16 pairs in
// order (lane = row of x, the weight pair broadcast), then c = fma(chain, scale, c) over the K blocks. gemm_few
// runs the same chain with lane = output column: the decoded tile [nt][128] is transposed (16 x 16 pairs at a
// time in registers) into [64 pairs][nt] and the row's pair is broadcast; the tile's 3 column groups give
// every row 3 independent chains. vdpbf16ps adds, per lane, the product of the
// odd halves then the product of the even halves of its two operands; the operands keep their roles (first:
// x, second: w), so every lane computes exactly what gemm()'s lane computes.
#include "bf16_gemm.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>

#include "transpose16.h"

namespace dsv4rt {
namespace bf16gemm {

namespace {

constexpr int64_t kPairs = kKb / 2;

// the smallest biased exponent of a nonzero value of row r (255: none), or -1 if a float32 value is not bf16
int row_min_exp(const void* x, bool is_bf16, int64_t r, int64_t k) {
    uint32_t emin = 255;
    if (is_bf16) {
        const uint16_t* p = static_cast<const uint16_t*>(x) + r * k;
        for (int64_t i = 0; i < k; ++i)
            if (p[i] & 0x7FFFu) emin = std::min<uint32_t>(emin, (p[i] >> 7) & 0xFFu);
        return static_cast<int>(emin);
    }
    const float* p = static_cast<const float*>(x) + r * k;
    for (int64_t i = 0; i < k; ++i) {
        const uint32_t u = f32_bits(p[i]);
        if (u & 0xFFFFu) return -1;
        if (u & 0x7FFF0000u) emin = std::min<uint32_t>(emin, (u >> 23) & 0xFFu);
    }
    return static_cast<int>(emin);
}

// rows `idx` of x as bf16 bits [rows][kblocks * kKb], zero past K (their values are bf16: checked before)
std::vector<uint16_t> rows_bf16(const void* x, bool is_bf16, int64_t k, int64_t kblocks,
                                const std::vector<int64_t>& idx) {
    const int64_t kp = kblocks * kKb;
    std::vector<uint16_t> out(static_cast<size_t>(idx.size()) * kp, 0);
    for (size_t i = 0; i < idx.size(); ++i) {
        uint16_t* o = out.data() + i * kp;
        if (is_bf16) {
            std::memcpy(o, static_cast<const uint16_t*>(x) + idx[i] * k, static_cast<size_t>(k) * 2);
        } else {
            const float* p = static_cast<const float*>(x) + idx[i] * k;
            for (int64_t j = 0; j < k; ++j) o[j] = static_cast<uint16_t>(f32_bits(p[j]) >> 16);
        }
    }
    return out;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")

// the decoded tile wd [nt][kKb] (nt <= kNt) transposed to wt [kPairs][kNt] 32-bit pairs (zero past nt)
inline void transpose_tile(const uint16_t* wd, int64_t nt, uint32_t* wt) {
    const uint32_t* w32 = reinterpret_cast<const uint32_t*>(wd);
    for (int64_t g = 0; g < kNt; g += 16)
        for (int64_t ch = 0; ch < kPairs; ch += 16) {
            __m512i v[16];
            for (int j = 0; j < 16; ++j)
                v[j] = g + j < nt ? _mm512_loadu_si512(w32 + (g + j) * kPairs + ch) : _mm512_setzero_si512();
            transpose16(v);
            for (int p = 0; p < 16; ++p) _mm512_storeu_si512(wt + (ch + p) * kNt + g, v[p]);
        }
}

// R rows (pairs xp[r * pstride + p] of this K block) x G groups of 16 columns of the transposed tile:
// c[r * ldc + 16g + j] = fma(chain, sc[16g + j], c[..]); R * G independent chains
template <int R, int G>
void few_rows(const uint32_t* xp, int64_t pstride, const uint32_t* wt, int64_t nt, const float* sc, float* c,
              int64_t ldc) {
    __m512 acc[R][G];
    for (int r = 0; r < R; ++r)
        for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kPairs; ++p) {
        __m512i w[G];
        for (int g = 0; g < G; ++g) w[g] = _mm512_loadu_si512(wt + p * kNt + 16 * g);
        for (int r = 0; r < R; ++r) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * pstride + p]));
            for (int g = 0; g < G; ++g) acc[r][g] = _mm512_dpbf16_ps(acc[r][g], xb, (__m512bh)w[g]);
        }
    }
    for (int g = 0; g < G; ++g) {
        const int64_t cols = std::min<int64_t>(16, nt - 16 * g);
        const __mmask16 mask = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
        const __m512 s = _mm512_maskz_loadu_ps(mask, sc + 16 * g);
        for (int r = 0; r < R; ++r) {
            float* cp = c + r * ldc + 16 * g;
            _mm512_mask_storeu_ps(cp, mask, _mm512_fmadd_ps(acc[r][g], s, _mm512_maskz_loadu_ps(mask, cp)));
        }
    }
}

using RowsFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, const float*, float*, int64_t);

template <int G>
RowsFn rows_for(int64_t rows) {
    switch (rows) {
        case 1: return few_rows<1, G>;
        case 2: return few_rows<2, G>;
        case 3: return few_rows<3, G>;
        case 4: return few_rows<4, G>;
        case 5: return few_rows<5, G>;
        default: return few_rows<6, G>;
    }
}

constexpr int64_t kRowsPer = 6;   // rows per few_rows call (6 x 3 chains + 3 weights + 6 broadcasts in registers)

// one task: output columns [n0, n0 + nt) for every row
void few_tile(const uint16_t* xb, int64_t m, int64_t kblocks, int64_t n0, int64_t nt, DecodeFn decode,
              DecodeTFn decode_t, const void* ctx, float* y, int64_t ldy) {
    thread_local std::vector<float> cbuf;
    thread_local std::vector<uint16_t> wbuf;
    thread_local std::vector<uint32_t> tbuf;
    cbuf.assign(static_cast<size_t>(m * kNt), 0.0f);
    wbuf.resize(static_cast<size_t>(kNt * kKb));
    tbuf.resize(static_cast<size_t>(kPairs * kNt));
    float sc[kNt];
    const int64_t pstride = kblocks * kPairs, groups = (nt + 15) / 16;
    const uint32_t* x32 = reinterpret_cast<const uint32_t*>(xb);
    for (int64_t kb = 0; kb < kblocks; ++kb) {
        if (!decode_t || !decode_t(ctx, n0, nt, kb, tbuf.data(), sc)) {
            decode(ctx, n0, nt, kb, wbuf.data(), sc);
            transpose_tile(wbuf.data(), nt, tbuf.data());
        }
        for (int64_t r0 = 0; r0 < m; r0 += kRowsPer) {
            const int64_t rows = std::min(kRowsPer, m - r0);
            const RowsFn fn = groups == 1 ? rows_for<1>(rows) : groups == 2 ? rows_for<2>(rows) : rows_for<3>(rows);
            fn(x32 + r0 * pstride + kb * kPairs, pstride, tbuf.data(), nt, sc, cbuf.data() + r0 * kNt, kNt);
        }
    }
    for (int64_t r = 0; r < m; ++r)
        std::memcpy(y + r * ldy + n0, cbuf.data() + r * kNt, static_cast<size_t>(nt) * sizeof(float));
}

#pragma GCC pop_options

}  // namespace

void gemm_few(const uint16_t* xb, int64_t m, int64_t kblocks, int64_t n, DecodeFn decode, DecodeTFn decode_t,
              const void* ctx, float* y, int64_t ldy) {
    if (m <= 0 || n <= 0) return;
    const int64_t tiles = (n + kNt - 1) / kNt;
    // one thread per ~256 K weight values, as the GEMVs
    parallel_tasks(tiles, [&](int64_t t) {
        const int64_t n0 = t * kNt;
        few_tile(xb, m, kblocks, n0, std::min(kNt, n - n0), decode, decode_t, ctx, y, ldy);
    }, pick_threads(static_cast<double>(n) * kblocks * kKb, 256 << 10));
}

void run_rows(const RowProblem& p, int64_t few_max, const RowFallback& fallback) {
    if (p.m <= 0 || p.n <= 0) return;
    const int64_t kblocks = (p.k + kKb - 1) / kKb;
    std::vector<int64_t> good, bad;
    for (int64_t r = 0; r < p.m; ++r) {
        const int e = row_min_exp(p.x, p.is_bf16, r, p.k);
        (e >= 0 && e + p.w_min_exp - 127 >= kMinProductExp ? good : bad).push_back(r);
    }
    const int64_t ng = static_cast<int64_t>(good.size()), nb = static_cast<int64_t>(bad.size());
    if (ng) {
        const bool all = nb == 0;   // then y is written in place, else through a compact buffer
        std::vector<float> yg(all ? 0 : static_cast<size_t>(ng * p.n));
        float* yp = all ? p.y : yg.data();
        const int64_t ldy = all ? p.ldy : p.n;
        if (ng > few_max) {
            PackedX px;
            const size_t esz = p.is_bf16 ? 2 : 4;
            std::vector<char> xg;
            const void* xs = p.x;
            if (!all) {
                xg.resize(static_cast<size_t>(ng * p.k) * esz);
                for (int64_t i = 0; i < ng; ++i)
                    std::memcpy(xg.data() + static_cast<size_t>(i * p.k) * esz,
                                static_cast<const char*>(p.x) + static_cast<size_t>(good[i] * p.k) * esz,
                                static_cast<size_t>(p.k) * esz);
                xs = xg.data();
            }
            pack_x(xs, p.is_bf16, ng, p.k, px);   // cannot fail: every row was checked
            gemm(px, p.n, p.decode, p.ctx, yp, ldy);
        } else {
            const std::vector<uint16_t> xb = rows_bf16(p.x, p.is_bf16, p.k, kblocks, good);
            if (!p.few || !p.few(p.ctx, xb.data(), ng, kblocks, p.n, yp, ldy))
                gemm_few(xb.data(), ng, kblocks, p.n, p.decode, p.decode_t, p.ctx, yp, ldy);
        }
        if (!all)
            for (int64_t i = 0; i < ng; ++i)
                std::memcpy(p.y + good[i] * p.ldy, yp + i * p.n, static_cast<size_t>(p.n) * sizeof(float));
    }
    if (nb) {
        std::vector<float> xf(static_cast<size_t>(nb * p.k)), yb(static_cast<size_t>(nb * p.n));
        for (int64_t i = 0; i < nb; ++i)
            for (int64_t j = 0; j < p.k; ++j) {
                const int64_t at = bad[i] * p.k + j;
                xf[i * p.k + j] = p.is_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p.x)[at])
                                            : static_cast<const float*>(p.x)[at];
            }
        fallback(xf.data(), nb, yb.data());
        for (int64_t i = 0; i < nb; ++i)
            std::memcpy(p.y + bad[i] * p.ldy, yb.data() + i * p.n, static_cast<size_t>(p.n) * sizeof(float));
    }
}

}  // namespace bf16gemm
}  // namespace dsv4rt

#else  // not x86-64: no AVX512-BF16 path (available() is false, so these are never called)

namespace dsv4rt {
namespace bf16gemm {
void gemm_few(const uint16_t*, int64_t, int64_t, int64_t, DecodeFn, DecodeTFn, const void*, float*, int64_t) {}
void run_rows(const RowProblem&, int64_t, const RowFallback&) {}
}  // namespace bf16gemm
}  // namespace dsv4rt

#endif
