// MoE data movement: moe_dispatch (stable counting sort of token copies by expert) and moe_combine
// (un-permute and weighted sum in float32). Both move whole rows; threads split the rows.
#include "common.h"
#include "vec.h"

namespace dsv4rt {
namespace {

void moe_dispatch(py::handle x_, py::handle ids_, int64_t num_experts, py::handle out_, py::handle off_,
                  py::handle src_) {
    const char* fn = "moe_dispatch";
    auto x = need({fn, "x"}, x_, 2, {Kind::any});
    auto ids = need({fn, "ids"}, ids_, 2, {Kind::i32});
    const int64_t t = dim(x, 0), h = dim(x, 1), k = dim(ids, 1);
    need_shape({fn, "ids"}, ids, {t, k}, "[T, topk]");
    if (num_experts < 1) value_error({fn, "num_experts"}, "must be >= 1, got " + std::to_string(num_experts));
    auto out = need({fn, "x_sorted"}, out_, 2, {Kind::any}, true);
    need_shape({fn, "x_sorted"}, out, {t * k, h}, "[T*topk, H]");
    if (out.itemsize() != x.itemsize())
        type_error({fn, "x_sorted"}, "must have x's element size (" + std::to_string(x.itemsize()) + " bytes), got " +
                                         dtype_str(out));
    auto off = need({fn, "offsets"}, off_, 1, {Kind::i32}, true);
    need_shape({fn, "offsets"}, off, {num_experts + 1}, "[E+1]");
    auto src = need({fn, "src"}, src_, 1, {Kind::i32}, true);
    need_shape({fn, "src"}, src, {t * k}, "[T*topk]");
    const int32_t* ip = static_cast<const int32_t*>(ids.data());
    for (int64_t i = 0; i < t * k; ++i)
        if (ip[i] < 0 || ip[i] >= num_experts)
            value_error({fn, "ids"}, "entries must be in [0, num_experts = " + std::to_string(num_experts) + "), got " +
                                         std::to_string(ip[i]) + " at flat index " + std::to_string(i));
    const int64_t row_bytes = h * x.itemsize();
    const char* xp = static_cast<const char*>(x.data());
    char* op = static_cast<char*>(out.mutable_data());
    int32_t* offs = static_cast<int32_t*>(off.mutable_data());
    int32_t* sp = static_cast<int32_t*>(src.mutable_data());
    py::gil_scoped_release nogil;
    std::vector<int64_t> cursor(static_cast<size_t>(num_experts) + 1, 0);
    for (int64_t i = 0; i < t * k; ++i) ++cursor[ip[i] + 1];
    for (int64_t e = 0; e < num_experts; ++e) cursor[e + 1] += cursor[e];
    for (int64_t e = 0; e <= num_experts; ++e) offs[e] = static_cast<int32_t>(cursor[e]);
    for (int64_t i = 0; i < t * k; ++i) sp[cursor[ip[i]]++] = static_cast<int32_t>(i);   // stable in (t, j)
    parallel_for(t * k, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) std::memcpy(op + r * row_bytes, xp + (sp[r] / k) * row_bytes, row_bytes);
    }, pick_threads(static_cast<double>(t * k) * row_bytes, 1 << 20));
}

// y[t] = sum_j w[t, j] * rows[t*k + j] (rows given through inv), float32
DSV4RT_CLONES void combine_rows(const void* y, bool bf16, const int64_t* inv, const float* w, int64_t k, int64_t h,
                                int64_t t0, int64_t t1, float* out) {
    for (int64_t t = t0; t < t1; ++t) {
        float* o = out + t * h;
        for (int64_t j = 0; j < k; ++j) {
            const float wj = w ? w[t * k + j] : 1.0f;
            const int64_t r = inv[t * k + j];
            if (bf16) {
                const uint16_t* yr = static_cast<const uint16_t*>(y) + r * h;
                if (j == 0)
                    for (int64_t i = 0; i < h; ++i) o[i] = wj * bf16_to_f32(yr[i]);
                else
                    for (int64_t i = 0; i < h; ++i) o[i] += wj * bf16_to_f32(yr[i]);
            } else {
                const float* yr = static_cast<const float*>(y) + r * h;
                if (j == 0)
                    for (int64_t i = 0; i < h; ++i) o[i] = wj * yr[i];
                else
                    for (int64_t i = 0; i < h; ++i) o[i] += wj * yr[i];
            }
        }
        if (k == 0) std::fill(o, o + h, 0.0f);
    }
}

