// MoE router: moe_route (spec 5.1, score_func "sqrtsoftplus"; V4.1's per-token bias and weight_eps).
//
// One task = a slice of tokens. Per token: the selection score of every expert (s + b with
// s = sqrt(softplus(logit)) in float32 and b = bias_alt for the tokens use_alt marks, else bias; or the
// logit itself without a bias: the same order as s, free of the ties s has where it underflows), the top-k
// experts by it in descending order (ties to the lower expert id), or the given hash ids; then the weights
// s / (sum s + weight_eps) * route_scale over the k chosen, in double, from log s (a softmax of log s times
// S / (S + eps) from log S) where s underflows, so they stay finite there.
#include <cmath>
#include <limits>

#include "common.h"
#include "vec.h"

namespace dsv4rt {
namespace {

constexpr float kSoftplusThreshold = 20.0f;   // torch's softplus is linear above it
constexpr int64_t kInsertMax = 32;            // top-k up to this k by insertion, larger k by partial_sort

// a selection score as a sort key: NaN (refused before the kernel, but never trusted) ranks last
inline float key_of(float v) { return v == v ? v : -std::numeric_limits<float>::infinity(); }

// log(w) for 16 w in [1, 2]: w above sqrt(2) halved (+ ln 2), then log(1 + f) for f in [-0.29, 0.42] by
// the Cephes logf polynomial (about 1 ulp)
DSV4RT_INLINE v16f log_1to2(v16f w) {
    const auto big = w > 1.41421356f;
    const v16f f = (big ? w * 0.5f : w) - 1.0f;
    const v16f f2 = f * f;
    v16f p = splat(7.0376836292e-2f);
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    const v16f l = f + (p * f * f2 - 0.5f * f2);
    return big ? l + 0.693147180559945309f : l;
}

// softplus(z) of 16 logits, z above 20, else max(z, 0) + log1p(exp(-|z|)) (= log1p(exp(z))), with
// log1p(t) = log(1 + t) * t / ((1 + t) - 1), exact to rounding (t itself where 1 + t rounds to 1);
// exp(-|z|) flushes to 0 below -87 (a softplus under 1e-38, beside the bias or the other experts)
DSV4RT_INLINE v16f softplus16(v16f z) {
    const v16f a = z < 0.0f ? -z : z == z ? z : v16f{};      // |z| (NaN computed as 0, restored below)
    const v16f t = exp_neg(-a);
    const v16f w = 1.0f + t;
    const v16f wm1 = w - 1.0f;
    const v16f l1p = wm1 == 0.0f ? t : log_1to2(w) * (t / (wm1 == 0.0f ? splat(1.0f) : wm1));
    const v16f sp = (z > 0.0f ? z : v16f{}) + l1p;
    return z > kSoftplusThreshold || z != z ? z : sp;
}

// key[0:e] = the selection scores of one token: sqrt(softplus(z)) + bias (NaN ranked last)
DSV4RT_CLONES void score_row(const float* z, const float* bias, int64_t e, float* key) {
    int64_t x = 0;
    for (; x + 16 <= e; x += 16) store16(key + x, softplus16(load16(z + x)));
    for (; x < e; ++x) key[x] = z[x] > kSoftplusThreshold ? z[x] : std::log1p(std::exp(z[x]));
    for (x = 0; x < e; ++x) key[x] = key_of(std::sqrt(key[x]) + bias[x]);
}

// log(softplus(z)) in double: log(z) above 20, z below -700 (log1p(exp(z)) = exp(z) to within exp(z)/2,
// and exp(z) would approach the double underflow)
inline double log_softplus(double z) {
    if (z > kSoftplusThreshold) return std::log(z);
    if (z < -700.0) return z;
    return std::log(std::log1p(std::exp(z)));
}

// whether any of the 16 keys at p exceeds thr
DSV4RT_INLINE bool any_above(const float* p, float thr) {
    const v16i gt = load16(p) > thr;
    uint64_t lanes[8];
    std::memcpy(lanes, &gt, sizeof(lanes));
    return (lanes[0] | lanes[1] | lanes[2] | lanes[3] | lanes[4] | lanes[5] | lanes[6] | lanes[7]) != 0;
}

// ids[0:k] = the k largest of key[0:e] in descending order, ties to the lower index (k <= kInsertMax):
// insertion into a sorted list of k, skipping blocks of 16 keys none of which beats the k-th so far
DSV4RT_CLONES void topk_insert(const float* key, int64_t e, int64_t k, int32_t* ids, float* best) {
    int64_t n = 0;
    for (int64_t x0 = 0; x0 < e; x0 += 16) {
        const int64_t x1 = std::min(e, x0 + 16);
        if (n == k && x1 - x0 == 16 && !any_above(key + x0, best[k - 1])) continue;
        for (int64_t x = x0; x < x1; ++x) {
            const float v = key[x];
            if (n == k && !(v > best[k - 1])) continue;
            int64_t p = n < k ? n++ : k - 1;
            for (; p > 0 && v > best[p - 1]; --p) {
                best[p] = best[p - 1];
                ids[p] = ids[p - 1];
            }
            best[p] = v;
            ids[p] = static_cast<int32_t>(x);
        }
    }
}

// the same for any k: partial_sort of the expert indices
void topk_sort(const float* key, int64_t e, int64_t k, int32_t* ids, std::vector<int32_t>& order) {
    order.resize(static_cast<size_t>(e));
    for (int64_t x = 0; x < e; ++x) order[x] = static_cast<int32_t>(x);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [key](int32_t i, int32_t j) { return key[i] > key[j] || (key[i] == key[j] && i < j); });
    std::copy(order.begin(), order.begin() + k, ids);
}

// w[0:k] = s[ids] / (sum s[ids] + eps) * scale for one token, as a softmax of log s = log(softplus(z)) / 2
// in double times S / (S + eps) = 1 / (1 + exp(log eps - log S)): finite however far s underflows
void weights_log(const float* z, const int32_t* ids, int64_t k, double scale, double eps, float* w, double* ls) {
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < k; ++j) {
        ls[j] = 0.5 * log_softplus(static_cast<double>(z[ids[j]]));
        mx = std::max(mx, ls[j]);
    }
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) {
        ls[j] = std::exp(ls[j] - mx);
        sum += ls[j];
    }
    if (eps > 0.0) scale /= 1.0 + std::exp(std::log(eps) - mx - std::log(sum));
    for (int64_t j = 0; j < k; ++j) w[j] = static_cast<float>(ls[j] / sum * scale);
}

