// The bf16 "lane" kernel of the MXFP4 GEMMs for few rows of x (see fp4_gemm.cpp for the driver): E2M1 codes
// decoded to bf16 with their E8M0 scale folded into the exponent, dotted with bf16 rows of x by vdpbf16ps with
// K in the vector lanes. One pass streams the weight at the rate of a GEMV, and each extra row of x costs one
// instruction per 32 weights (the float32 GEMV: decode, scale multiply and two FMAs per row).
//
// Decode of a 64-byte chunk (four 32-blocks, low nibble = even k): one vpermb arranges the bytes so that
// each qword holds the two bytes of every block that its four output words need; per block, vpmultishiftqb
// moves code i to the low bits of word i, and vpermw looks it up (it reads 5 index bits: the table repeats)
// in the 16-entry bf16 table with (e - 127) added to the exponents of its nonzero entries (a broadcast and a
// masked vpaddw on the table, not on the data). E2M1 values times 2^(e - 127) are normal bf16 values for
// 2 <= e <= 252, so the decode is exact there.
//
// Numerics of one output y[r, n] (identical for every row count, tile shape and thread count): lane l of
// each 32-wide step at k (k = 0, 32, ...) sums the pair k + 2l, k + 2l + 1 into its float32 chain by
// vdpbf16ps, in k order; y = the fixed halving tree of the 16 chains. The driver takes this kernel only where
// x is exactly bf16 and every product is a normal float32 (vdpbf16ps flushes subnormals, as in bf16_gemm.h);
// a weight row with a scale byte outside [e_lo, 252] is reported back for the float32 GEMV instead.
#include "fp4_kernels.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>

namespace dsv4rt {
namespace fp4 {

#define LANE __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi"), always_inline)) inline
#define LANE_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vbmi")))

namespace {

// bf16 patterns of the 16 E2M1 values (codes 8-15 negative), twice: vpermw reads 5 index bits
alignas(64) const uint16_t kTbl[32] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                       0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0,
                                       0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                       0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};

// nonzero entries of kTbl (the scale is added to their exponents)
constexpr __mmask32 kNonzero = 0xFEFEFEFE;

struct Decoder {
    __m512i arrange, ctrl[4], bcast[4], tbl;
    LANE Decoder() {
        // vpermb: qword q gathers bytes 2q, 2q + 1 of each of the four 32-blocks of a 64-byte chunk (byte
        // 8q + 2j + t = chunk byte 16j + 2q + t); then vpmultishiftqb with ctrl[j] puts code i of block j at
        // bit 0 of word i (its nibble starts at bit 16j + 4(i % 4) of qword i / 4)
        alignas(64) uint8_t p[64], c[4][64];
        alignas(64) uint16_t bc[4][32];
        for (int q = 0; q < 8; ++q)
            for (int j = 0; j < 4; ++j)
                for (int t = 0; t < 2; ++t) p[8 * q + 2 * j + t] = static_cast<uint8_t>(16 * j + 2 * q + t);
        for (int j = 0; j < 4; ++j)
            for (int i = 0; i < 32; ++i) {
                c[j][2 * i] = c[j][2 * i + 1] = static_cast<uint8_t>(16 * j + 4 * (i % 4));
                bc[j][i] = static_cast<uint16_t>(j);
            }
        arrange = _mm512_load_si512(p);
        for (int j = 0; j < 4; ++j) ctrl[j] = _mm512_load_si512(c[j]), bcast[j] = _mm512_load_si512(bc[j]);
        tbl = _mm512_load_si512(kTbl);
    }
    // the 64 bytes of a chunk arranged for block()
    LANE __m512i prepare(__m512i v) const { return _mm512_permutexvar_epi8(arrange, v); }
    // the exponent adds (e - 127) * 128 of the chunk's four scale bytes (words 0..3)
    LANE __m512i adds(uint32_t e4) const {
        const __m128i e = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(static_cast<int>(e4)));
        return _mm512_castsi128_si512(_mm_slli_epi16(_mm_sub_epi16(e, _mm_set1_epi16(127)), 7));
    }
    // block j (0..3) of the prepared chunk pv with its scale folded in: 32 bf16 values in k order
    LANE __m512i block(__m512i pv, __m512i add, int j) const {
        const __m512i st = _mm512_mask_add_epi16(tbl, kNonzero, tbl, _mm512_permutexvar_epi16(bcast[j], add));
        return _mm512_permutexvar_epi16(_mm512_multishift_epi64_epi8(ctrl[j], pv), st);
    }
};

// the fixed reduction of one output's 16 lanes
LANE float reduce16(__m512 v) {
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

// R rows of x (bf16 [R][kp], zero past K) x weight rows n .. n + C - 1; bad[c]: row n + c had a scale byte
// outside [e_lo, 252] (its outputs are not written)
template <int R, int C>
LANE void tile(const Decoder& dec, const LaneArgs& a, int64_t n, bool* bad) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    const int64_t kb = a.k / 2, ks = a.k / 32;
    const uint8_t* wr[C];
    const uint8_t* sr[C];
    unsigned lo[C], hi[C];   // smallest and largest scale byte of each weight row
    for (int c = 0; c < C; ++c) {
        wr[c] = a.w + (n + c) * kb;
        sr[c] = a.s + (n + c) * ks;
        lo[c] = 255, hi[c] = 0;
    }
    for (int64_t k0 = 0; k0 < a.k; k0 += 128) {
        const int nblk = static_cast<int>(std::min<int64_t>(4, (a.k - k0) / 32));
        const __mmask64 mask = nblk == 4 ? ~__mmask64{0} : (__mmask64{1} << (16 * nblk)) - 1;
        __m512i v[C], add[C];
        for (int c = 0; c < C; ++c) {
            _mm_prefetch(reinterpret_cast<const char*>(wr[c] + k0 / 2 + kPrefetch), _MM_HINT_T0);
            v[c] = dec.prepare(_mm512_maskz_loadu_epi8(mask, wr[c] + k0 / 2));
            uint32_t e4 = 0x7F7F7F7Fu;   // blocks past K: scale byte 127 (their codes and x are zero)
            if (nblk == 4) std::memcpy(&e4, sr[c] + k0 / 32, 4);
            else std::memcpy(&e4, sr[c] + k0 / 32, static_cast<size_t>(nblk));   // little endian: the low bytes
            for (int j = 0; j < 4; ++j) {
                const unsigned e = (e4 >> (8 * j)) & 0xFF;
                lo[c] = std::min(lo[c], e), hi[c] = std::max(hi[c], e);
            }
            add[c] = dec.adds(e4);
        }
        for (int j = 0; j < nblk; ++j) {
            __m512i w[C];
            for (int c = 0; c < C; ++c) w[c] = dec.block(v[c], add[c], j);
            for (int r = 0; r < R; ++r) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(a.xb + r * a.kp + k0 + 32 * j);
                for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, (__m512bh)w[c]);
            }
        }
    }
    for (int c = 0; c < C; ++c) {
        bad[c] = static_cast<int>(lo[c]) < a.e_lo || hi[c] > 252;
        if (bad[c]) continue;
        for (int r = 0; r < R; ++r) a.y[r * a.ldy + n + c] = reduce16(acc[r][c]);
    }
}

