// Manifold-constrained hyper-connection glue (runtime/model/mhc.py): the Sinkhorn normalisation of the
// stream-mixing matrices and the batch-invariant hc_post, one native call each instead of dozens of tiny
// NumPy / torch steps per split. Every value is the float32 result of the same operations in the same
// order as the Python path (sums of hc terms left to right, each product and sum rounded to float32, no
// fused multiply-add), so the outputs are bit for bit those of the Python path.
#pragma GCC optimize("fp-contract=off")
#include "common.h"

namespace dsv4rt {

namespace {

// c[hc, hc] (row i = source stream): divide each column by (its sum + eps), then (iters - 1) times each row
// by (its sum + eps) and each column again.
void sinkhorn_one(float* c, int64_t hc, int64_t iters, float eps) {
    float d[64];
    auto cols = [&]() {
        for (int64_t j = 0; j < hc; ++j) {
            float s = c[j];
            for (int64_t i = 1; i < hc; ++i) s += c[i * hc + j];
            d[j] = s + eps;
        }
        for (int64_t i = 0; i < hc; ++i)
            for (int64_t j = 0; j < hc; ++j) c[i * hc + j] /= d[j];
    };
    cols();
    for (int64_t it = 1; it < iters; ++it) {
        for (int64_t i = 0; i < hc; ++i) {
            float* r = c + i * hc;
            float s = r[0];
            for (int64_t j = 1; j < hc; ++j) s += r[j];
            const float q = s + eps;
            for (int64_t j = 0; j < hc; ++j) r[j] /= q;
        }
        cols();
    }
}

void mhc_sinkhorn(const py::object& comb_, int64_t iters, float eps) {
    const char* fn = "mhc_sinkhorn";
    auto comb = need({fn, "comb"}, comb_, 3, {Kind::f32}, true);
    const int64_t t = dim(comb, 0), hc = dim(comb, 1);
    if (dim(comb, 2) != hc || hc < 1 || hc > 64)
        value_error({fn, "comb"}, "expected [T, hc, hc] with 1 <= hc <= 64, got " + shape_str(comb));
    if (iters < 1) value_error({fn, "iters"}, "expected >= 1, got " + std::to_string(iters));
    float* p = static_cast<float*>(comb.mutable_data());
    py::gil_scoped_release nogil;
    parallel_for(t, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) sinkhorn_one(p + i * hc * hc, hc, iters, eps);
    }, pick_threads(static_cast<double>(t), 256));
}

template <bool FB, bool RB>
void post_rows(const void* f_, const void* r_, const float* post, const float* comb, void* out_, int64_t t0,
               int64_t t1, int64_t hc, int64_t dim) {
    auto ld = [](const void* p, int64_t i, auto bf) -> float {
        if constexpr (decltype(bf)::value) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
        else return static_cast<const float*>(p)[i];
    };
    std::vector<float> acc(static_cast<size_t>(dim));
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t rb = t * hc * dim;
        const float* c = comb + t * hc * hc;
        for (int64_t j = 0; j < hc; ++j) {
            const float c0 = c[j];
            for (int64_t d = 0; d < dim; ++d) acc[d] = c0 * ld(r_, rb + d, std::bool_constant<RB>{});
            for (int64_t i = 1; i < hc; ++i) {
                const float ci = c[i * hc + j];
                for (int64_t d = 0; d < dim; ++d) {
                    const float term = ci * ld(r_, rb + i * dim + d, std::bool_constant<RB>{});
                    acc[d] += term;
                }
            }
            const float pj = post[t * hc + j];
            const int64_t ob = (t * hc + j) * dim;
            for (int64_t d = 0; d < dim; ++d) {
                const float pf = pj * ld(f_, t * dim + d, std::bool_constant<FB>{});
                const float o = pf + acc[d];
                if constexpr (FB) static_cast<uint16_t*>(out_)[ob + d] = f32_to_bf16(o);
                else static_cast<float*>(out_)[ob + d] = o;
            }
        }
    }
}

void mhc_post(const py::object& f_, const py::object& r_, const py::object& post_, const py::object& comb_,
              const py::object& out_) {
    const char* fn = "mhc_post";
    auto f = need({fn, "f"}, f_, 2, {Kind::f32, Kind::bf16});
    auto r = need({fn, "residual"}, r_, 3, {Kind::f32, Kind::bf16});
    auto post = need({fn, "post"}, post_, 2, {Kind::f32});
    auto comb = need({fn, "comb"}, comb_, 3, {Kind::f32});
    auto out = need({fn, "out"}, out_, 3, {kind_of(f)}, true);
    const int64_t t = dim(r, 0), hc = dim(r, 1), d = dim(r, 2);
    need_shape({fn, "f"}, f, {t, d}, "[T, dim] of the residual");
    need_shape({fn, "post"}, post, {t, hc}, "[T, hc] of the residual");
    need_shape({fn, "comb"}, comb, {t, hc, hc}, "[T, hc, hc] of the residual");
    need_shape({fn, "out"}, out, {t, hc, d}, "the residual's [T, hc, dim]");
    const bool fb = kind_of(f) == Kind::bf16, rb = kind_of(r) == Kind::bf16;
    const void* fp = f.data();
    const void* rp = r.data();
    const float* pp = static_cast<const float*>(post.data());
    const float* cp = static_cast<const float*>(comb.data());
    void* op = out.mutable_data();
    py::gil_scoped_release nogil;
    parallel_for(t, [&](int64_t b, int64_t e) {
        if (fb && rb) post_rows<true, true>(fp, rp, pp, cp, op, b, e, hc, d);
        else if (fb) post_rows<true, false>(fp, rp, pp, cp, op, b, e, hc, d);
        else if (rb) post_rows<false, true>(fp, rp, pp, cp, op, b, e, hc, d);
        else post_rows<false, false>(fp, rp, pp, cp, op, b, e, hc, d);
    }, pick_threads(static_cast<double>(t * hc * hc * d), 1 << 18));
}

}  // namespace

void bind_mhc(py::module_& m) {
    m.def("mhc_sinkhorn", &mhc_sinkhorn, py::arg("comb"), py::arg("iters"), py::arg("eps"),
          "In place on comb[T, hc, hc] float32 (C-contiguous, row i = source stream): divide every column by\n"
          "(its sum + eps), then iters - 1 times every row and every column likewise. Sums run left to right\n"
          "over the hc terms in float32; each division is one float32 division.");
    m.def("mhc_post", &mhc_post, py::arg("f"), py::arg("residual"), py::arg("post"), py::arg("comb"),
          py::arg("out"),
          "out[t, j, :] = post[t, j] * f[t, :] + sum_i comb[t, i, j] * residual[t, i, :], in float32 with the\n"
          "sum over i left to right (first term the product for i = 0), no fused multiply-add, rounded once\n"
          "to out's dtype (f's: float32, or bf16 bits rounded to nearest even). residual float32 or bf16 bits.");
}

}  // namespace dsv4rt
