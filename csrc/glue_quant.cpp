// The model glue's FP8 simulation points in one native call: the KV "nope" dims (and the compressor's) go
// through act_quant='fp8' and back (q * s) in blocks of 64, the trailing rope dims stay as they are
// (runtime/model/functional.py fp8_sim_nope). Same kernel as the GEMMs' act_quant (act_quant_fp8_rows), so
// the values are bit for bit dsv4rt.formats.fp8_fake_quant's; q * s is exact in bf16, so a bf16 output is too.
#include "common.h"

namespace dsv4rt {
namespace {

void fp8_sim_prefix(const py::object& x_, const py::object& out_, int64_t k, int64_t block) {
    const char* fn = "fp8_sim_prefix";
    auto x = need({fn, "x"}, x_, 2, {Kind::f32, Kind::bf16});
    auto out = need({fn, "out"}, out_, 2, {kind_of(x)}, true);
    const int64_t m = dim(x, 0), l = dim(x, 1);
    need_shape({fn, "out"}, out, {m, l}, "x's shape");
    if (k < 0 || k > l) value_error({fn, "k"}, "expected 0 <= k <= " + std::to_string(l) + ", got " + std::to_string(k));
    if (block < 1) value_error({fn, "block"}, "expected >= 1, got " + std::to_string(block));
    const bool bf = kind_of(x) == Kind::bf16;
    const void* xp = x.data();
    void* op = out.mutable_data();
    py::gil_scoped_release nogil;
    if (!bf) {
        const float* xs = static_cast<const float*>(xp);
        float* o = static_cast<float*>(op);
        if (xs != o) std::copy(xs, xs + m * l, o);
        for (int64_t r = 0; r < m; ++r) act_quant_fp8_rows(o + r * l, 1, k, block);
        return;
    }
    const uint16_t* xs = static_cast<const uint16_t*>(xp);
    uint16_t* o = static_cast<uint16_t*>(op);
    std::vector<float> buf(static_cast<size_t>(k));
    for (int64_t r = 0; r < m; ++r) {
        const uint16_t* xr = xs + r * l;
        uint16_t* orow = o + r * l;
        for (int64_t j = 0; j < k; ++j) buf[j] = bf16_to_f32(xr[j]);
        act_quant_fp8_rows(buf.data(), 1, k, block);
        for (int64_t j = 0; j < k; ++j) orow[j] = f32_to_bf16(buf[j]);
        if (xr != orow) std::copy(xr + k, xr + l, orow + k);
    }
}

}  // namespace

void bind_glue_quant(py::module_& m) {
    m.def("fp8_sim_prefix", &fp8_sim_prefix, py::arg("x"), py::arg("out"), py::arg("k"), py::arg("block"),
          "out[M, L] = x with the first k columns of every row replaced by act_quant='fp8' and back (q * s: E4M3\n"
          "values, one power-of-two scale per row and block of k, the last block partial), bit for bit\n"
          "dsv4rt.formats.fp8_fake_quant(x[:, :k], block); columns k.. copied. x and out float32, or both bf16\n"
          "bits (q * s is exact in bf16); out may be x.");
}

}  // namespace dsv4rt
