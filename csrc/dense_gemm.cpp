// Dense GEMM with one summation order for every output, whatever the shape of the call: dense_gemm, the
// matmul of the model's torch glue in the batch-invariant mode (dsv4rt.invariant).
//
// y[m, n] = x[m, :] . w[n, :] for float32 or bf16 x and w (bf16 widened exactly). Every output is summed
// the same way: 16 partial sums s_l, each an FMA chain over k = l, l + 16, l + 32, ... in increasing k (zeros
// past K), then the fixed tree of hsum16 (s_l + s_{l+8}, then + 4, + 2, + 1). So a row's result depends only
// on that row and w: never on M, on the other rows, on the tiling, on the thread count or on the instruction
// set (the AVX-512 and the portable code give the same bits). BLAS gives no such promise (GEMV for a few
// rows, other blockings for more). When x and w are both bf16 and the CPU has AVX512-BF16, s_l is instead a
// vdpbf16ps chain over the pairs k = 2l, 2l + 1 (mod 32) (twice the products per instruction; its rounding,
// subnormals read and written as zero), then the same tree: again one order for every call on that CPU.
//
// Tiles of R rows x C columns (R * C independent chains) load each 16-wide k step of x and w once per tile;
// tasks are blocks of rows x columns whose weights fit in the L2 cache.
#include <cmath>

#include "common.h"
#include "vec.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>
#endif

namespace dsv4rt {
namespace {

constexpr int64_t kRowBlock = 64;   // rows of x per task

struct Dense {
    const float* x;      // [m, k] (null on the bf16 path)
    const uint16_t* xb;  // [m, k] bf16 bits (the bf16 path) or null
    const void* w;       // [n, k] float32 or bf16 bits
    bool w_bf16;
    float* y;            // [m, n]
    int64_t m, n, k;
};

// ------------------------------------------------------------------------------------------- portable
DSV4RT_INLINE v16f load_w16(const void* w, bool bf16, int64_t i, int64_t valid) {
    alignas(64) float t[16];
    for (int64_t j = 0; j < 16; ++j)
        t[j] = j < valid ? (bf16 ? bf16_to_f32(static_cast<const uint16_t*>(w)[i + j])
                                 : static_cast<const float*>(w)[i + j]) : 0.0f;
    return load16(t);
}

template <int R, int C>
DSV4RT_INLINE void tile_generic(const Dense& d, int64_t m0, int64_t n0) {
    v16f acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = v16f{};
    for (int64_t k0 = 0; k0 < d.k; k0 += 16) {
        const int64_t valid = std::min<int64_t>(16, d.k - k0);
        v16f xv[R], wv[C];
        for (int r = 0; r < R; ++r) {
            alignas(64) float t[16];
            const float* xr = d.x + (m0 + r) * d.k + k0;
            for (int64_t j = 0; j < 16; ++j) t[j] = j < valid ? xr[j] : 0.0f;
            xv[r] = load16(t);
        }
        for (int c = 0; c < C; ++c) wv[c] = load_w16(d.w, d.w_bf16, (n0 + c) * d.k + k0, valid);
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c)
                for (int j = 0; j < 16; ++j) acc[r][c][j] = std::fma(xv[r][j], wv[c][j], acc[r][c][j]);
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) d.y[(m0 + r) * d.n + n0 + c] = hsum16(acc[r][c]);
}

// ------------------------------------------------------------------------------------------- AVX-512
#if defined(DSV4RT_X86)
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), always_inline)) inline

AVX512 __m512 load_w_avx512(const void* w, bool bf16, int64_t i, __mmask16 mask) {
    if (bf16) {
        const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(w) + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w) + i);
}

// hsum16's tree: (l, l + 8), then (l, l + 4), (l, l + 2), (0, 1)
AVX512 float hsum_avx512(__m512 v) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(s2) + _mm_cvtss_f32(_mm_shuffle_ps(s2, s2, 1));
}