template <int R>
LANE void rows_r(const Decoder& dec, const LaneArgs& a, int64_t n0, int64_t n1, std::vector<int64_t>& bad) {
    constexpr int C = R == 1 ? 4 : R <= 2 ? 4 : R <= 4 ? 3 : 2;   // R * C chains + C weights + x fit 32 registers
    bool b[C];
    int64_t n = n0;
    for (; n + C <= n1; n += C) {
        tile<R, C>(dec, a, n, b);
        for (int c = 0; c < C; ++c)
            if (b[c]) bad.push_back(n + c);
    }
    for (; n < n1; ++n) {
        tile<R, 1>(dec, a, n, b);
        if (b[0]) bad.push_back(n);
    }
}

}  // namespace

bool lane_available() {
    static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
    return vbmi && active_isa() >= Isa::avx512_bf16;
}

LANE_FN void lane_rows(const LaneArgs& a, int64_t n0, int64_t n1, std::vector<int64_t>& bad) {
    const Decoder dec;
    LaneArgs b = a;
    for (int64_t r0 = 0; r0 < a.rows; r0 += 8) {
        b.xb = a.xb + r0 * a.kp;
        b.y = a.y + r0 * a.ldy;
        const size_t before = bad.size();
        switch (std::min<int64_t>(8, a.rows - r0)) {
            case 1: rows_r<1>(dec, b, n0, n1, bad); break;
            case 2: rows_r<2>(dec, b, n0, n1, bad); break;
            case 3: rows_r<3>(dec, b, n0, n1, bad); break;
            case 4: rows_r<4>(dec, b, n0, n1, bad); break;
            case 5: rows_r<5>(dec, b, n0, n1, bad); break;
            case 6: rows_r<6>(dec, b, n0, n1, bad); break;
            case 7: rows_r<7>(dec, b, n0, n1, bad); break;
            default: rows_r<8>(dec, b, n0, n1, bad); break;
        }
        if (r0 > 0) bad.resize(before);   // the same weight rows are out of range for every group of rows
    }
}

}  // namespace fp4
}  // namespace dsv4rt

#else

namespace dsv4rt {
namespace fp4 {
bool lane_available() { return false; }
void lane_rows(const LaneArgs&, int64_t, int64_t, std::vector<int64_t>&) {}
}  // namespace fp4
}  // namespace dsv4rt

#endif
