// MXFP4 GEMM kernels (see fp4_gemm.cpp).
#pragma once

#include "common.h"

namespace dsv4rt {

// One expert's problem: y[m, n] = sum_k x[m, k] * dequant(w, s)[n, k] for m < M, n < N.
struct Fp4Expert {
    const float* x;      // [m, k] row-major (stride k)
    const uint8_t* w;    // [n, k/2] packed E2M1, low nibble = even k
    const uint8_t* s;    // [n, k/32] E8M0
    float* y;            // [m, ldy]
    int64_t m, n, k, ldy;
};

// Runs every expert: GEMV path for m <= gemv_max_m, blocked path above. Call without the GIL.
// row_invariant: each row's numerics depend on that row alone (never on m or the other rows): the bf16
// numerics of the blocked AVX512-BF16 path for every row that allows them (its kernel for few rows up to
// gemv_max_m rows, the blocked one above), the GEMV for the others and on CPUs without AVX512-BF16.
void fp4_gemm_run(const std::vector<Fp4Expert>& experts, int64_t gemv_max_m, bool row_invariant = false);

}  // namespace dsv4rt
