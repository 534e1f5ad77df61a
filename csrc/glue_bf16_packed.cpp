// The batch-invariant grouped output projection (wo_a, runtime/model/attention.py via
// dsv4rt.invariant.grouped_linear) on a bf16 weight packed once, with dense_gemm's bf16 bits.
//
// dense_gemm's bf16 path (bf16 x and w, AVX512-BF16) reads w as stored, [N, K]: at M = 1 a tile of 8 columns
// walks 8 rows of w side by side, 8 memory streams, which a 2-core EPYC serves well below one sequential
// stream per core (see dense_packed.cpp for the float32-x head). dense_bf16_pack writes w as
// [ceil(N/8), ceil(K/32), 8, 32] bf16 (zeros past N and K), so the 32-wide k steps of a tile's 8 columns lie one
// after another and a thread's slice of tiles is one contiguous range. Every output is summed exactly as
// dense_gemm's bf16 path sums it: one vdpbf16ps chain over k in steps of 32 from zero (x masked to zero past
// K, w zero there), then the same hsum tree (l + 8, + 4, + 2, + 1), rounded to bf16 to nearest even; so
// dense_bf16_packed(x, dense_bf16_pack(w), N) gives dense_gemm(x, w)'s bits whatever M, tiling or threads.
// Only on CPUs whose active ISA includes AVX512-BF16 (where dense_gemm takes that path); elsewhere it
// declines (returns False) and the caller runs dense_gemm.
#include "common.h"
#include "dense_bf16_group.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>
#endif

namespace dsv4rt {
namespace {

constexpr int64_t kCols = 8, kStep = 32;

#if defined(DSV4RT_X86)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
// dense_gemm.cpp's hsum_avx512 tree: (l, l + 8), then (l, l + 4), (l, l + 2), (0, 1)
__attribute__((always_inline)) inline float hsum_tree(__m512 v) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(s2) + _mm_cvtss_f32(_mm_shuffle_ps(s2, s2, 1));
}

// rows m0 .. m0 + R - 1 of x against the 8 columns of packed group g; float results into y [m, n]
template <int R>
__attribute__((always_inline)) inline void group_rows(const uint16_t* x, const uint16_t* wg, float* y, int64_t m0,
                                                      int64_t n, int64_t k, int64_t steps, int64_t n0) {
    __m512 acc[R][kCols];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < steps; ++s) {
        const int64_t k0 = s * kStep;
        const __mmask32 mask = k - k0 >= 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << (k - k0)) - 1);
        __m512bh xv[R];
        for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (m0 + r) * k + k0);
        const uint16_t* ws = wg + s * kCols * kStep;
        for (int c = 0; c < kCols; ++c) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(ws + c * kStep);
            for (int r = 0; r < R; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv[r], wv);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < kCols && n0 + c < n; ++c) y[(m0 + r) * n + n0 + c] = hsum_tree(acc[r][c]);
}

}  // namespace

void dense_bf16_group(const uint16_t* x, const uint16_t* wg, float* y, int64_t m, int64_t n, int64_t k, int64_t steps,
                      int64_t n0) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) group_rows<4>(x, wg, y, r, n, k, steps, n0);
    for (; r < m; ++r) group_rows<1>(x, wg, y, r, n, k, steps, n0);
}

namespace {
void groups_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k, int64_t steps,
                 int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) dense_bf16_group(x, w + g * steps * kCols * kStep, y, m, n, k, steps, g * kCols);
}
#pragma GCC pop_options
#endif

py::array dense_bf16_pack(py::handle w_) {
    const char* fn = "dense_bf16_pack";
    auto w = need({fn, "w"}, w_, 2, {Kind::bf16});
    const int64_t n = dim(w, 0), k = dim(w, 1);
    const int64_t groups = (n + kCols - 1) / kCols, steps = (k + kStep - 1) / kStep;
    py::array_t<uint16_t> out({groups, steps, kCols, kStep});
    const uint16_t* src = static_cast<const uint16_t*>(w.data());
    uint16_t* dst = out.mutable_data();
    py::gil_scoped_release nogil;
    for (int64_t g = 0; g < groups; ++g)
        for (int64_t s = 0; s < steps; ++s)
            for (int64_t c = 0; c < kCols; ++c) {
                uint16_t* d = dst + ((g * steps + s) * kCols + c) * kStep;
                const int64_t row = g * kCols + c, k0 = s * kStep;
                const int64_t valid = row < n ? std::min<int64_t>(kStep, k - k0) : 0;
                for (int64_t j = 0; j < kStep; ++j) d[j] = j < valid ? src[row * k + k0 + j] : uint16_t(0);
            }
    return out;
}

bool dense_bf16_packed(py::handle x_, py::handle wp_, int64_t n, py::handle out_) {
    const char* fn = "dense_bf16_packed";
    auto x = need({fn, "x"}, x_, 2, {Kind::bf16});
    auto wp = need({fn, "w_packed"}, wp_, 4, {Kind::bf16});
    auto out = need({fn, "out"}, out_, 2, {Kind::bf16}, true);
    const int64_t m = dim(x, 0), k = dim(x, 1);
    if (n < 0) value_error({fn, "n"}, "must be >= 0, got " + std::to_string(n));
    const int64_t groups = (n + kCols - 1) / kCols, steps = (k + kStep - 1) / kStep;
    need_shape({fn, "w_packed"}, wp, {groups, steps, kCols, kStep},
               "[ceil(N/8), ceil(K/32), 8, 32] (dense_bf16_pack of the [N, K] weight; K = x.shape[1])");
    need_shape({fn, "out"}, out, {m, n}, "[M, N]");
#if defined(DSV4RT_X86)
    if (active_isa() < Isa::avx512_bf16) return false;
    const uint16_t* xp = static_cast<const uint16_t*>(x.data());
    const uint16_t* wpp = static_cast<const uint16_t*>(wp.data());
    uint16_t* op = static_cast<uint16_t*>(out.mutable_data());
    py::gil_scoped_release nogil;
    groups_to_bf16(m, n, k, groups, op, [&](float* y, int64_t g0, int64_t g1) {
        groups_bf16(xp, wpp, y, m, n, k, steps, g0, g1);
    });
    return true;
#else
    return false;
#endif
}

}  // namespace

void bind_glue_bf16_packed(py::module_& m) {
    m.def("dense_bf16_pack", &dense_bf16_pack, py::arg("w"),
          "w [N, K] bf16 bits (int16/uint16) -> a new [ceil(N/8), ceil(K/32), 8, 32] array: the layout\n"
          "dense_bf16_packed streams in address order (zeros past N and K).");
    m.def("dense_bf16_packed", &dense_bf16_packed, py::arg("x"), py::arg("w_packed"), py::arg("n"), py::arg("out"),
          "out[M, N] (bf16 bits) = x[M, K] @ w[N, K]^T for bf16 x and w_packed = dense_bf16_pack(w): the bits of\n"
          "dense_gemm(x, w, out) on its AVX512-BF16 path, the weight read as one stream per thread. Returns False\n"
          "(out untouched) where the active ISA lacks AVX512-BF16 (dense_gemm then sums otherwise: call it).");
}

}  // namespace dsv4rt
