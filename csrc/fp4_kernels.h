// Internal interface between the MXFP4 GEMM driver (fp4_gemm.cpp) and its AVX-512 kernels
// (fp4_gemm_avx512.cpp, compiled for any x86-64 with per-function target attributes).
#pragma once

#include <utility>

#include "common.h"
#include "fp4_gemm.h"

namespace dsv4rt {
namespace fp4 {

constexpr int64_t kNB = 32;          // blocked path: tile rows (N)
constexpr int64_t kKB = 128;         // blocked path: tile depth (K)
// GEMV: software prefetch distance in weight bytes. One core decodes ~7 bytes per cycle, so 2 KB ahead
// is ~300 cycles, less than a memory access: the loads waited and decode and memory did not overlap.
// Measured on the 2-core EPYC, M=1, weights evicted first: 2 KB 26-37 GB/s, 4 KB 34-38, 8 KB 35-44,
// 16 KB 33-43 (FP8 and FP4, V4-Flash shapes).
constexpr int64_t kPrefetch = 8192;

// The bf16 lane kernel for few rows (fp4_lane_avx512.cpp): x as bf16 rows [rows][kp] (kp: K rounded up to
// 128, zero past K) against weight rows [n0, n1) into y[r * ldy + n]. A weight row with a scale byte outside
// [e_lo, 252] is not written but appended to `bad` (once), for the float32 GEMV.
struct LaneArgs {
    const uint16_t* xb;
    int64_t rows, kp;
    const uint8_t* w;   // [n][k / 2]
    const uint8_t* s;   // [n][k / 32]
    int64_t k;
    int e_lo;
    float* y;
    int64_t ldy;
};
// True where the CPU has AVX512-BF16 and AVX512-VBMI and set_isa allows AVX512-BF16.
bool lane_available();
void lane_rows(const LaneArgs& a, int64_t n0, int64_t n1, std::vector<int64_t>& bad);

// x rows permuted to a kernel's lane order: pairs (generic: per 32-block, the 16 even k then the 16 odd k)
void permute_x_pairs(const float* x, int64_t k, float* out);

#if defined(DSV4RT_X86)
// per 128-chunk, vector j lane i holds x[8i + j]; the K % 128 tail as pairs
void permute_x_avx512(const float* x, int64_t k, float* out);
// y[m * ldy + n] for n in [n0, n1), m < rows (<= 8): x permuted by permute_x_avx512, rows of stride k
void gemv_rows_avx512(int rows, const float* xr, int64_t k, const uint8_t* w, const uint8_t* s, int64_t n0,
                      int64_t n1, float* y, int64_t ldy);
// dequantise rows [n0, n0 + nvalid) x k [k0, k0 + kw) into wt[kw][kNB] (k-major, scale applied)
void decode_tile_avx512(const uint8_t* w, const uint8_t* s, int64_t k, int64_t n0, int64_t nvalid, int64_t k0,
                        int64_t kw, float* wt);
// bf16_gemm.h DecodeFn (ctx: the Fp4Expert): rows [n0, n0 + nt) of K block kb as bf16 values with their
// E8M0 scales folded in (sc = 1); exact where every scale byte is in [2, 252]
void decode_tile_bf16(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint16_t* wd, float* sc);
// bf16_gemm.h DecodeTFn: the same values transposed (16 rows gathered a dword at a time), full K blocks only
bool decode_tile_bf16_t(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint32_t* wt, float* sc);
// bf16_gemm.h FewFn (fp4_few_avx512.cpp): gemm()'s bits for up to kFewRows rows, the weight decoded in registers
// (AVX512-BF16 and VBMI; false where it does not run). At 8 rows gemm_few, which decodes a tile once for all rows,
// was as fast or faster (this kernel 4 rows at a time; 2-core EPYC, 2026-12-06, 2 threads, 4096 x 4096:
// 1.5-1.7 vs 1.4-1.5 ms)
constexpr int64_t kFewRows = 4;
bool few_rows_bf16(const void* ctx, const uint16_t* xb, int64_t m, int64_t kblocks, int64_t n, float* y, int64_t ldy);
// (smallest, largest) scale byte of the expert
std::pair<int, int> scale_range(const Fp4Expert& ex);
// The same three for an expert in the packed layout (fp4_packed_avx512.cpp; ex.n % 16 == 0, ex.k % 128 == 0),
// bit for bit the values and sums of the ones above
void decode_packed(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint16_t* wd, float* sc);
bool decode_packed_t(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint32_t* wt, float* sc);
bool few_rows_packed(const void* ctx, const uint16_t* xb, int64_t m, int64_t kblocks, int64_t n, float* y, int64_t ldy);
#endif

}  // namespace fp4
}  // namespace dsv4rt