template <int R, int C>
AVX512 void tile_avx512(const Dense& d, int64_t m0, int64_t n0) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const float* x = d.x + m0 * d.k;
    const int64_t wrow = n0 * d.k;
    for (int64_t k0 = 0; k0 < d.k; k0 += 16) {
        const __mmask16 mask = d.k - k0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (d.k - k0)) - 1);
        __m512 xv[R], wv[C];
        for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(mask, x + r * d.k + k0);
        for (int c = 0; c < C; ++c) wv[c] = load_w_avx512(d.w, d.w_bf16, wrow + c * d.k + k0, mask);
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv[r], wv[c], acc[r][c]);
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) d.y[(m0 + r) * d.n + n0 + c] = hsum_avx512(acc[r][c]);
}

// the bf16 path: x and w bf16, one vdpbf16ps per 32 k
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
template <int R, int C>
__attribute__((always_inline)) inline void tile_bf16(const Dense& d, int64_t m0, int64_t n0) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const uint16_t* x = d.xb + m0 * d.k;
    const uint16_t* w = static_cast<const uint16_t*>(d.w) + n0 * d.k;
    for (int64_t k0 = 0; k0 < d.k; k0 += 32) {
        const __mmask32 mask = d.k - k0 >= 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << (d.k - k0)) - 1);
        __m512bh xv[R], wv[C];
        for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * d.k + k0);
        for (int c = 0; c < C; ++c) wv[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + c * d.k + k0);
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv[r], wv[c]);
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) d.y[(m0 + r) * d.n + n0 + c] = hsum_avx512(acc[r][c]);
}

void block_bf16(const Dense& d, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    for (int64_t m = m0; m < m1;) {
        const int64_t rows = std::min<int64_t>(4, m1 - m);
        int64_t n = n0;
        if (rows == 1)
            for (; n + 8 <= n1; n += 8) tile_bf16<1, 8>(d, m, n);
        for (; n + 4 <= n1; n += 4) {
            switch (rows) {
                case 1: tile_bf16<1, 4>(d, m, n); break;
                case 2: tile_bf16<2, 4>(d, m, n); break;
                case 3: tile_bf16<3, 4>(d, m, n); break;
                default: tile_bf16<4, 4>(d, m, n); break;
            }
        }
        for (; n < n1; ++n) {
            switch (rows) {
                case 1: tile_bf16<1, 1>(d, m, n); break;
                case 2: tile_bf16<2, 1>(d, m, n); break;
                case 3: tile_bf16<3, 1>(d, m, n); break;
                default: tile_bf16<4, 1>(d, m, n); break;
            }
        }
        m += rows;
    }
}
#pragma GCC pop_options

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
void block_avx512(const Dense& d, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    for (int64_t m = m0; m < m1;) {
        const int64_t rows = std::min<int64_t>(4, m1 - m);
        int64_t n = n0;
        if (rows == 1)   // one row: 8 columns keep 8 FMA chains in flight
            for (; n + 8 <= n1; n += 8) tile_avx512<1, 8>(d, m, n);
        for (; n + 4 <= n1; n += 4) {
            switch (rows) {
                case 1: tile_avx512<1, 4>(d, m, n); break;
                case 2: tile_avx512<2, 4>(d, m, n); break;
                case 3: tile_avx512<3, 4>(d, m, n); break;
                default: tile_avx512<4, 4>(d, m, n); break;
            }
        }
        for (; n < n1; ++n) {
            switch (rows) {
                case 1: tile_avx512<1, 1>(d, m, n); break;
                case 2: tile_avx512<2, 1>(d, m, n); break;
                case 3: tile_avx512<3, 1>(d, m, n); break;
                default: tile_avx512<4, 1>(d, m, n); break;
            }
        }
        m += rows;
    }
}
#endif

void block_generic(const Dense& d, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    for (int64_t m = m0; m < m1;) {
        const int64_t rows = std::min<int64_t>(2, m1 - m);
        int64_t n = n0;
        for (; n + 2 <= n1; n += 2) {
            if (rows == 2) tile_generic<2, 2>(d, m, n);
            else tile_generic<1, 2>(d, m, n);
        }
        for (; n < n1; ++n) {
            if (rows == 2) tile_generic<2, 1>(d, m, n);
            else tile_generic<1, 1>(d, m, n);
        }
        m += rows;
    }
}