// The same, 16 chosen logits at a time through softplus16 (a few ulp), s and the sum in double; only
// when every chosen logit is >= -80, where softplus(z) is a normal float32 (else weights_log).
DSV4RT_CLONES void route_weights(const float* z, const int32_t* ids, int64_t k, double scale, double eps, float* w,
                                 double* ls) {
    float zj[16], sp[16];
    for (int64_t j = 0; j < k; ++j)
        if (!(z[ids[j]] >= -80.0f)) return weights_log(z, ids, k, scale, eps, w, ls);
    double sum = 0.0;
    for (int64_t j0 = 0; j0 < k; j0 += 16) {
        const int64_t nj = std::min<int64_t>(16, k - j0);
        for (int64_t j = 0; j < 16; ++j) zj[j] = j < nj ? z[ids[j0 + j]] : 0.0f;
        store16(sp, softplus16(load16(zj)));
        for (int64_t j = 0; j < nj; ++j) {
            ls[j0 + j] = std::sqrt(static_cast<double>(sp[j]));
            sum += ls[j0 + j];
        }
    }
    const double f = scale / (sum + eps);
    for (int64_t j = 0; j < k; ++j) w[j] = static_cast<float>(ls[j] * f);
}

struct RouteArgs {
    const float* logits;   // [T, E]
    const float* bias;     // [E] or null
    const float* bias_alt; // [E] or null: the bias of the tokens use_alt marks
    const bool* use_alt;   // [T] or null
    const void* hash;      // [T, k] int32 / int64, or null
    bool hash64;
    int64_t t, e, k;
    double scale, eps;
    int32_t* ids;          // [T, k]
    float* w;              // [T, k]
};

// tokens [t0, t1): ids and weights
void route_rows(const RouteArgs& a, int64_t t0, int64_t t1) {
    thread_local std::vector<float> key, best;
    thread_local std::vector<double> ls;
    thread_local std::vector<int32_t> order;
    key.resize(static_cast<size_t>(a.e));
    best.resize(static_cast<size_t>(a.k));
    ls.resize(static_cast<size_t>(a.k));
    for (int64_t t = t0; t < t1; ++t) {
        const float* z = a.logits + t * a.e;
        int32_t* ids = a.ids + t * a.k;
        if (a.hash) {
            for (int64_t j = 0; j < a.k; ++j)
                ids[j] = static_cast<int32_t>(a.hash64 ? static_cast<const int64_t*>(a.hash)[t * a.k + j]
                                                       : static_cast<const int32_t*>(a.hash)[t * a.k + j]);
        } else {
            if (a.bias)
                score_row(z, a.use_alt && a.use_alt[t] ? a.bias_alt : a.bias, a.e, key.data());
            else
                for (int64_t x = 0; x < a.e; ++x) key[x] = key_of(z[x]);
            if (a.k <= kInsertMax) topk_insert(key.data(), a.e, a.k, ids, best.data());
            else topk_sort(key.data(), a.e, a.k, ids, order);
        }
        route_weights(z, ids, a.k, a.scale, a.eps, a.w + t * a.k, ls.data());
    }
}

