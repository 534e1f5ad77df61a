// The output head's layout: dense_gemm's numerics on a bf16 weight packed once at load, so that a decode step
// (one row per sequence) streams the weight in address order.
//
// dense_gemm (dense_gemm.cpp) reads w as stored, [N, K]: at M = 1 a tile of 8 columns walks 8 rows of w side
// by side, 8 memory streams, which this 2-core EPYC serves at ~23 GB/s where one sequential stream per core
// reads 33-37 GB/s (_C.read_gbps). dense_pack writes w as [ceil(N/8), ceil(K/16), 8, 16] bf16 (zeros past N
// and K): the 16-wide k steps of a tile's 8 columns lie one after another, so the same tile reads one stream,
// and a thread's slice of tiles is one contiguous range. Every output is summed exactly as dense_gemm sums it
// for float32 x (16 FMA chains over k = l (mod 16) in increasing k, zeros past K, then hsum16's tree), so
// dense_gemm_packed(x, dense_pack(w), N) gives dense_gemm(x, w)'s bits, whatever M, tiling or thread count.
#include "common.h"
#include "vec.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>
#endif

namespace dsv4rt {
namespace {

constexpr int64_t kCols = 8, kStep = 16;

struct Packed {
    const float* x;      // [m, k]
    const uint16_t* w;   // [groups, steps, kCols, kStep] bf16 bits
    float* y;            // [m, n]
    int64_t m, n, k, groups, steps;
};

// ------------------------------------------------------------------------------------------- portable
template <int R>
DSV4RT_INLINE void group_generic(const Packed& p, int64_t g, int64_t m0) {
    v16f acc[R][kCols];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < kCols; ++c) acc[r][c] = v16f{};
    const uint16_t* wg = p.w + g * p.steps * kCols * kStep;
    for (int64_t s = 0; s < p.steps; ++s) {
        const int64_t k0 = s * kStep, valid = std::min<int64_t>(kStep, p.k - k0);
        v16f xv[R];
        for (int r = 0; r < R; ++r) {
            alignas(64) float t[kStep];
            for (int64_t j = 0; j < kStep; ++j) t[j] = j < valid ? p.x[(m0 + r) * p.k + k0 + j] : 0.0f;
            xv[r] = load16(t);
        }
        for (int c = 0; c < kCols; ++c) {
            const v16f wv = load16_bf16(wg + (s * kCols + c) * kStep);
            for (int r = 0; r < R; ++r)
                for (int j = 0; j < kStep; ++j) acc[r][c][j] = std::fma(xv[r][j], wv[j], acc[r][c][j]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < kCols && g * kCols + c < p.n; ++c) p.y[(m0 + r) * p.n + g * kCols + c] = hsum16(acc[r][c]);
}

// ------------------------------------------------------------------------------------------- AVX-512
#if defined(DSV4RT_X86)
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), always_inline)) inline

template <int R>
AVX512 void group_avx512(const Packed& p, int64_t g, int64_t m0) {
    __m512 acc[R][kCols];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_setzero_ps();
    const uint16_t* wg = p.w + g * p.steps * kCols * kStep;
    const float* x = p.x + m0 * p.k;
    for (int64_t s = 0; s < p.steps; ++s) {
        const int64_t k0 = s * kStep;
        const __mmask16 mask = p.k - k0 >= kStep ? __mmask16(0xFFFF) : __mmask16((1u << (p.k - k0)) - 1);
        __m512 xv[R];
        for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(mask, x + r * p.k + k0);
        const uint16_t* ws = wg + s * kCols * kStep;
        for (int c = 0; c < kCols; ++c) {
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + c * kStep));
            const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < kCols && g * kCols + c < p.n; ++c) {
            v16f v;
            std::memcpy(&v, &acc[r][c], sizeof(v));
            p.y[(m0 + r) * p.n + g * kCols + c] = hsum16(v);   // dense_gemm's tree (hsum_avx512 == hsum16)
        }
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
void groups_avx512(const Packed& p, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
        for (int64_t m = 0; m < p.m; m += 4) {   // rows beyond the first 4 reread the group from the cache
            switch (std::min<int64_t>(4, p.m - m)) {
                case 1: group_avx512<1>(p, g, m); break;
                case 2: group_avx512<2>(p, g, m); break;
                case 3: group_avx512<3>(p, g, m); break;
                default: group_avx512<4>(p, g, m); break;
            }
        }
}
#endif

