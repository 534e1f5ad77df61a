// The indexer's MXFP4 simulation (runtime/model/functional.py fp4_sim, dsv4rt.formats.fp4_fake_quant with
// block 32) in one native call: the formats steps are ~25 torch ops per call (amax, the power-of-two scale's
// bit tricks, the E2M1 grid rounding). Every step here is the same IEEE float32 operation (a product, a
// quotient, a round half to even, bit-exact exponent arithmetic; no fused multiply-add), NaN propagating as
// torch's amax / clip do, so the output is bit for bit the formats path's.
#pragma GCC optimize("fp-contract=off")
#include <cmath>

#include "common.h"

namespace dsv4rt {

namespace {

constexpr float kFloor = 6.0f * 1.1754943508222875e-38f;   // 6 * 2^-126, the scale's floor (formats._mx_round)

// one block of n values, float32 in place: x -> dequant(quant_mxfp4(x))
void mx_block(float* v, int64_t n, float inv6) {
    float amax = 0.0f;
    bool nan = false;
    for (int64_t j = 0; j < n; ++j) {
        const float a = std::fabs(v[j]);
        if (std::isnan(a)) nan = true;
        else if (a > amax) amax = a;
    }
    float s;
    if (nan) {
        s = std::numeric_limits<float>::quiet_NaN();
    } else {
        const float y = (amax < kFloor ? kFloor : amax) * inv6;
        const uint32_t bits = f32_bits(y);
        int32_t b = static_cast<int32_t>((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0 ? 1 : 0);
        b = std::min<int32_t>(std::max<int32_t>(b, 0), 255);
        s = bits_f32(static_cast<uint32_t>(b) << 23);
    }
    for (int64_t j = 0; j < n; ++j) {
        const float q = v[j] / s;
        const bool neg = (f32_bits(q) >> 31) != 0;
        const float aq = std::fabs(q);
        const float a = (6.0f < aq) ? 6.0f : aq;              // clip(max=6), NaN stays NaN
        const int32_t e = std::max<int32_t>(static_cast<int32_t>((f32_bits(a) >> 23) & 0xFF) - 127, 0);
        const float step = bits_f32(static_cast<uint32_t>(e - 1 + 127) << 23);
        const float r = std::nearbyint(a / step) * step;
        v[j] = (neg ? -r : r) * s;
    }
}

void mx_sim(const py::object& x_, const py::object& out_, int64_t block, float inv6) {
    const char* fn = "mx_sim";
    auto x = need({fn, "x"}, x_, 2, {Kind::f32, Kind::bf16});
    auto out = need({fn, "out"}, out_, 2, {kind_of(x)}, true);
    const int64_t m = dim(x, 0), l = dim(x, 1);
    need_shape({fn, "out"}, out, {m, l}, "x's shape");
    if (block < 1 || l % block)
        value_error({fn, "block"}, "expected >= 1 dividing x.shape[1] = " + std::to_string(l) + ", got " +
                                       std::to_string(block));
    const bool bf = kind_of(x) == Kind::bf16;
    const void* xp = x.data();
    void* op = out.mutable_data();
    py::gil_scoped_release nogil;
    parallel_for(m, [&](int64_t r0, int64_t r1) {
        std::vector<float> buf(static_cast<size_t>(l));
        for (int64_t r = r0; r < r1; ++r) {
            if (bf) {
                const uint16_t* xr = static_cast<const uint16_t*>(xp) + r * l;
                for (int64_t j = 0; j < l; ++j) buf[j] = bf16_to_f32(xr[j]);
            } else {
                const float* xr = static_cast<const float*>(xp) + r * l;
                std::copy(xr, xr + l, buf.begin());
            }
            for (int64_t j = 0; j < l; j += block) mx_block(buf.data() + j, block, inv6);
            if (bf) {
                uint16_t* o = static_cast<uint16_t*>(op) + r * l;
                for (int64_t j = 0; j < l; ++j) o[j] = f32_to_bf16(buf[j]);
            } else {
                std::copy(buf.begin(), buf.end(), static_cast<float*>(op) + r * l);
            }
        }
    }, pick_threads(static_cast<double>(m * l), 1 << 16));
}

}  // namespace

void bind_glue_mxsim(py::module_& m) {
    m.def("mx_sim", &mx_sim, py::arg("x"), py::arg("out"), py::arg("block"), py::arg("inv6"),
          "out[M, L] = x rounded through MXFP4 and back along each row in blocks of `block` (E8M0 scale\n"
          "2^ceil(log2(max(amax, 6 * 2^-126) * inv6)), E2M1 round half to even, saturating at 6), bit for bit\n"
          "dsv4rt.formats.fp4_fake_quant (inv6: its float32 1/6). x and out float32, or both bf16 bits.");
}

}  // namespace dsv4rt
