// act_quant='fp8' of the GEMMs in C++: per row and block-wide K block (128 V4, 32 V4.1; the last may be partial),
// s = 2^ceil(log2(max(amax, 1e-4) * float32(1/448))) from the float32 bits, q = E4M3-RNE(clamp(x / s, +-448)),
// out = q * s (exact in float32). Bit-identical to dsv4rt.formats.act_quant_fp8 (NaN in a block makes the
// whole block NaN, as the reference's NaN amax does); tests/unit/test_native_api.py compares the bits.
#include <cmath>

#include "common.h"

namespace dsv4rt {
namespace {

// one block of n values, in place (written so the compiler vectorises both loops)
DSV4RT_CLONES void quant_block(float* v, int64_t n) {
    float amax = 0.0f;
    bool nan = false;
    for (int64_t j = 0; j < n; ++j) {
        const float a = std::fabs(v[j]);
        nan |= a != a;
        amax = a > amax ? a : amax;
    }
    if (nan) {
        std::fill(v, v + n, std::numeric_limits<float>::quiet_NaN());
        return;
    }
    const float y = (amax > 1e-4f ? amax : 1e-4f) * static_cast<float>(1.0 / 448.0);
    const uint32_t yb = f32_bits(y);
    const uint32_t e = std::min<uint32_t>(255u, ((yb >> 23) & 0xFFu) + ((yb & 0x7FFFFFu) != 0));
    const float s = bits_f32(e << 23), inv = 1.0f / s;   // powers of two (s = inf for an inf amax)
    for (int64_t j = 0; j < n; ++j) {
        const float q = v[j] * inv;
        const float aq = std::fabs(q);
        const float a = aq > 448.0f ? 448.0f : aq;
        const int32_t ex = std::max<int32_t>(static_cast<int32_t>((f32_bits(a) >> 23) & 0xFFu) - 127, -6);
        const float step = bits_f32(static_cast<uint32_t>(ex - 3 + 127) << 23);
        const float istep = bits_f32(static_cast<uint32_t>(127 - (ex - 3) ) << 23);
        const float r = std::nearbyint(a * istep) * step;
        v[j] = std::copysign(r, q) * s;
    }
}

}  // namespace

void act_quant_fp8_rows(float* x, int64_t m, int64_t k, int64_t block) {
    const int64_t nb = (k + block - 1) / block;
    parallel_for(m * nb, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t r = b / nb, c = b % nb;
            quant_block(x + r * k + c * block, std::min(block, k - c * block));
        }
    }, pick_threads(static_cast<double>(m) * k, 1 << 16));
}

namespace {

void act_quant_fp8(py::handle x_, py::handle out_, int64_t block) {
    const char* fn = "act_quant_fp8";
    auto x = need({fn, "x"}, x_, 2, {Kind::f32, Kind::bf16});
    auto out = need({fn, "out"}, out_, 2, {Kind::f32}, true);
    need_shape({fn, "out"}, out, {dim(x, 0), dim(x, 1)}, "x's shape");
    if (block != 32 && block != 128) value_error({fn, "block"}, "must be 32 or 128, got " + std::to_string(block));
    F32In xf(x);
    float* o = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release nogil;
    xf.load();
    if (xf.ptr != o) std::copy(xf.ptr, xf.ptr + xf.n, o);
    act_quant_fp8_rows(o, dim(x, 0), dim(x, 1), block);
}

}  // namespace

void bind_act_quant(py::module_& m) {
    m.def("act_quant_fp8", &act_quant_fp8, py::arg("x"), py::arg("out"), py::arg("block") = 128,
          "out[M, K] = q * s of act_quant='fp8' (E4M3 values, one power-of-two scale per row and block of K, block\n"
          "128 or 32), bit-identical to dsv4rt.formats.act_quant_fp8(x, block). x float32 or bf16 bits [M, K], out\n"
          "float32 [M, K] (may be x).");
}

}  // namespace dsv4rt