void groups_generic(const Packed& p, int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
        for (int64_t m = 0; m < p.m; m += 2) {
            if (p.m - m >= 2) group_generic<2>(p, g, m);
            else group_generic<1>(p, g, m);
        }
}

py::array dense_pack(py::handle w_) {
    const char* fn = "dense_pack";
    auto w = need({fn, "w"}, w_, 2, {Kind::bf16});
    const int64_t n = dim(w, 0), k = dim(w, 1);
    const int64_t groups = (n + kCols - 1) / kCols, steps = (k + kStep - 1) / kStep;
    py::array_t<uint16_t> out({groups, steps, kCols, kStep});
    const uint16_t* src = static_cast<const uint16_t*>(w.data());
    uint16_t* dst = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        parallel_for(groups, [&](int64_t g0, int64_t g1) {
            for (int64_t g = g0; g < g1; ++g)
                for (int64_t s = 0; s < steps; ++s)
                    for (int64_t c = 0; c < kCols; ++c) {
                        uint16_t* d = dst + ((g * steps + s) * kCols + c) * kStep;
                        const int64_t row = g * kCols + c, k0 = s * kStep;
                        const int64_t valid = row < n ? std::min<int64_t>(kStep, k - k0) : 0;
                        for (int64_t j = 0; j < kStep; ++j) d[j] = j < valid ? src[row * k + k0 + j] : uint16_t(0);
                    }
        });
    }
    return out;
}

void dense_gemm_packed(py::handle x_, py::handle wp_, int64_t n, py::handle out_) {
    const char* fn = "dense_gemm_packed";
    auto x = need({fn, "x"}, x_, 2, {Kind::f32});
    auto wp = need({fn, "w_packed"}, wp_, 4, {Kind::bf16});
    auto out = need({fn, "out"}, out_, 2, {Kind::f32}, true);
    const int64_t m = dim(x, 0), k = dim(x, 1);
    if (n < 0) value_error({fn, "n"}, "must be >= 0, got " + std::to_string(n));
    const int64_t groups = (n + kCols - 1) / kCols, steps = (k + kStep - 1) / kStep;
    need_shape({fn, "w_packed"}, wp, {groups, steps, kCols, kStep},
               "[ceil(N/8), ceil(K/16), 8, 16] (dense_pack of the [N, K] weight; K = x.shape[1])");
    need_shape({fn, "out"}, out, {m, n}, "[M, N]");
    const Packed p{static_cast<const float*>(x.data()), static_cast<const uint16_t*>(wp.data()),
                   static_cast<float*>(out.mutable_data()), m, n, k, groups, steps};
    py::gil_scoped_release nogil;
    if (m == 0 || n == 0) return;
#if defined(DSV4RT_X86)
    const bool avx512 = active_isa() >= Isa::avx512;
#else
    const bool avx512 = false;
#endif
    const double work = 2.0 * m * n * k + 2.0 * n * k;
    parallel_for(groups, [&](int64_t g0, int64_t g1) {
#if defined(DSV4RT_X86)
        if (avx512) return groups_avx512(p, g0, g1);
#endif
        groups_generic(p, g0, g1);
    }, pick_threads(work, 1 << 20));
    (void)avx512;
}

}  // namespace

void bind_dense_packed(py::module_& m) {
    m.def("dense_pack", &dense_pack, py::arg("w"),
          "w [N, K] bf16 bits (int16/uint16) -> a new [ceil(N/8), ceil(K/16), 8, 16] array: the layout\n"
          "dense_gemm_packed streams in address order (zeros past N and K).");
    m.def("dense_gemm_packed", &dense_gemm_packed, py::arg("x"), py::arg("w_packed"), py::arg("n"), py::arg("out"),
          "out[M, N] = x[M, K] @ w[N, K]^T for float32 x and w_packed = dense_pack(w): the bits of\n"
          "dense_gemm(x, w, out) (one summation order per output), with the weight read as one stream per thread.");
}

}  // namespace dsv4rt
