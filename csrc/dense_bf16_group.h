// One 8-column group of the packed bf16 dense layout ([ceil(K/32)][8][32] bf16, glue_bf16_packed.cpp) against all
// rows of x, with dense_gemm's AVX512-BF16 bits: for kernels that decode a weight into that layout
// (dense_fp8_packed.cpp). Call only where the active ISA includes AVX512-BF16.
#pragma once

#include <cstdint>

namespace dsv4rt {

// y[r * n + n0 + c] (float) for r < m, c < 8 with n0 + c < n: x [m, k] bf16 bits, wg the group's steps x 8 x 32
void dense_bf16_group(const uint16_t* x, const uint16_t* wg, float* y, int64_t m, int64_t n, int64_t k, int64_t steps,
                      int64_t n0);

}  // namespace dsv4rt
