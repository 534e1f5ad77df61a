// Ceilings of this CPU, measured for the bench's roofline:
//  * peak_gflops: every thread runs independent chains of float32 FMAs (the widest vectors the CPU has,
//    through target_clones) or of AVX512-BF16 vdpbf16ps on registers only. A library GEMM (torch's sgemm)
//    reaches only part of it, so it is no ceiling for hand-written kernels.
//  * read_gbps: every thread streams its slice of a large buffer with vector loads and software prefetch,
//    as the GEMV kernels read their weights (torch's sum over the same buffer reads slower here).
#include <chrono>

#include "bf16_gemm.h"
#include "common.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>
#endif

namespace dsv4rt {
namespace {

constexpr int kChains = 12;   // independent accumulators: more than FMA latency x throughput
// passes per probe, the best one reported: on a shared machine another process can take a core for a while
constexpr int kReps = 7;

// flops done: iters x kChains x 16 lanes x 2
DSV4RT_CLONES float fma_chains(int64_t iters, float seed) {
    typedef float v16 __attribute__((vector_size(64)));
    v16 acc[kChains];
    const v16 a = v16{} + 0.999f, b = v16{} + seed * 1e-3f;
    for (int c = 0; c < kChains; ++c) acc[c] = v16{} + (seed + c);
    for (int64_t i = 0; i < iters; ++i)
        for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * a + b;
    float s = 0.0f;
    for (int c = 0; c < kChains; ++c)
        for (int j = 0; j < 16; ++j) s += acc[c][j];
    return s;
}

#if defined(DSV4RT_X86)
// flops done: iters x kChains x 16 lanes x 2 pairs x 2
__attribute__((target("avx512f,avx512bf16"))) float dp_chains(int64_t iters, float seed) {
    __m512 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(seed + c);
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3580), b = (__m512bh)_mm512_set1_epi16(0x3F80);
    for (int64_t i = 0; i < iters; ++i) {
        for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
    }
    float s = 0.0f;
    for (int c = 0; c < kChains; ++c) s += _mm512_reduce_add_ps(acc[c]);
    return s;
}
#endif

// work / seconds of the fastest of kReps runs of pass(t) on every thread t (call without the GIL)
template <class F>
double best_rate(double work, F&& pass) {
    const int64_t threads = max_threads();
    double best = 0.0;
    for (int rep = 0; rep < kReps; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        parallel_tasks(threads, [&](int64_t t) { pass(t, threads); }, threads);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, work / s);
    }
    return best;
}

double peak_gflops(const std::string& kind, int64_t iters) {
    const bool bf16 = kind == "bf16";
    if (!bf16 && kind != "fp32") value_error({"peak_gflops", "kind"}, "must be 'fp32' or 'bf16', got '" + kind + "'");
    if (bf16 && !bf16gemm::available())
        value_error({"peak_gflops", "kind"}, "'bf16' needs AVX512-BF16, which this CPU (or set_isa) does not offer");
    if (iters < 1) value_error({"peak_gflops", "iters"}, "must be >= 1, got " + std::to_string(iters));
    const int64_t threads = max_threads();
    std::vector<float> sink(static_cast<size_t>(threads));   // keeps the chains' results alive
    const double flops = static_cast<double>(threads) * iters * kChains * 16 * 2 * (bf16 ? 2 : 1);
    py::gil_scoped_release nogil;
    return best_rate(flops, [&](int64_t t, int64_t) {
#if defined(DSV4RT_X86)
        sink[static_cast<size_t>(t)] = bf16 ? dp_chains(iters, 1.0f + t) : fma_chains(iters, 1.0f + t);
#else
        sink[static_cast<size_t>(t)] = fma_chains(iters, 1.0f + t);
#endif
    }) / 1e9;
}

// sum of the slice as 64-byte vectors (four independent accumulators), prefetching 2 KB ahead
DSV4RT_CLONES uint64_t read_slice(const uint8_t* p, int64_t n) {
    typedef uint64_t v8u __attribute__((vector_size(64)));
    v8u a{}, b{}, c{}, d{};
    int64_t i = 0;
    for (; i + 256 <= n; i += 256) {
        __builtin_prefetch(p + i + 2048);
        __builtin_prefetch(p + i + 2048 + 64);
        __builtin_prefetch(p + i + 2048 + 128);
        __builtin_prefetch(p + i + 2048 + 192);
        v8u t0, t1, t2, t3;
        std::memcpy(&t0, p + i, 64);
        std::memcpy(&t1, p + i + 64, 64);
        std::memcpy(&t2, p + i + 128, 64);
        std::memcpy(&t3, p + i + 192, 64);
        a += t0;
        b += t1;
        c += t2;
        d += t3;
    }
    const v8u t = a + b + c + d;
    uint64_t s = 0;
    for (int j = 0; j < 8; ++j) s += t[j];
    for (; i < n; ++i) s += p[i];
    return s;
}

double read_gbps(const py::array& buf) {
    const uint8_t* p = static_cast<const uint8_t*>(buf.data());
    const int64_t n = static_cast<int64_t>(buf.nbytes());
    std::vector<uint64_t> sink(static_cast<size_t>(max_threads()));   // keeps the sums alive
    py::gil_scoped_release nogil;
    return best_rate(static_cast<double>(n), [&](int64_t t, int64_t threads) {
        const int64_t a = n * t / threads / 64 * 64, b = t + 1 == threads ? n : n * (t + 1) / threads / 64 * 64;
        sink[static_cast<size_t>(t)] = read_slice(p + a, b - a);
    }) / 1e9;
}

}  // namespace

void bind_peak(py::module_& m) {
    m.def("read_gbps", [](py::handle buf) {
        return read_gbps(need({"read_gbps", "buf"}, buf, 1, {Kind::u8}));
    }, py::arg("buf"),
          "GB/s of all threads streaming their slices of buf (uint8, C-contiguous; make it far larger than the\n"
          "caches), vector loads with software prefetch, best of seven passes. The bench's CPU read ceiling.");
    m.def("peak_gflops", &peak_gflops, py::arg("kind"), py::arg("iters") = 1 << 21,
          "GFLOP/s of register-only chains on all threads (best of seven passes): kind 'fp32' (FMA on the widest\n"
          "vectors) or 'bf16' (vdpbf16ps; ValueError without AVX512-BF16). The bench's matrix ceiling on CPU.");
}

}  // namespace dsv4rt
