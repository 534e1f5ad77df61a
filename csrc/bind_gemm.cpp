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

void check_packed(const char* fn, bool packed, int64_t n, int64_t k) {
    if (packed && !fp4_packable(n, k))
        value_error({fn, "w"}, "packed weights need N % 16 == 0 and K % 128 == 0, got N = " + std::to_string(n) +
                                   ", K = " + std::to_string(k));
}

void fp4_gemm(py::handle x_, py::handle w_, py::handle s_, py::handle out_, int64_t gemv_max_m, bool act_quant,
              bool row_invariant, int64_t act_block, bool packed) {
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
    check_packed(fn, packed, n, k);
    if (gemv_max_m < 0) value_error({fn, "gemv_max_m"}, "must be >= 0, got " + std::to_string(gemv_max_m));
    F32Out y(out);
    F32In xf(x);
    py::gil_scoped_release nogil;
    xf.load_gemm(act_quant, m, k, act_block);
    std::vector<Fp4Expert> ex{{xf.ptr, static_cast<const uint8_t*>(w.data()), static_cast<const uint8_t*>(s.data()),
                               y.ptr, m, n, k, n, packed}};
    fp4_gemm_run(ex, gemv_max_m, row_invariant);
    y.finish();
}

void fp4_grouped_gemm(py::handle x_, py::handle w_, py::handle s_, py::handle off_, py::handle out_,
                      int64_t gemv_max_m, bool act_quant, bool row_invariant, int64_t act_block, bool packed) {
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
    check_packed(fn, packed, n, k);
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
            ex.push_back({xf.ptr + lo * k, wp + i * n * (k / 2), sp + i * n * (k / 32), y.ptr + lo * n, cnt, n, k, n, packed});
    }
    fp4_gemm_run(ex, gemv_max_m, row_invariant);
    y.finish();
}

}  // namespace

void bind_gemm(py::module_& m) {
    m.def("fp4_gemm", &fp4_gemm, py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("out"),
          py::arg("gemv_max_m") = 8, py::arg("act_quant") = false, py::arg("row_invariant") = false,
          py::arg("act_block_size") = 128, py::arg("packed") = false,
          "out[M, N] = x[M, K] @ dequant(w, w_scale)^T on packed MXFP4.\n\n"
          "x float32 or int16/uint16 (bf16 bits) [M, K] (K % 32 == 0), w uint8 [N, K/2] (E2M1 pairs, low nibble =\n"
          "even k), w_scale uint8 [N, K/32] (E8M0), out float32 or bf16 bits [M, N] (rounded to nearest even);\n"
          "all C-contiguous. M <= gemv_max_m takes the GEMV path\n"
          "(weights streamed once), larger M the blocked path (dequantised tiles reused across rows). act_quant:\n"
          "x goes through act_quant='fp8' first (as dsv4rt.formats.act_quant_fp8, one scale per 1 x act_block_size\n"
          "block of K: 128 V4, 32 V4.1). row_invariant: each row's result\n"
          "depends on that row alone, whatever M (the batch-invariant mode; gemv_max_m then only picks the fastest of\n"
          "two kernels with the same numerics). packed: w is in fp4_pack's layout (the row-invariant numerics then).");
    m.def("fp4_grouped_gemm", &fp4_grouped_gemm, py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("offsets"),
          py::arg("out"), py::arg("gemv_max_m") = 8, py::arg("act_quant") = false, py::arg("row_invariant") = false,
          py::arg("act_block_size") = 128, py::arg("packed") = false,
          "out[R, N]: rows offsets[e]:offsets[e+1] of x (float32 or bf16 bits [R, K]) times expert e of w (uint8\n"
          "[E, N, K/2]) with scales w_scale (uint8 [E, N, K/32]); offsets int32 [E+1] from 0 to R, non-decreasing;\n"
          "out float32 or bf16 bits [R, N]; act_quant, act_block_size and row_invariant as in fp4_gemm (row_invariant: a row's result\n"
          "never depends on how many rows share its expert); packed as in fp4_gemm.");
    m.def("fp4_packable", &fp4_packable, py::arg("n"), py::arg("k"),
          "True when an [N, K/2] MXFP4 weight can take the packed layout (N % 16 == 0, K % 128 == 0).");
    m.def("fp4_packed_fast", &fp4_packed_fast,
          "True where the packed layout's kernels run (AVX512-BF16 + AVX512-VBMI, allowed by the ISA cap).");
    m.def("fp4_pack", [](py::handle w_, int64_t k, bool pack) {
              auto w = need({"fp4_pack", "w"}, w_, 1, {Kind::u8}, true);
              const int64_t bytes = static_cast<int64_t>(w.size()), rows = k > 0 ? bytes / (k / 2) : 0;
              if (k <= 0 || k % 128 || bytes % (k / 2) || rows % 16)
                  value_error({"fp4_pack", "w"}, "must hold rows of K/2 bytes, a multiple of 16 rows, K % 128 == 0; got " +
                                                     std::to_string(bytes) + " bytes, K = " + std::to_string(k));
              uint8_t* p = static_cast<uint8_t*>(w.mutable_data());
              if (reinterpret_cast<uintptr_t>(p) % 4) value_error({"fp4_pack", "w"}, "must be 4-byte aligned");
              py::gil_scoped_release nogil;
              if (pack)
                  fp4_pack(p, rows, k);
              else
                  fp4_unpack(p, rows, k);
          }, py::arg("w"), py::arg("k"), py::arg("pack") = true,
          "Permute MXFP4 weight bytes (uint8 [rows * K/2], C-contiguous, 4-byte aligned, rows of K/2 bytes) in place into the packed layout of\n"
          "the CPU kernels (pack=True) or back (pack=False); every 16 rows are one group.");
}

}  // namespace dsv4rt
