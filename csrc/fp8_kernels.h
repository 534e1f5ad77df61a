// Internal interface between the FP8 block GEMM driver (fp8_gemm.cpp) and its AVX-512 kernel
// (fp8_gemm_avx512.cpp, compiled for any x86-64 with per-function target attributes).
#pragma once

#include "common.h"

namespace dsv4rt {
namespace fp8 {

struct Fp8Args {
    const float* x;        // [m, k]
    const uint8_t* w;      // [n, k] E4M3 bytes
    const uint8_t* s8;     // [ceil(n/bs), sk] E8M0 (or null)
    const float* s32;      // [ceil(n/bs), sk] float32 (or null)
    float* y;              // [m, n]
    int64_t m, n, k, sk;
    int64_t bs = 128;      // block size of the scales: 128 (V4) or 32 (V4.1)
    bool wide = true;      // bs = 32: some scale * 256 may overflow float32 (the GEMV then scales in two steps)
};

#if defined(DSV4RT_X86)
// y[:, n0:n1] for all m rows, 8 rows of x per pass over the weight rows (either block size)
void rows_avx512(const Fp8Args& a, int64_t n0, int64_t n1);
// bf16_gemm.h DecodeFn (ctx: the Fp8Args): weight rows [n0, n0 + nt) of K block kb as the bf16 patterns of
// their E4M3 values (NaN bytes -> NaN, zero past K), sc = the rows' block scales. Block size 32: the
// four E8M0 scales of the 128-wide K block are folded into the bf16 values (exact where every scale byte
// is in [10, 246]: the caller checks) and sc = 1
void decode_tile_bf16(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint16_t* wd, float* sc);
// bf16_gemm.h DecodeTFn: the same values transposed (16 rows gathered a dword at a time; block 32 with the
// scales folded in as decode_tile_bf16), full K blocks only (false otherwise: gemm_few then transposes
// decode_tile_bf16's tile)
bool decode_tile_bf16_t(const void* ctx, int64_t n0, int64_t nt, int64_t kb, uint32_t* wt, float* sc);
#endif

// The lane kernel (fp8_lane_avx512.cpp): vdpbf16ps with K in the vector lanes on exact bf16 rows of x; each
// output's summation order is fixed (see that file), so a row's result never depends on the other rows.
// True where it can run: AVX512-BF16 active (set_isa) and the CPU has AVX512-VBMI.
bool lane_available();
// y[r * ldy + n] for the `rows` rows of xb (bf16 bits [rows][kp], kp >= K rounded up to 32, zero past K) and
// the weight rows n in [n0, n1) of a (a.x and a.y unused). The caller keeps every nonzero product x * w
// normal (bf16gemm::products_normal's rule; weights >= 2^-9).
void lane_rows(const Fp8Args& a, const uint16_t* xb, int64_t kp, int64_t rows, float* y, int64_t ldy,
               int64_t n0, int64_t n1);
// Many rows: weight rows [n0, n0 + nt) decoded once into wd [nt][kp] (kp a multiple of 64), then
// lane_rows_decoded gives lane_rows' bits from them (wd: the decoded rows n0 .. n1 - 1) in register tiles.
// fold (E8M0 scales only): each nonzero value times its block scale (exponent + byte - 127), so a K block's
// chain sum comes out already scaled and is added, not multiplied in (fold_exact: when that gives the same
// bits); false, with wd incomplete, where a NaN byte stops the fold (decode again without it).
bool lane_decode(const Fp8Args& a, int64_t n0, int64_t nt, int64_t kp, uint16_t* wd, bool fold);
void lane_rows_decoded(const Fp8Args& a, const uint16_t* wd, const uint16_t* xb, int64_t kp, int64_t rows,
                       float* y, int64_t ldy, int64_t n0, int64_t n1, bool folded);

}  // namespace fp8
}  // namespace dsv4rt