void dense_run(const Dense& d) {
    if (d.m == 0 || d.n == 0) return;
    if (d.k == 0) {
        std::fill(d.y, d.y + d.m * d.n, 0.0f);
        return;
    }
    // columns per task: their weights about 128 KiB (a multiple of 8, at least 8)
    const int64_t wbytes = d.w_bf16 ? 2 : 4;
    const int64_t nb = std::max<int64_t>(8, (128 << 10) / (d.k * wbytes) / 8 * 8);
    const int64_t row_blocks = (d.m + kRowBlock - 1) / kRowBlock, col_blocks = (d.n + nb - 1) / nb;
#if defined(DSV4RT_X86)
    const bool avx512 = active_isa() >= Isa::avx512;
#else
    const bool avx512 = false;
#endif
    const bool bf16 = d.xb != nullptr;
    const double flops = 2.0 * d.m * d.n * d.k + static_cast<double>(d.n) * d.k * wbytes;
    parallel_tasks(row_blocks * col_blocks, [&](int64_t t) {
        const int64_t m0 = (t / col_blocks) * kRowBlock, n0 = (t % col_blocks) * nb;
        const int64_t m1 = std::min(d.m, m0 + kRowBlock), n1 = std::min(d.n, n0 + nb);
#if defined(DSV4RT_X86)
        if (bf16) return block_bf16(d, m0, m1, n0, n1);
        if (avx512) return block_avx512(d, m0, m1, n0, n1);
#endif
        block_generic(d, m0, m1, n0, n1);
    }, pick_threads(flops, 1 << 20));
    (void)avx512;
    (void)bf16;
}

void dense_gemm(py::handle x_, py::handle w_, py::handle out_) {
    const char* fn = "dense_gemm";
    auto x = need({fn, "x"}, x_, 2, {Kind::f32, Kind::bf16});
    auto w = need({fn, "w"}, w_, 2, {Kind::f32, Kind::bf16});
    auto out = need({fn, "out"}, out_, 2, {Kind::f32, Kind::bf16}, true);
    const int64_t m = dim(x, 0), k = dim(x, 1), n = dim(w, 0);
    need_shape({fn, "w"}, w, {n, k}, "[N, K] (K = x.shape[1])");
    need_shape({fn, "out"}, out, {m, n}, "[M, N]");
    F32Out y(out);
    F32In xf(x);
    const bool w_bf16 = kind_of(w) == Kind::bf16;
    py::gil_scoped_release nogil;
#if defined(DSV4RT_X86)
    if (xf.bf16 && w_bf16 && active_isa() >= Isa::avx512_bf16) {   // the vdpbf16ps path
        dense_run(Dense{nullptr, static_cast<const uint16_t*>(xf.data), w.data(), true, y.ptr, m, n, k});
        y.finish();
        return;
    }
#endif
    xf.load();
    dense_run(Dense{xf.ptr, nullptr, w.data(), w_bf16, y.ptr, m, n, k});
    y.finish();
}

}  // namespace

void bind_dense_gemm(py::module_& m) {
    m.def("dense_gemm", &dense_gemm, py::arg("x"), py::arg("w"), py::arg("out"),
          "out[M, N] = x[M, K] @ w[N, K]^T in float32 with one summation order for every output.\n\n"
          "x and w float32 or int16/uint16 (bf16 bits), out float32 or bf16 bits (rounded to nearest even); all\n"
          "C-contiguous. Each output: 16 FMA chains over k = l (mod 16) in increasing k (bf16 x and w on AVX512-BF16:\n"
          "16 vdpbf16ps chains over the pairs k = 2l, 2l + 1 (mod 32)), then a fixed pairwise tree; so a row's result\n"
          "never depends on the other rows, the tiling or the threads.");
}

}  // namespace dsv4rt
