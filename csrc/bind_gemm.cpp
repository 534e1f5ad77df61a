// Python bindings of the MXFP4 GEMMs: argument checks, then the kernels without the GIL.
#include "fp4_gemm.h"

namespace dsv4rt {
namespace {

constexpr int64_t kMaxK = int64_t(1) << 28;   // the tile decode gathers with 32-bit byte offsets

int64_t check_k(const Arg& a, int64_t k) {
    if (k % 32) value_error(a, "K (x.shape[1]) must be a multiple of 32 (the MXFP4 block), got K = " + std::to_string(k));
    if (k >= kMaxK) value_error(a, "K must be < 2^28, got " + std::to_string(k));
    return k;
}

int64_t check_act_block(const char* fn, int64_t b) {
    if (b != 32 && b != 128) value_error({fn, "act_block_size"}, "must be 32 or 128, got " + std::to_string(b));
    return b;
}

void fp4_gemm(py::handle x_, py::handle w_, py::handle s_, py::handle out_, int64_t gemv_max_m, bool act_quant,
              bool row_invariant, int64_t act_block) {
    const char* fn = "fp4_gemm";
    check_act_block(fn, act_block);
    auto x = need({fn, "x"}, x_, 2, {Kind::f32, Kind::bf16});
    auto w = need({fn, "w"}, w_, 2, {Kind::u8});
    auto s = need({fn, "w_scale"}, s_, 2, {Kind::u8});
    auto out = need({fn, "out"}, out_, 2, {Kind::f32, Kind::bf16}, true);
    const int64_t m = dim(x, 0), k = check_k({fn, "x"}, dim(x, 1)), n = dim(w, 0);
    need_shape({fn, "w"}, w, {n, k / 2}, "[N, K/2]");
    need_shape({fn, "w_scale"}, s, {n, k / 32}, "[N, K/32]");
    need_shape({fn, "out"}, out, {m, n}, "[M, N]");
    if (gemv_max_m < 0) value_error({fn, "gemv_max_m"}, "must be >= 0, got " + std::to_string(gemv_max_m));
    F32Out y(out);
    F32In xf(x);
    py::gil_scoped_release nogil;
    xf.load_gemm(act_quant, m, k, act_block);
    std::vector<Fp4Expert> ex{{xf.ptr, static_cast<const uint8_t*>(w.data()), static_cast<const uint8_t*>(s.data()),
                               y.ptr, m, n, k, n}};
    fp4_gemm_run(ex, gemv_max_m, row_invariant);
    y.finish();
}

void fp4_grouped_gemm(py::handle x_, py::handle w_, py::handle s_, py::handle off_, py::handle out_,
                      int64_t gemv_max_m, bool act_quant, bool row_invariant, int64_t act_block) {
    const char* fn = "fp4_grouped_gemm";
    check_act_block(fn, act_block);
    auto x = need({fn, "x"}, x_, 2, {Kind::f32, Kind::bf16});
    auto w = need({fn, "w"}, w_, 3, {Kind::u8});
    auto s = need({fn, "w_scale"}, s_, 3, {Kind::u8});
    auto off = need({fn, "offsets"}, off_, 1, {Kind::i32});
    auto out = need({fn, "out"}, out_, 2, {Kind::f32, Kind::bf16}, true);
    const int64_t r = dim(x, 0), k = check_k({fn, "x"}, dim(x, 1)), e = dim(w, 0), n = dim(w, 1);
    need_shape({fn, "w"}, w, {e, n, k / 2}, "[E, N, K/2]");
    need_shape({fn, "w_scale"}, s, {e, n, k / 32}, "[E, N, K/32]");
    need_shape({fn, "offsets"}, off, {e + 1}, "[E+1]");
    need_shape({fn, "out"}, out, {r, n}, "[R, N]");
    if (gemv_max_m < 0) value_error({fn, "gemv_max_m"}, "must be >= 0, got " + std::to_string(gemv_max_m));
    const int32_t* o = static_cast<const int32_t*>(off.data());
    if (o[0] != 0) value_error({fn, "offsets"}, "must start at 0, got offsets[0] = " + std::to_string(o[0]));
    for (int64_t i = 0; i < e; ++i)
        if (o[i + 1] < o[i])
            value_error({fn, "offsets"}, "must be non-decreasing, got offsets[" + std::to_string(i) + "] = " +
                                             std::to_string(o[i]) + " > offsets[" + std::to_string(i + 1) + "] = " +
                                             std::to_string(o[i + 1]));
    if (o[e] != r)
        value_error({fn, "offsets"}, "must end at R = x.shape[0] = " + std::to_string(r) + ", got offsets[E] = " +
                                         std::to_string(o[e]));
    const uint8_t* wp = static_cast<const uint8_t*>(w.data());
    const uint8_t* sp = static_cast<const uint8_t*>(s.data());
    F32Out y(out);
    F32In xf(x);
    py::gil_scoped_release nogil;
    xf.load_gemm(act_quant, r, k, act_block);
    std::vector<Fp4Expert> ex;
    for (int64_t i = 0; i < e; ++i) {
        const int64_t lo = o[i], cnt = o[i + 1] - o[i];
        if (cnt > 0)
            ex.push_back({xf.ptr + lo * k, wp + i * n * (k / 2), sp + i * n * (k / 32), y.ptr + lo * n, cnt, n, k, n});
    }
    fp4_gemm_run(ex, gemv_max_m, row_invariant);
    y.finish();
}

}  // namespace

void bind_gemm(py::module_& m) {
    m.def("fp4_gemm", &fp4_gemm, py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("out"),
          py::arg("gemv_max_m") = 8, py::arg("act_quant") = false, py::arg("row_invariant") = false,
          py::arg("act_block_size") = 128,
          "out[M, N] = x[M, K] @ dequant(w, w_scale)^T on packed MXFP4.\n\n"
          "x float32 or int16/uint16 (bf16 bits) [M, K] (K % 32 == 0), w uint8 [N, K/2] (E2M1 pairs, low nibble =\n"
          "even k), w_scale uint8 [N, K/32] (E8M0), out float32 or bf16 bits [M, N] (rounded to nearest even);\n"
          "all C-contiguous. M <= gemv_max_m takes the GEMV path\n"
          "(weights streamed once), larger M the blocked path (dequantised tiles reused across rows). act_quant:\n"
          "x goes through act_quant='fp8' first (as dsv4rt.formats.act_quant_fp8, one scale per 1 x act_block_size\n"
          "block of K: 128 V4, 32 V4.1). row_invariant: each row's result\n"
          "depends on that row alone, whatever M (the batch-invariant mode; gemv_max_m then only picks the fastest of\n"
          "two kernels with the same numerics).");
    m.def("fp4_grouped_gemm", &fp4_grouped_gemm, py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("offsets"),
          py::arg("out"), py::arg("gemv_max_m") = 8, py::arg("act_quant") = false, py::arg("row_invariant") = false,
          py::arg("act_block_size") = 128,
          "out[R, N]: rows offsets[e]:offsets[e+1] of x (float32 or bf16 bits [R, K]) times expert e of w (uint8\n"
          "[E, N, K/2]) with scales w_scale (uint8 [E, N, K/32]); offsets int32 [E+1] from 0 to R, non-decreasing;\n"
          "out float32 or bf16 bits [R, N]; act_quant, act_block_size and row_invariant as in fp4_gemm (row_invariant: a row's result\n"
          "never depends on how many rows share its expert).");
}

}  // namespace dsv4rt
