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
    bool packed = false;  // w in the packed layout of fp4_pack (fp4_packed.cpp), not [n, k/2]
};

// Runs every expert: GEMV path for m <= gemv_max_m, blocked path above. Call without the GIL.
// row_invariant: each row's numerics depend on that row alone (never on m or the other rows): the bf16
// numerics of the blocked AVX512-BF16 path for every row that allows them (its kernel for few rows up to
// gemv_max_m rows, the blocked one above), the GEMV for the others and on CPUs without AVX512-BF16.
void fp4_gemm_run(const std::vector<Fp4Expert>& experts, int64_t gemv_max_m, bool row_invariant = false);

// ---- the packed layout (fp4_packed.cpp) ------------------------------------------------------------------
// Weights packed once at load for the kernels with the output columns in the vector lanes: per 16 rows of w
// (a group), per 128-wide K block, per quad q of 8 codes, the 16 rows' dwords side by side (64 bytes); in row
// j's dword, word 0 holds the codes of k = 8q, 8q + 2, 8q + 4, 8q + 6 in nibbles 0-3 and word 1 those of
// k = 8q + 1, 8q + 3, 8q + 5, 8q + 7, so pair i of the quad is both words shifted right by 4i. A permutation
// of each group's bytes: the same size, packed and unpacked in place. The scales keep their layout.
// Packable: n % 16 == 0 and k % 128 == 0.
bool fp4_packable(int64_t n, int64_t k);
// True where the packed kernels run (AVX512-BF16 and AVX512-VBMI): elsewhere a packed expert is unpacked into
// scratch for every call, so the loader should not pack.
bool fp4_packed_fast();
// w [groups of 16 rows][16][k / 2] in place, `rows` rows of `k` values (rows % 16 == 0, k % 128 == 0).
void fp4_pack(uint8_t* w, int64_t rows, int64_t k);
void fp4_unpack(uint8_t* w, int64_t rows, int64_t k);
// fp4_gemm_run for experts with packed weights: always the row-invariant mode's numerics (on the packed
// kernels they are also the fastest at every M); gemv_max_m: rows up to which the few-rows kernels run
void fp4_gemm_run_packed(const std::vector<Fp4Expert>& experts, int64_t gemv_max_m);

}  // namespace dsv4rt
