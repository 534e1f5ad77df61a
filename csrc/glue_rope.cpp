// RoPE of the model glue (runtime/model/rope.py apply_rope) in one native call: the torch steps (widen,
// split the interleaved pairs, four products, a difference and a sum, stack, round, concatenate with the
// untouched leading dims) were ~12 tiny ops per call, 15 calls per layer-step of a decode. Each value is the
// float32 result of the same operations as the torch path (x0*c and x1*s each rounded to float32, then the
// difference / sum rounded; no fused multiply-add), rounded to bf16 to nearest even for a bf16 x, so the
// output is bit for bit the torch path's.
#pragma GCC optimize("fp-contract=off")
#include "common.h"

namespace dsv4rt {

namespace {

template <bool BF>
void rope_span(const void* x_, const float* cos, const float* sin, void* out_, int64_t r0, int64_t r1, int64_t d,
               int64_t half, int64_t rep, bool inverse) {
    using T = std::conditional_t<BF, uint16_t, float>;
    const T* x = static_cast<const T*>(x_);
    T* out = static_cast<T*>(out_);
    const int64_t lead = d - 2 * half;
    for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * d;
        T* orow = out + r * d;
        std::copy(xr, xr + lead, orow);
        const float* c = cos + (r / rep) * half;
        const float* s = sin + (r / rep) * half;
        for (int64_t i = 0; i < half; ++i) {
            float x0, x1;
            if constexpr (BF) {
                x0 = bf16_to_f32(xr[lead + 2 * i]);
                x1 = bf16_to_f32(xr[lead + 2 * i + 1]);
            } else {
                x0 = xr[lead + 2 * i];
                x1 = xr[lead + 2 * i + 1];
            }
            const float ci = c[i];
            const float si = inverse ? -s[i] : s[i];
            const float a = x0 * ci, b = x1 * si, e = x0 * si, f = x1 * ci;
            const float y0 = a - b, y1 = e + f;
            if constexpr (BF) {
                orow[lead + 2 * i] = f32_to_bf16(y0);
                orow[lead + 2 * i + 1] = f32_to_bf16(y1);
            } else {
                orow[lead + 2 * i] = y0;
                orow[lead + 2 * i + 1] = y1;
            }
        }
    }
}

void rope_rows(const py::object& x_, const py::object& cos_, const py::object& sin_, const py::object& out_,
               int64_t rep, bool inverse) {
    const char* fn = "rope_rows";
    auto x = need({fn, "x"}, x_, 2, {Kind::f32, Kind::bf16});
    auto cos = need({fn, "cos"}, cos_, 2, {Kind::f32});
    auto sin = need({fn, "sin"}, sin_, 2, {Kind::f32});
    auto out = need({fn, "out"}, out_, 2, {kind_of(x)}, true);
    const int64_t rows = dim(x, 0), d = dim(x, 1), c = dim(cos, 0), half = dim(cos, 1);
    need_shape({fn, "sin"}, sin, {c, half}, "cos's shape");
    need_shape({fn, "out"}, out, {rows, d}, "x's shape");
    if (2 * half > d)
        value_error({fn, "cos"}, "expected 2 * cos.shape[1] <= x.shape[1] = " + std::to_string(d) + ", got " +
                                     shape_str(cos));
    if (rep < 1 || c * rep != rows)
        value_error({fn, "rep"}, "expected rep >= 1 with cos.shape[0] * rep == x.shape[0] = " + std::to_string(rows) +
                                     ", got rep " + std::to_string(rep) + " and cos " + shape_str(cos));
    const bool bf = kind_of(x) == Kind::bf16;
    const void* xp = x.data();
    const float* cp = static_cast<const float*>(cos.data());
    const float* sp = static_cast<const float*>(sin.data());
    void* op = out.mutable_data();
    py::gil_scoped_release nogil;
    parallel_for(rows, [&](int64_t b, int64_t e) {
        if (bf) rope_span<true>(xp, cp, sp, op, b, e, d, half, rep, inverse);
        else rope_span<false>(xp, cp, sp, op, b, e, d, half, rep, inverse);
    }, pick_threads(static_cast<double>(rows * d), 1 << 18));
}

}  // namespace

void bind_glue_rope(py::module_& m) {
    m.def("rope_rows", &rope_rows, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("rep"),
          py::arg("inverse"),
          "out[R, D] = x with its trailing 2 * H dims rotated by interleaved pairs (2i, 2i + 1): y0 = x0 c - x1 s,\n"
          "y1 = x0 s + x1 c in float32 (s negated for inverse), row r by cos / sin row r // rep ([R / rep, H]\n"
          "float32); the leading D - 2H dims copied. x and out float32, or both bf16 bits (rounded to nearest\n"
          "even); bit for bit runtime/model/rope.py's torch steps. out must not overlap x.");
}

}  // namespace dsv4rt