void moe_route(py::handle logits_, py::handle bias_, int64_t topk, double route_scale, py::handle hash_ids_,
               py::handle ids_, py::handle weights_, py::handle bias_alt_, py::handle use_alt_, double weight_eps) {
    const char* fn = "moe_route";
    auto logits = need({fn, "logits"}, logits_, 2, {Kind::f32});
    const int64_t t = dim(logits, 0), e = dim(logits, 1);
    if (topk < 1 || topk > e)
        value_error({fn, "topk"}, "must be in [1, E = " + std::to_string(e) + "], got " + std::to_string(topk));
    if (!(route_scale > 0.0) || !std::isfinite(route_scale))
        value_error({fn, "route_scale"}, "must be a finite positive number");
    if (!(weight_eps >= 0.0) || !std::isfinite(weight_eps))
        value_error({fn, "weight_eps"}, "must be a finite number >= 0");
    RouteArgs a{};
    py::array bias, hash, bias_alt, use_alt;
    if (!is_none(bias_)) {
        bias = need({fn, "bias"}, bias_, 1, {Kind::f32});
        need_shape({fn, "bias"}, bias, {e}, "[E]");
        a.bias = static_cast<const float*>(bias.data());
    }
    if (is_none(bias_alt_) != is_none(use_alt_))
        value_error({fn, is_none(bias_alt_) ? "bias_alt" : "use_alt"}, "bias_alt and use_alt come together");
    if (!is_none(bias_alt_)) {
        if (!a.bias) value_error({fn, "bias"}, "must be given with bias_alt / use_alt (the text-token bias)");
        bias_alt = need({fn, "bias_alt"}, bias_alt_, 1, {Kind::f32});
        need_shape({fn, "bias_alt"}, bias_alt, {e}, "[E]");
        use_alt = need({fn, "use_alt"}, use_alt_, 1, {Kind::any});
        if (use_alt.dtype().kind() != 'b')
            type_error({fn, "use_alt"}, "must have dtype bool, got " + dtype_str(use_alt));
        need_shape({fn, "use_alt"}, use_alt, {t}, "[T]");
        a.bias_alt = static_cast<const float*>(bias_alt.data());
        a.use_alt = static_cast<const bool*>(use_alt.data());
    }
    if (!is_none(hash_ids_)) {
        if (a.bias) value_error({fn, "bias"}, "must be None when hash_ids is given (hash layers select by token id)");
        hash = need({fn, "hash_ids"}, hash_ids_, 2, {Kind::any});
        if (hash.dtype().kind() != 'i' || (hash.itemsize() != 4 && hash.itemsize() != 8))
            type_error({fn, "hash_ids"}, "must have dtype int32 or int64, got " + dtype_str(hash));
        need_shape({fn, "hash_ids"}, hash, {t, topk}, "[T, topk]");
        a.hash64 = hash.itemsize() == 8;
        a.hash = hash.data();
        for (int64_t i = 0; i < t * topk; ++i) {
            const int64_t v = a.hash64 ? static_cast<const int64_t*>(a.hash)[i] : static_cast<const int32_t*>(a.hash)[i];
            if (v < 0 || v >= e)
                value_error({fn, "hash_ids"}, "entries must be in [0, E = " + std::to_string(e) + "), got " +
                                                  std::to_string(v) + " at flat index " + std::to_string(i));
        }
    }
    auto ids = need({fn, "ids"}, ids_, 2, {Kind::i32}, true);
    need_shape({fn, "ids"}, ids, {t, topk}, "[T, topk]");
    auto w = need({fn, "weights"}, weights_, 2, {Kind::f32}, true);
    need_shape({fn, "weights"}, w, {t, topk}, "[T, topk]");
    a.logits = static_cast<const float*>(logits.data());
    a.t = t, a.e = e, a.k = topk, a.scale = route_scale, a.eps = weight_eps;
    a.ids = static_cast<int32_t*>(ids.mutable_data());
    a.w = static_cast<float*>(w.mutable_data());
    py::gil_scoped_release nogil;
    parallel_for(t, [&](int64_t lo, int64_t hi) { route_rows(a, lo, hi); },
                 pick_threads(static_cast<double>(t) * e, 1 << 14));
}

}  // namespace

void bind_route(py::module_& m) {
    m.def("moe_route", &moe_route, py::arg("logits"), py::arg("bias"), py::arg("topk"), py::arg("route_scale"),
          py::arg("hash_ids"), py::arg("ids"), py::arg("weights"), py::arg("bias_alt") = py::none(),
          py::arg("use_alt") = py::none(), py::arg("weight_eps") = 0.0,
          "The V4 / V4.1 sqrt-softplus router: s = sqrt(softplus(logits)) (linear above 20), ids = the top-k of\n"
          "s + b (b = bias_alt for the tokens use_alt marks, else bias; of the logits when bias is None) ordered\n"
          "by descending score, or hash_ids (int32 / int64 [T, topk] in [0, E); bias must then be None);\n"
          "weights = s[ids] / (sum s[ids] + weight_eps) * route_scale (finite where s underflows). logits\n"
          "float32 [T, E], bias / bias_alt float32 [E] or None, use_alt bool [T] or None (with bias_alt),\n"
          "1 <= topk <= E, route_scale > 0, weight_eps >= 0; writes ids int32 and weights float32 [T, topk].");
}

}  // namespace dsv4rt
