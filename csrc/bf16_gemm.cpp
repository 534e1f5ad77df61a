// Blocked GEMM core on AVX512-BF16 (see bf16_gemm.h for the layout). Compiled for plain x86-64: the code
// below carries the AVX512-BF16 target through a pragma and runs only where available() says so.
#include "bf16_gemm.h"

#if defined(DSV4RT_X86)
#include <immintrin.h>

namespace dsv4rt {
namespace bf16gemm {

bool available() { return active_isa() >= Isa::avx512_bf16; }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")

namespace {

constexpr int64_t kPairs = kKb / 2;   // bf16 pairs per K block
constexpr int kMv = 4;                // 16-row vectors of x per register tile
constexpr int kNr = 6;                // output columns per register tile

// the biased exponent of a nonzero bf16 (0 for subnormals), 255 for zero: the minimum over x is PackedX::min_exp
inline uint32_t exp_or_255(uint16_t b) { return (b & 0x7FFFu) ? (b >> 7) & 0xFFu : 255u; }

// 32 consecutive values of one row (bf16 bits or float32) -> 16 bf16 pairs; `inexact` gets a bit for a
// float32 value that is not a bf16 value, `emin` the lane-wise minimum of exp_or_255
inline __m512i pairs32(const void* src, bool is_bf16, __mmask32& inexact, __m512i& emin) {
    __m512i v;
    if (is_bf16) {
        v = _mm512_loadu_si512(src);
    } else {
        const float* f = static_cast<const float*>(src);
        const __m512i lo = _mm512_loadu_si512(f), hi = _mm512_loadu_si512(f + 16);
        const __m512i low16 = _mm512_set1_epi32(0xFFFF);
        inexact |= static_cast<__mmask32>(_mm512_test_epi32_mask(lo, low16) | _mm512_test_epi32_mask(hi, low16));
        // exact values: the bf16 pattern is the upper half of the float32 one
        v = _mm512_permutex2var_epi16(lo, _mm512_setr_epi32(
            0x00030001, 0x00070005, 0x000B0009, 0x000F000D, 0x00130011, 0x00170015, 0x001B0019, 0x001F001D,
            0x00230021, 0x00270025, 0x002B0029, 0x002F002D, 0x00330031, 0x00370035, 0x003B0039, 0x003F003D), hi);
    }
    const __mmask32 nz = _mm512_test_epi16_mask(v, _mm512_set1_epi16(0x7FFF));
    const __m512i e = _mm512_and_si512(_mm512_srli_epi16(v, 7), _mm512_set1_epi16(0xFF));
    emin = _mm512_mask_min_epu16(emin, nz, emin, e);
    return v;
}

inline uint16_t scalar_bits(const void* x, bool is_bf16, int64_t i, bool& inexact, uint32_t& emin) {
    uint16_t b;
    if (is_bf16) {
        b = static_cast<const uint16_t*>(x)[i];
    } else {
        uint32_t u;
        std::memcpy(&u, static_cast<const float*>(x) + i, 4);
        inexact |= (u & 0xFFFFu) != 0;
        b = static_cast<uint16_t>(u >> 16);
    }
    emin = std::min(emin, exp_or_255(b));
    return b;
}

// pairs [p0, p1) of every row into out (pair-major, row stride mp); -1 if a float32 value is not a bf16
// value, else the minimum biased exponent of the nonzero values (255 if none)
int pack_pairs(const void* x, bool is_bf16, int64_t m, int64_t k, int64_t p0, int64_t p1, int64_t mp,
               uint32_t* out) {
    const size_t esz = is_bf16 ? 2 : 4;
    __mmask32 inexact_v = 0;
    __m512i emin_v = _mm512_set1_epi16(255);
    bool inexact = false;
    uint32_t emin = 255;
    alignas(64) uint32_t tmp[16];
    for (int64_t r = 0; r < m; ++r) {
        const char* row = static_cast<const char*>(x) + static_cast<size_t>(r * k) * esz;
        int64_t p = p0;
        for (; p + 16 <= p1 && 2 * (p + 16) <= k; p += 16) {
            _mm512_store_si512(tmp, pairs32(row + static_cast<size_t>(2 * p) * esz, is_bf16, inexact_v, emin_v));
            for (int i = 0; i < 16; ++i) out[(p + i) * mp + r] = tmp[i];
        }
        for (; p < p1; ++p) {
            const int64_t k0 = 2 * p;
            const uint32_t lo = k0 < k ? scalar_bits(row, is_bf16, k0, inexact, emin) : 0;
            const uint32_t hi = k0 + 1 < k ? scalar_bits(row, is_bf16, k0 + 1, inexact, emin) : 0;
            out[p * mp + r] = lo | (hi << 16);
        }
        if (inexact || inexact_v) return -1;   // the caller takes another path: stop early
    }
    alignas(64) uint16_t lanes[32];
    _mm512_store_si512(lanes, emin_v);
    for (uint16_t e : lanes) emin = std::min<uint32_t>(emin, e);
    return static_cast<int>(emin);
}

// One register tile: acc[j][i] = sum over the block's 64 pairs of x rows 16i.. (of this m range) times
// column j; then c[j][16i..] += acc * sc[j]
template <int MV, int NR>
void tile(const uint32_t* xb, int64_t mp, const uint16_t* wd, const float* sc, float* c) {
    __m512 acc[NR][MV];
    for (int j = 0; j < NR; ++j)
        for (int i = 0; i < MV; ++i) acc[j][i] = _mm512_setzero_ps();
    const uint32_t* w32 = reinterpret_cast<const uint32_t*>(wd);
    for (int64_t p = 0; p < kPairs; ++p) {
        __m512bh xv[MV];
        for (int i = 0; i < MV; ++i) xv[i] = (__m512bh)_mm512_loadu_si512(xb + p * mp + 16 * i);
        for (int j = 0; j < NR; ++j) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(w32[j * kPairs + p]));
            for (int i = 0; i < MV; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], xv[i], b);
        }
    }
    for (int j = 0; j < NR; ++j) {
        const __m512 s = _mm512_set1_ps(sc[j]);
        for (int i = 0; i < MV; ++i) {
            float* cp = c + j * mp + 16 * i;
            _mm512_storeu_ps(cp, _mm512_fmadd_ps(acc[j][i], s, _mm512_loadu_ps(cp)));
        }
    }
}

