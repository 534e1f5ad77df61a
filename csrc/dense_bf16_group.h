// One 8-column group of the packed bf16 dense layout ([ceil(K/32)][8][32] bf16, glue_bf16_packed.cpp) against all
// rows of x, with dense_gemm's AVX512-BF16 bits: for kernels that decode a weight into that layout
// (dense_fp8_packed.cpp). Call only where the active ISA includes AVX512-BF16.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace dsv4rt {

// The tail the packed dense kernels share: f(g0, g1) writes float outputs of groups [g0, g1) into y [m, n]
// (threads split the groups), then y is rounded to bf16 (nearest even) into out. k == 0: zeros.
template <class F>
void groups_to_bf16(int64_t m, int64_t n, int64_t k, int64_t groups, uint16_t* out, F&& f) {
    if (m == 0 || n == 0) return;
    std::vector<float> y(static_cast<size_t>(m * n));
    if (k == 0) {
        std::fill(y.begin(), y.end(), 0.0f);
    } else {
        const double work = 2.0 * m * n * k + 2.0 * n * k;
        parallel_for(groups, [&](int64_t g0, int64_t g1) { f(y.data(), g0, g1); }, pick_threads(work, 1 << 20));
    }
    f32_to_bf16_array(y.data(), out, m * n);
}

// y[r * n + n0 + c] (float) for r < m, c < 8 with n0 + c < n: x [m, k] bf16 bits, wg the group's steps x 8 x 32
void dense_bf16_group(const uint16_t* x, const uint16_t* wg, float* y, int64_t m, int64_t n, int64_t k, int64_t steps,
                      int64_t n0);

}  // namespace dsv4rt
