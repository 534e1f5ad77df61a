// The scaled E2M1 -> bf16 decode shared by the MXFP4 kernels with the output columns in the vector lanes
// (fp4_few_avx512.cpp on the released layout, fp4_packed_avx512.cpp on the packed one). Include only in code
// compiled for AVX512-BW.
//
// kTbl: entry = sign | (magnitude + kBias) for the nonzero E2M1 codes, 0 for +0 and -0 (repeated: vpermw reads
// 5 index bits). One unsigned saturating subtract of kBias - (e - 127) * 128 then gives the value times
// 2^(e - 127) for a nonzero code (no borrow: E2M1 x 2^(e - 127) is a normal bf16 for 2 <= e <= 252) and 0 for a
// zero code (it saturates). -0 decodes to +0, where bf16_gemm.h's decode keeps -0: x * -0 and x * +0 leave a
// nonzero chain alike; a chain of zeros ends +0 or -0, and either adds to c (+0 or nonzero) into the same c.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

namespace dsv4rt {
namespace fp4 {

constexpr uint16_t kBias = 125 * 128;
constexpr uint16_t scaled_enc(uint16_t v) {
    return v & 0x7FFF ? static_cast<uint16_t>((v & 0x8000) | ((v & 0x7FFF) + kBias)) : 0;
}
alignas(64) inline const uint16_t kScaledTbl[32] = {
    scaled_enc(0x0000), scaled_enc(0x3F00), scaled_enc(0x3F80), scaled_enc(0x3FC0),
    scaled_enc(0x4000), scaled_enc(0x4040), scaled_enc(0x4080), scaled_enc(0x40C0),
    scaled_enc(0x8000), scaled_enc(0xBF00), scaled_enc(0xBF80), scaled_enc(0xBFC0),
    scaled_enc(0xC000), scaled_enc(0xC040), scaled_enc(0xC080), scaled_enc(0xC0C0),
    scaled_enc(0x0000), scaled_enc(0x3F00), scaled_enc(0x3F80), scaled_enc(0x3FC0),
    scaled_enc(0x4000), scaled_enc(0x4040), scaled_enc(0x4080), scaled_enc(0x40C0),
    scaled_enc(0x8000), scaled_enc(0xBF00), scaled_enc(0xBF80), scaled_enc(0xBFC0),
    scaled_enc(0xC000), scaled_enc(0xC040), scaled_enc(0xC080), scaled_enc(0xC0C0)};

// sv lane j: the 4 scale bytes of column j in one 128-wide K block. sub[b]: kBias - (e_b - 127) * 128 in both
// 16-bit words of lane j, e_b its scale byte of 32-block b
__attribute__((target("avx512f,avx512bw"), always_inline)) inline void scaled_subs(__m512i sv, __m512i sub[4]) {
    const __m512i top = _mm512_set1_epi16(static_cast<int16_t>(kBias + 127 * 128));
    const __m512i lane_base = _mm512_set_epi32(12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0, 12, 8, 4, 0);
    for (int b = 0; b < 4; ++b) {
        const __m512i sel = _mm512_set1_epi32(static_cast<int>(0x80008000u | static_cast<uint32_t>(b) << 16 |
                                                                static_cast<uint32_t>(b)));
        const __m512i idx = _mm512_add_epi8(sel, _mm512_or_si512(lane_base, _mm512_slli_epi32(lane_base, 16)));
        sub[b] = _mm512_sub_epi16(top, _mm512_slli_epi16(_mm512_shuffle_epi8(sv, idx), 7));
    }
}

}  // namespace fp4
}  // namespace dsv4rt
#endif
