// Portable 16-float vectors (GCC/Clang vector extensions): the compiler lowers them to one zmm under
// AVX-512, two ymm under AVX2, four xmm under SSE2 or NEON, so one source serves every target_clones copy.
#pragma once

#include <cstdint>
#include <cstring>

namespace dsv4rt {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

#define DSV4RT_INLINE __attribute__((always_inline)) inline

DSV4RT_INLINE v16f load16(const float* p) {
    v16f v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}
DSV4RT_INLINE void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
DSV4RT_INLINE v16f splat(float f) { return v16f{} + f; }

// 16 bf16 values (their 16-bit patterns) -> float32, exactly
DSV4RT_INLINE v16f load16_bf16(const uint16_t* p) {
    uint16_t h[16];
    std::memcpy(h, p, sizeof(h));
    v16i u;
    for (int i = 0; i < 16; ++i) u[i] = static_cast<int32_t>(static_cast<uint32_t>(h[i]) << 16);
    v16f f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}

DSV4RT_INLINE float hsum16(v16f v) {
#if defined(__clang__)
    v16f t = v + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    t = t + __builtin_shufflevector(t, t, 4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15);
    t = t + __builtin_shufflevector(t, t, 2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    v16f t = v + __builtin_shuffle(v, v16i{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    t = t + __builtin_shuffle(t, v16i{4, 5, 6, 7, 0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15});
    t = t + __builtin_shuffle(t, v16i{2, 3, 0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15});
#endif
    return t[0] + t[1];
}

// Each float32 rounded to bf16 precision (round to nearest even) and back to float32. For finite values
// and infinities only (the precision points round probabilities, products and sums, never NaN on purpose).
DSV4RT_INLINE v16f round_bf16(v16f x) {
    v16u u;
    std::memcpy(&u, &x, sizeof(u));
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    std::memcpy(&x, &u, sizeof(x));
    return x;
}

DSV4RT_INLINE float round_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    std::memcpy(&f, &u, 4);
    return f;
}

// Each non-negative finite float32 below 65520 (probabilities, scores of ReLU terms) rounded to fp16
// precision (round to nearest even; subnormals below 2^-14 on the 2^-24 grid) and back to float32.
DSV4RT_INLINE v16f round_f16_nonneg(v16f x) {
    v16u u;
    std::memcpy(&u, &x, sizeof(u));
    u = (u + 0xFFFu + ((u >> 13) & 1u)) & 0xFFFFE000u;              // 10 mantissa bits
    v16f normal;
    std::memcpy(&normal, &u, sizeof(normal));
    const v16f magic = splat(12582912.0f);                          // 1.5 * 2^23: adding rounds to an integer
    const v16f sub = ((x * 16777216.0f + magic) - magic) * (1.0f / 16777216.0f);
    return x < 6.103515625e-05f ? sub : normal;
}

DSV4RT_INLINE v16f vmax(v16f a, v16f b) { return a > b ? a : b; }
DSV4RT_INLINE v16f relu(v16f a) { return a < 0.0f ? v16f{} : a; }   // NaN stays NaN (as torch.relu)

// exp of a clamped argument xc without the final 2^n: Cody-Waite reduction by ln 2 (n = round(xc / ln 2),
// returned in ni) and a degree-6 polynomial of the remainder; exp(xc) = result * 2^ni.
DSV4RT_INLINE v16f exp_reduced(v16f xc, v16i& ni) {
    v16f n = xc * 1.44269504088896341f;
    ni = __builtin_convertvector(n + (n < 0.0f ? splat(-0.5f) : splat(0.5f)), v16i);   // round half away
    n = __builtin_convertvector(ni, v16f);
    v16f r = xc - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    v16f p = splat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    return p * r + 1.0f;
}

// 2^e for integer lanes with e + 127 in [1, 254] (a normal float)
DSV4RT_INLINE v16f pow2i(v16i e) {
    const v16i bits = (e + 127) << 23;
    v16f out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

// exp(x) for x <= 0 (softmax weights): relative error < 2e-7; x < -87 (and -inf) give 0.
DSV4RT_INLINE v16f exp_neg(v16f x) {
    v16i ni;
    const v16f p = exp_reduced(x < -87.0f ? splat(-87.0f) : x, ni);
    return x < -87.0f ? v16f{} : p * pow2i(ni);
}

}  // namespace dsv4rt