void moe_combine(py::handle y_, py::handle src_, py::handle w_, int64_t topk, py::handle out_) {
    const char* fn = "moe_combine";
    auto y = need({fn, "y_sorted"}, y_, 2, {Kind::f32, Kind::bf16});
    auto src = need({fn, "src"}, src_, 1, {Kind::i32});
    const int64_t r = dim(y, 0), h = dim(y, 1);
    need_shape({fn, "src"}, src, {r}, "[T*topk]");
    if (topk < 1) value_error({fn, "topk"}, "must be >= 1, got " + std::to_string(topk));
    if (r % topk) value_error({fn, "y_sorted"}, "rows must be a multiple of topk = " + std::to_string(topk));
    const int64_t t = r / topk;
    py::array w;
    const float* wp = nullptr;
    if (!is_none(w_)) {
        w = need({fn, "weights"}, w_, 2, {Kind::f32});
        need_shape({fn, "weights"}, w, {t, topk}, "[T, topk]");
        wp = static_cast<const float*>(w.data());
    }
    auto out = need({fn, "out"}, out_, 2, {Kind::f32, Kind::bf16}, true);
    need_shape({fn, "out"}, out, {t, h}, "[T, H]");
    const int32_t* sp = static_cast<const int32_t*>(src.data());
    std::vector<int64_t> inv(static_cast<size_t>(r), -1);
    for (int64_t i = 0; i < r; ++i) {
        if (sp[i] < 0 || sp[i] >= r)
            value_error({fn, "src"}, "entries must be in [0, " + std::to_string(r) + "), got " + std::to_string(sp[i]) +
                                         " at index " + std::to_string(i));
        if (inv[sp[i]] != -1)
            value_error({fn, "src"}, "must be a permutation, got " + std::to_string(sp[i]) + " twice");
        inv[sp[i]] = i;
    }
    const bool bf16 = kind_of(y) == Kind::bf16;
    const void* yp = y.data();
    F32Out of(out);
    float* op = of.ptr;
    py::gil_scoped_release nogil;
    parallel_for(t, [&](int64_t lo, int64_t hi) { combine_rows(yp, bf16, inv.data(), wp, topk, h, lo, hi, op); },
                 pick_threads(static_cast<double>(r) * h * (bf16 ? 2 : 4), 1 << 20));
    of.finish();
}

}  // namespace

void bind_moe(py::module_& m) {
    m.def("moe_dispatch", &moe_dispatch, py::arg("x"), py::arg("ids"), py::arg("num_experts"), py::arg("x_sorted"),
          py::arg("offsets"), py::arg("src"),
          "Stable counting sort of the (token, slot) pairs by expert: writes x_sorted [T*topk, H] (x's rows,\n"
          "moved as bytes: any dtype), offsets int32 [E+1] and src int32 [T*topk] (src[r] = t*topk + j).\n"
          "ids int32 [T, topk] in [0, num_experts).");
    m.def("moe_combine", &moe_combine, py::arg("y_sorted"), py::arg("src"), py::arg("weights"), py::arg("topk"),
          py::arg("out"),
          "out[t] = sum_j weights[t, j] * y_sorted[r] with src[r] = t*topk + j, summed in float32 in slot order.\n"
          "y_sorted [T*topk, H] float32 or int16/uint16 (bf16 bits); src int32 permutation; weights float32\n"
          "[T, topk] or None (unweighted); out float32 or bf16 bits [T, H] (rounded to nearest even).");
}

}  // namespace dsv4rt
