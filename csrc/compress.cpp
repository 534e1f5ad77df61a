// Gated softmax pooling of token blocks: kv_compress (spec 3.2 overlap / 4.1 no overlap; V4.1 CSA2: ratio 2
// without ape; V4.1 ratio 1 without a gate: the entries are kv itself, widened to float32).
//
// One task = one output entry (b, j). Its softmax runs, separately for every channel, over a list of
// token rows (pointers to gate, kv and ape rows of d channels; no ape row when ape is None): pass 1 takes
// the channel max of gate + ape over the rows, pass 2 adds exp(logit - max) to the denominator and
// exp(...) * kv to the numerator (accumulated in the output row), then out = num / den, all in float32. The
// arithmetic is the plain IEEE one of the max-subtracted softmax, so non-finite inputs give what the contract
// says: a NaN or +inf logit, a NaN value, or logits all -inf make the channel NaN (NaN - max, inf - inf,
// -inf - -inf); an infinite value with a nonzero weight makes it +-inf.
#include <cmath>
#include <limits>

#include "common.h"
#include "vec.h"

namespace dsv4rt {
namespace {

// exp(x) for x <= 0, x = -inf (0) and NaN (NaN): exp_neg's reduction and polynomial, with the power of
// two applied as two factors so results in the float32 subnormal range (down to x = -104) are kept
// rather than flushed to 0 below x = -87 (a tiny weight times an infinite value stays infinite).
DSV4RT_INLINE v16f exp_pool(v16f x) {
    const auto in_range = x >= -104.0f;                      // false for NaN and x < -104
    const v16f xc = in_range ? x : v16f{};
    v16i ni;
    const v16f p = exp_reduced(xc, ni);
    const v16i n1 = ni >> 1, n2 = ni - n1;                   // each in [-75, 0]: 2^n1, 2^n2 are normal
    const v16f s1 = pow2i(n1), s2 = pow2i(n2);
    const v16f out = in_range ? (p * s1) * s2 : v16f{};
    return x == x ? out : x;                                 // NaN stays NaN
}

// 16 values at p[i] (float32, or bf16 bits when BF) as float32
template <bool BF>
DSV4RT_INLINE v16f ld16(const void* p, int64_t i) {
    if (BF) return load16_bf16(static_cast<const uint16_t*>(p) + i);
    return load16(static_cast<const float*>(p) + i);
}

// one value at p[i] as float32
template <bool BF>
DSV4RT_INLINE float ld1(const void* p, int64_t i) {
    if (BF) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    return static_cast<const float*>(p)[i];
}

// One token row of a softmax: d channels of gate and kv (float32 or bf16 bits) and of ape (float32, or
// nullptr for no position bias).
struct Row {
    const void* g;
    const void* v;
    const float* ape;
    bool g_bf16, v_bf16;
};

// the logits g[c] (+ ape[c] when AP) of 16 channels / of one channel
template <bool GB, bool AP>
DSV4RT_INLINE v16f logit16(const Row& r, int64_t c) {
    if (AP) return ld16<GB>(r.g, c) + load16(r.ape + c);
    return ld16<GB>(r.g, c);
}
template <bool GB, bool AP>
DSV4RT_INLINE float logit1(const Row& r, int64_t c) {
    if (AP) return ld1<GB>(r.g, c) + r.ape[c];
    return ld1<GB>(r.g, c);
}

// pass 1: m[c] = max(m[c], logit[c])
template <bool GB, bool AP>
DSV4RT_INLINE void max_row(const Row& r, int64_t d, float* m) {
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) store16(m + c, vmax(load16(m + c), logit16<GB, AP>(r, c)));
    for (; c < d; ++c) m[c] = std::max(m[c], logit1<GB, AP>(r, c));
}

// pass 2: e = exp(logit[c] - m[c]); den[c] += e; num[c] += e * v[c]
template <bool GB, bool VB, bool AP>
DSV4RT_INLINE void acc_row(const Row& r, int64_t d, const float* m, float* den, float* num) {
    int64_t c = 0;
    for (; c + 16 <= d; c += 16) {
        const v16f e = exp_pool(logit16<GB, AP>(r, c) - load16(m + c));
        store16(den + c, load16(den + c) + e);
        store16(num + c, load16(num + c) + e * ld16<VB>(r.v, c));
    }
    for (; c < d; ++c) {
        const float e = std::exp(logit1<GB, AP>(r, c) - m[c]);
        den[c] += e;
        num[c] += e * ld1<VB>(r.v, c);
    }
}

template <bool AP>
DSV4RT_INLINE void max_any(const Row& r, int64_t d, float* m) {
    if (r.g_bf16) max_row<true, AP>(r, d, m);
    else max_row<false, AP>(r, d, m);
}

template <bool AP>
DSV4RT_INLINE void acc_any(const Row& r, int64_t d, const float* m, float* den, float* num) {
    if (r.g_bf16) {
        if (r.v_bf16) acc_row<true, true, AP>(r, d, m, den, num);
        else acc_row<true, false, AP>(r, d, m, den, num);
    } else {
        if (r.v_bf16) acc_row<false, true, AP>(r, d, m, den, num);
        else acc_row<false, false, AP>(r, d, m, den, num);
    }
}

// out[0:d] = per-channel softmax pooling over rows[0:n]; m, den: scratch of d floats
DSV4RT_CLONES void pool_entry(const Row* rows, int64_t n, int64_t d, float* m, float* den, float* out) {
    std::fill(m, m + d, -std::numeric_limits<float>::infinity());
    std::fill(den, den + d, 0.0f);
    std::fill(out, out + d, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
        if (rows[i].ape) max_any<true>(rows[i], d, m);
        else max_any<false>(rows[i], d, m);
    }
    for (int64_t i = 0; i < n; ++i) {
        if (rows[i].ape) acc_any<true>(rows[i], d, m, den, out);
        else acc_any<false>(rows[i], d, m, den, out);
    }
    for (int64_t c = 0; c < d; ++c) out[c] /= den[c];
}

// out[0:d] = the d channels at v (float32 or bf16 bits) as float32: ratio 1 without a gate
void copy_entry(const void* v, bool bf16, int64_t d, float* out) {
    if (bf16) {
        const uint16_t* p = static_cast<const uint16_t*>(v);
        for (int64_t c = 0; c < d; ++c) out[c] = bf16_to_f32(p[c]);
    } else {
        const float* p = static_cast<const float*>(v);
        std::copy(p, p + d, out);
    }
}

// A [B, T, C] float32 / bf16-bits array: base pointer, element size, row length.
struct Src {
    const char* p = nullptr;
    bool bf16 = false;
    int64_t t = 0, c = 0;
    // channel `ch` of token `tok` of batch row b
    const void* at(int64_t b, int64_t tok, int64_t ch) const { return p + ((b * t + tok) * c + ch) * (bf16 ? 2 : 4); }
};

struct CompressArgs {
    Src kv, gate, prev_kv, prev_gate;   // gate.p == nullptr: no gate (ratio 1); prev_*: [B, ratio, C] or nullptr
    const float* ape;                  // [ratio, C], nullptr for no position bias
    int64_t b, nb, ratio, c, d;
    bool overlap;
    float* out;                        // [B, nb, d]
};

// The token rows of entry (b, j) (ratio of them, 2 * ratio with overlap), previous block first.
void entry_rows(const CompressArgs& a, int64_t b, int64_t j, std::vector<Row>& rows) {
    rows.clear();
    if (a.overlap) {   // previous block, first-half channels: block j - 1, prev_*, or none (logit -inf)
        const bool from_prev = j == 0;
        if (!from_prev || a.prev_kv.p) {
            const Src& g = from_prev ? a.prev_gate : a.gate;
            const Src& v = from_prev ? a.prev_kv : a.kv;
            const int64_t t0 = from_prev ? 0 : (j - 1) * a.ratio;
            for (int64_t i = 0; i < a.ratio; ++i)
                rows.push_back({g.at(b, t0 + i, 0), v.at(b, t0 + i, 0), a.ape ? a.ape + i * a.c : nullptr, g.bf16,
                                v.bf16});
        }
    }
    const int64_t ch = a.overlap ? a.d : 0;   // own block: second-half channels with overlap, all without
    for (int64_t i = 0; i < a.ratio; ++i) {
        const int64_t tok = j * a.ratio + i;
        rows.push_back({a.gate.at(b, tok, ch), a.kv.at(b, tok, ch), a.ape ? a.ape + i * a.c + ch : nullptr,
                        a.gate.bf16, a.kv.bf16});
    }
}

void compress_run(const CompressArgs& a) {
    const int64_t entries = a.b * a.nb;
    if (entries == 0 || a.d == 0) return;   // nothing to write
    const double work = static_cast<double>(entries) * a.ratio * a.c;
    if (!a.gate.p) {   // ratio 1 without a gate: entry (b, j) is token j's kv row
        parallel_for(entries, [&](int64_t lo, int64_t hi) {
            for (int64_t e = lo; e < hi; ++e)
                copy_entry(a.kv.at(e / a.nb, e % a.nb, 0), a.kv.bf16, a.d, a.out + e * a.d);
        }, pick_threads(work, 1 << 18));
        return;
    }
    parallel_for(entries, [&](int64_t lo, int64_t hi) {
        thread_local std::vector<Row> rows;
        thread_local std::vector<float> scratch;
        scratch.resize(static_cast<size_t>(2 * a.d));
        for (int64_t e = lo; e < hi; ++e) {
            const int64_t b = e / a.nb, j = e % a.nb;
            entry_rows(a, b, j, rows);
            pool_entry(rows.data(), static_cast<int64_t>(rows.size()), a.d, scratch.data(), scratch.data() + a.d,
                       a.out + e * a.d);
        }
    }, pick_threads(work, 1 << 16));
}

// a [B, T, C] activation (float32 or bf16 bits) of the expected shape, as a Src
Src source(const char* fn, const char* name, const py::handle& obj, int64_t b, int64_t t, int64_t c, const char* meaning,
           py::array& keep) {
    keep = need({fn, name}, obj, 3, {Kind::f32, Kind::bf16});
    need_shape({fn, name}, keep, {b, t, c}, meaning);
    Src s;
    s.p = static_cast<const char*>(keep.data());
    s.bf16 = kind_of(keep) == Kind::bf16;
    s.t = t, s.c = c;
    return s;
}

void kv_compress(py::handle kv_, py::handle gate_, py::handle ape_, int64_t ratio, bool overlap, py::handle prev_kv_,
                 py::handle prev_gate_, py::handle out_) {
    const char* fn = "kv_compress";
    auto kv0 = need({fn, "kv"}, kv_, 3, {Kind::f32, Kind::bf16});
    const int64_t b = dim(kv0, 0), s = dim(kv0, 1), c = dim(kv0, 2);
    if (ratio < 1) value_error({fn, "ratio"}, "must be >= 1, got " + std::to_string(ratio));
    if (s % ratio) value_error({fn, "kv"}, "S = " + std::to_string(s) + " must be a multiple of ratio = " + std::to_string(ratio));
    if (overlap && c % 2) value_error({fn, "kv"}, "C = " + std::to_string(c) + " must be even (C = 2d) with overlap");
    CompressArgs a{};
    py::array kv, gate, pkv, pgate, ape;
    a.kv = source(fn, "kv", kv_, b, s, c, "[B, S, C]", kv);
    if (is_none(gate_)) {   // ratio 1 without a gate (V4.1): nothing to pool, so no ape and no overlap
        if (ratio != 1) value_error({fn, "gate"}, "may be None only with ratio 1, got ratio " + std::to_string(ratio));
        if (overlap) value_error({fn, "overlap"}, "must be false when gate is None");
        if (!is_none(ape_)) value_error({fn, "ape"}, "must be None when gate is None");
    } else {
        a.gate = source(fn, "gate", gate_, b, s, c, "[B, S, C] like kv", gate);
    }
    if (!is_none(ape_)) {
        ape = need({fn, "ape"}, ape_, 2, {Kind::f32});
        need_shape({fn, "ape"}, ape, {ratio, c}, "[ratio, C]");
        a.ape = static_cast<const float*>(ape.data());
    }
    if (is_none(prev_kv_) != is_none(prev_gate_))
        value_error({fn, is_none(prev_kv_) ? "prev_kv" : "prev_gate"}, "must be given together with the other prev_* (both or neither)");
    if (!is_none(prev_kv_)) {
        if (!overlap) value_error({fn, "prev_kv"}, "must be None when overlap is false");
        a.prev_kv = source(fn, "prev_kv", prev_kv_, b, ratio, c, "[B, ratio, C]", pkv);
        a.prev_gate = source(fn, "prev_gate", prev_gate_, b, ratio, c, "[B, ratio, C]", pgate);
    }
    a.b = b, a.nb = s / ratio, a.ratio = ratio, a.c = c, a.d = overlap ? c / 2 : c, a.overlap = overlap;
    auto out = need({fn, "out"}, out_, 3, {Kind::f32}, true);
    need_shape({fn, "out"}, out, {b, a.nb, a.d}, "[B, S/ratio, d]");
    a.out = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release nogil;
    compress_run(a);
}

}  // namespace

void bind_compress(py::module_& m) {
    m.def("kv_compress", &kv_compress, py::arg("kv"), py::arg("gate"), py::arg("ape"), py::arg("ratio"),
          py::arg("overlap"), py::arg("prev_kv"), py::arg("prev_gate"), py::arg("out"),
          "Gated per-channel softmax pooling of every block of `ratio` tokens, in float32.\n\n"
          "kv, gate [B, S, C] float32 or int16/uint16 (bf16 bits), S % ratio == 0; ape float32 [ratio, C], added to\n"
          "the gate by position in block, or None (no bias). overlap=False: out[b, j, c] = sum_i softmax_i(gate + ape) * kv\n"
          "over block j (d = C); gate None only with ratio 1, ape None and overlap false: out = kv as float32 (nothing to\n"
          "pool). overlap=True (C = 2d): entry j pools the previous block's first-half channels and its own block's\n"
          "second-half channels in one softmax; for j = 0 the previous block is prev_kv / prev_gate [B, ratio, C]\n"
          "(float32 or bf16 bits) when given, else empty. Writes out float32 [B, S/ratio, d]; non-finite inputs follow\n"
          "the IEEE arithmetic of the max-subtracted softmax.");
}

}  // namespace dsv4rt
