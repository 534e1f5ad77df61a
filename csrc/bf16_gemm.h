// Blocked GEMM core on AVX512-BF16 (vdpbf16ps) for the prefill-size quantised GEMMs (fp8_gemm first).
//
// The weight is the caller's format: a decode callback turns one tile (up to kNt rows x one 128-wide K
// block) into bf16 and names one float32 scale per row for that block. E4M3 and E2M1 values are bf16 values,
// so the decode is exact; bf16 activations (or act_quant's E4M3 x power-of-two values) are too, and the
// products are summed in float32 by the instruction. Layout:
//  * x is packed once per call into bf16 pairs [K/2][Mp] (a 32-bit pair holds x[m, 2p], x[m, 2p + 1]), so a
//    vector holds 16 rows of x at one pair of k;
//  * the decoded tile is row-major [nt][128], so one output column's pair is a 32-bit broadcast;
//  * a 64-row x 6-column register tile (24 accumulators) sums one K block; the block's partial sums are
//    scaled per column into a float32 tile C [nt][Mp] in L2, transposed into y when the tile is done.
#pragma once

#include <functional>

#include "common.h"

namespace dsv4rt {
namespace bf16gemm {

constexpr int64_t kKb = 128;   // K block: the decode unit and the scale granularity
constexpr int64_t kNt = 48;    // rows of the weight per tile (one task)

// x as bf16 pairs [kblocks * 64][mp] (zero past K and past m), mp = m rounded up to 16
struct PackedX {
    std::vector<uint32_t> pairs;
    int64_t m = 0, mp = 0, kblocks = 0;
    int min_exp = 255;   // smallest biased exponent of a nonzero x (0: a subnormal; 255: x is all zero)
};

// vdpbf16ps reads subnormal inputs as zero and flushes subnormal products and sums, so a caller takes this
// path only where every nonzero product x * w has a biased exponent >= kMinProductExp: then what is flushed
// is a sum cancelling to below 2^-126, at most 2^-20 of the products' magnitudes (the float32 tolerance
// allows 2^-22 sqrt(K))
constexpr int kMinProductExp = 127 - 106;

// True when every product of a nonzero x with a nonzero weight of biased exponent >= w_min_exp has a biased
// exponent >= kMinProductExp (x's smallest is x.min_exp)
inline bool products_normal(const PackedX& x, int w_min_exp) {
    return x.min_exp + w_min_exp - 127 >= kMinProductExp;
}

// Decode weight rows [n0, n0 + nt) (nt <= kNt) of K block kb into wd[nt][kKb] bf16 bits (zero past K) and
// the per-row scale of the block's partial sums into sc[nt].
using DecodeFn = void (*)(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint16_t* wd, float* sc);
// The same values transposed, for gemm_few: wt[p * kNt + r] = the bf16 pair p (k = 2p, 2p + 1) of row n0 + r
// as 32 bits, for r < nt rounded up to 16 (rows past nt: any finite copy), and sc as DecodeFn. Returns false,
// writing nothing, for a block it does not handle (the K % 128 tail): gemm_few then decodes and transposes.
using DecodeTFn = bool (*)(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint32_t* wt, float* sc);

// True where the CPU has AVX512-BF16 and set_isa allows it.
bool available();

// Pack x (float32 or bf16 bits, [m, k], rows of stride k) and find its min_exp. Returns false, packing
// nothing, when a float32 value is not a bf16 value. Threads split the K blocks.
bool pack_x(const void* x, bool is_bf16, int64_t m, int64_t k, PackedX& out);

// y[r * ldy + c] = sum over K blocks of sc * (x[r] . wd[c]) for r < x.m, c < n; threads split the tiles.
void gemm(const PackedX& x, int64_t n, DecodeFn decode, const void* ctx, float* y, int64_t ldy);

// ---- the row-invariant mode (batch-invariant serving; bf16_rows.cpp) -----------------------------------
// gemm()'s numerics for a row depend only on that row (the lanes are rows), but whether a call takes gemm()
// at all depends on M and on every row of x. In the row-invariant mode the choice is made per row, and few
// rows get gemm()'s bits from gemm_few() instead of a GEMV with other numerics.

// gemm()'s result, bit for bit, for a few rows: the output columns in the vector lanes (the tile decoded
// transposed by decode_t, else decoded and transposed in registers; each row's bf16 pair broadcast). xb: the
// rows as bf16 bits [m][kblocks * kKb], zero past K. Threads split the tiles.
void gemm_few(const uint16_t* xb, int64_t m, int64_t kblocks, int64_t n, DecodeFn decode, DecodeTFn decode_t,
              const void* ctx, float* y, int64_t ldy);

// A weight format's own kernel for gemm_few's work (same arguments, the same bits), or false where it does not
// take the call (too many rows, a CPU without what it needs): gemm_few runs then
using FewFn = bool (*)(const void* ctx, const uint16_t* xb, int64_t m, int64_t kblocks, int64_t n, float* y,
                       int64_t ldy);

// One call of the row-invariant driver: x [m, k] (float32, or bf16 bits when is_bf16) times the weight that
// `decode` reads, into y[r * ldy + c]. w_min_exp: the smallest biased exponent of a nonzero weight value.
struct RowProblem {
    const void* x;
    bool is_bf16;
    int64_t m, k, n;
    int w_min_exp;
    DecodeFn decode;
    DecodeTFn decode_t;   // or null
    const void* ctx;
    float* y;
    int64_t ldy;
    FewFn few = nullptr;   // or null
};

// Computes rows of x given as float32 [rows][k] into y [rows][n]; its numerics for a row must depend only on
// that row (a GEMV)
using RowFallback = std::function<void(const float* x, int64_t rows, float* y)>;

// The row-invariant driver: rows whose values are bf16 and whose products stay normal (what gemm() needs)
// get gemm()'s numerics (gemm() above few_max such rows, gemm_few() up to it); the other rows go to
// `fallback`. Call only where available().
void run_rows(const RowProblem& p, int64_t few_max, const RowFallback& fallback);

}  // namespace bf16gemm
}  // namespace dsv4rt