using TileFn = void (*)(const uint32_t*, int64_t, const uint16_t*, const float*, float*);

template <int MV>
constexpr TileFn tile_for(int nr) {
    return nr == 1 ? tile<MV, 1> : nr == 2 ? tile<MV, 2> : nr == 3 ? tile<MV, 3>
         : nr == 4 ? tile<MV, 4> : nr == 5 ? tile<MV, 5> : tile<MV, 6>;
}

TileFn pick(int mv, int nr) {
    switch (mv) {
        case 1: return tile_for<1>(nr);
        case 2: return tile_for<2>(nr);
        case 3: return tile_for<3>(nr);
        default: return tile_for<4>(nr);
    }
}

// one task: output columns [n0, n0 + nt)
void run_tile(const PackedX& x, int64_t n0, int64_t nt, DecodeFn decode, const void* ctx, float* y,
              int64_t ldy) {
    thread_local std::vector<float> cbuf;
    thread_local std::vector<uint16_t> wbuf;
    const int64_t mp = x.mp;
    cbuf.assign(static_cast<size_t>(nt * mp), 0.0f);
    wbuf.resize(static_cast<size_t>(kNt * kKb));
    float* c = cbuf.data();
    uint16_t* wd = wbuf.data();
    float sc[kNt];
    for (int64_t kb = 0; kb < x.kblocks; ++kb) {
        decode(ctx, n0, nt, kb, wd, sc);
        const uint32_t* xb = x.pairs.data() + kb * kPairs * mp;
        for (int64_t m0 = 0; m0 < mp; m0 += 16 * kMv) {
            const int mv = static_cast<int>(std::min<int64_t>(kMv, (mp - m0) / 16));
            for (int64_t j0 = 0; j0 < nt; j0 += kNr) {
                const int nr = static_cast<int>(std::min<int64_t>(kNr, nt - j0));
                pick(mv, nr)(xb + m0, mp, wd + j0 * kKb, sc + j0, c + j0 * mp + m0);
            }
        }
    }
    for (int64_t r = 0; r < x.m; ++r)
        for (int64_t j = 0; j < nt; ++j) y[r * ldy + n0 + j] = c[j * mp + r];
}

}  // namespace

bool pack_x(const void* x, bool is_bf16, int64_t m, int64_t k, PackedX& out) {
    const int64_t kblocks = (k + kKb - 1) / kKb, mp = (m + 15) / 16 * 16;
    std::vector<uint32_t> pairs(static_cast<size_t>(kblocks * kPairs * mp), 0u);
    std::vector<int> emin(static_cast<size_t>(kblocks));
    parallel_tasks(kblocks, [&](int64_t kb) {
        emin[static_cast<size_t>(kb)] = pack_pairs(x, is_bf16, m, k, kb * kPairs, (kb + 1) * kPairs, mp, pairs.data());
    }, pick_threads(static_cast<double>(m) * k, 1 << 18));
    if (std::find(emin.begin(), emin.end(), -1) != emin.end()) return false;
    out.min_exp = emin.empty() ? 255 : *std::min_element(emin.begin(), emin.end());
    out.pairs = std::move(pairs);
    out.m = m;
    out.mp = mp;
    out.kblocks = kblocks;
    return true;
}

void gemm(const PackedX& x, int64_t n, DecodeFn decode, const void* ctx, float* y, int64_t ldy) {
    const int64_t tiles = (n + kNt - 1) / kNt;
    parallel_tasks(tiles, [&](int64_t t) {
        const int64_t n0 = t * kNt;
        run_tile(x, n0, std::min(kNt, n - n0), decode, ctx, y, ldy);
    });
}

#pragma GCC pop_options

}  // namespace bf16gemm
}  // namespace dsv4rt

#else  // not x86-64: no AVX512-BF16 path

namespace dsv4rt {
namespace bf16gemm {
bool available() { return false; }
bool pack_x(const void*, bool, int64_t, int64_t, PackedX&) { return false; }
void gemm(const PackedX&, int64_t, DecodeFn, const void*, float*, int64_t) {}
}  // namespace bf16gemm
}  // namespace dsv4rt

#endif
