// DeepSeek-V4.1 packed KV-cache rows (runtime/kv_formats.py) decoded to float32 for sparse_attention.
//
// FP8 window row of D values: D E4M3 codes, then D/32 UE8M0 scale bytes; x = E4M3(code) * 2^(byte - 127).
// FP4 global row: D/2 bytes of E2M1 pairs (low nibble = even element), then D/16 E4M3 scale bytes;
// x = E2M1(code) * E4M3(byte). Table lookups, exact in float32; NaN bytes (E4M3 0x7F / 0xFF, E8M0 255) give NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace dsv4rt {

struct KvTables {
    float e4m3[256], e8m0[256], e2m1[16];
    KvTables() {
        const float nan = std::numeric_limits<float>::quiet_NaN();
        for (int c = 0; c < 256; ++c) {
            const int e = (c >> 3) & 15, mt = c & 7;
            const float mag = e == 0 ? std::ldexp(static_cast<float>(mt), -9) : std::ldexp(1.0f + mt / 8.0f, e - 7);
            e4m3[c] = (c & 0x7F) == 0x7F ? nan : (c & 0x80 ? -mag : mag);
            e8m0[c] = c == 255 ? nan : std::ldexp(1.0f, c - 127);
        }
        for (int c = 0; c < 16; ++c) {
            const int e = (c >> 1) & 3, mt = c & 1;
            const float mag = e == 0 ? 0.5f * mt : std::ldexp(1.0f + mt / 2.0f, e - 1);
            e2m1[c] = c & 8 ? -mag : mag;
        }
    }
};

inline const KvTables& kv_tables() {
    static const KvTables t;
    return t;
}

// Gathered rows -> float32 out[n][d]. rows[j] >= 0: window row rows[j] of kv (FP8, d + d/32 bytes a row);
// rows[j] < 0: global row -rows[j] - 1 of kvg (FP4, d/2 + d/16 bytes a row). d % 32 == 0.
inline void gather_rows_v41(const uint8_t* kv, const uint8_t* kvg, int64_t d, const int32_t* rows, int64_t n,
                            float* out) {
    constexpr int64_t ahead = 4;   // random rows defeat the hardware prefetcher: ask for a few rows ahead
    const KvTables& t = kv_tables();
    const int64_t wrow = d + d / 32, grow = d / 2 + d / 16;
    auto at = [&](int32_t r) { return r >= 0 ? kv + r * wrow : kvg + (-static_cast<int64_t>(r) - 1) * grow; };
    for (int64_t j = 0; j < n; ++j) {
        if (j + ahead < n) {
            const uint8_t* nxt = at(rows[j + ahead]);
            for (int64_t b = 0; b < (rows[j + ahead] >= 0 ? wrow : grow); b += 64) __builtin_prefetch(nxt + b);
        }
        const uint8_t* src = at(rows[j]);
        float* dst = out + j * d;
        if (rows[j] >= 0) {
            for (int64_t g = 0; g < d / 32; ++g) {
                const float sc = t.e8m0[src[d + g]];
                for (int64_t i = 0; i < 32; ++i) dst[g * 32 + i] = t.e4m3[src[g * 32 + i]] * sc;
            }
        } else {
            for (int64_t g = 0; g < d / 16; ++g) {
                const float sc = t.e4m3[src[d / 2 + g]];
                for (int64_t i = 0; i < 8; ++i) {
                    const uint8_t byte = src[g * 8 + i];
                    dst[g * 16 + 2 * i] = t.e2m1[byte & 15] * sc;
                    dst[g * 16 + 2 * i + 1] = t.e2m1[byte >> 4] * sc;
                }
            }
        }
    }
}

}  // namespace dsv4rt
