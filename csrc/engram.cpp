// Engram (DeepSeek-V4.1): engram_hash (the n-gram hash of official inference/engram.py) and engram_lookup
// (row gather + per-32 E8M0 dequantisation of an FP8 E4M3 table, official model.py ParallelEngramEmbedding).
//
// engram_hash: one task = a slice of tokens. Per token: walk the window k = 0..N-1, a DEAD (-1) slot and
// every later one hashing as pad_id; h = tok_0 * m_0, then h ^= tok_k * m_k and, per head, h mod prime +
// offset. Products and XORs run in uint64 (wrap-around is defined there; the contract keeps every product
// below 2^63, so the values equal the exact ones), the modulo of a value below 2^63 likewise.
//
// engram_lookup: one task = a slice of the T*n requested rows. Only those rows of the table (and of its
// scales) are read, so a memory-mapped table of any size costs the pages of the requested rows; the table
// and its scales are addressed through their strides (a strided view is never copied whole). Each
// element is kE4M3[byte] * kE8M0[scale byte] in float32 (exact: E4M3 times a power of two; NaN codes give
// NaN), stored as float32 or rounded to bf16 (nearest even).
#include "common.h"

namespace dsv4rt {
namespace {

py::array need_i64(const Arg& a, const py::handle& obj, int ndim) {
    auto arr = need(a, obj, ndim, {Kind::any});
    if (arr.dtype().kind() != 'i' || arr.itemsize() != 8)
        type_error(a, "must have dtype int64, got " + dtype_str(arr));
    return arr;
}

struct HashArgs {
    const int64_t* window;   // [T, N]
    const int64_t* mult;     // [N]
    const int64_t* primes;   // [N-1, H]
    const int64_t* offsets;  // [(N-1) * H]
    int64_t t, n, h, pad;
    int64_t* out;            // [T, (N-1) * H]
};

void hash_tokens(const HashArgs& a, int64_t t0, int64_t t1) {
    const int64_t cols = (a.n - 1) * a.h;
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t* w = a.window + t * a.n;
        int64_t* o = a.out + t * cols;
        bool dead = false;
        uint64_t hv = 0;
        for (int64_t k = 0; k < a.n; ++k) {
            dead = dead || w[k] == -1;
            const uint64_t term = static_cast<uint64_t>(dead ? a.pad : w[k]) * static_cast<uint64_t>(a.mult[k]);
            hv = k == 0 ? term : hv ^ term;
            if (k == 0) continue;
            const int64_t c0 = (k - 1) * a.h;
            for (int64_t j = 0; j < a.h; ++j)
                o[c0 + j] = static_cast<int64_t>(hv % static_cast<uint64_t>(a.primes[c0 + j])) + a.offsets[c0 + j];
        }
    }
}

void engram_hash(py::handle window_, py::handle mult_, py::handle primes_, py::handle offsets_, int64_t pad_id,
                 py::handle out_) {
    const char* fn = "engram_hash";
    auto window = need_i64({fn, "window"}, window_, 2);
    const int64_t t = dim(window, 0), n = dim(window, 1);
    if (n < 2) value_error({fn, "window"}, "must be [T, N] with N >= 2, got " + shape_str(window));
    auto mult = need_i64({fn, "multipliers"}, mult_, 1);
    need_shape({fn, "multipliers"}, mult, {n}, "[N]");
    auto primes = need_i64({fn, "primes"}, primes_, 2);
    if (dim(primes, 0) != n - 1) value_error({fn, "primes"}, "must be [N-1, H], got " + shape_str(primes));
    const int64_t h = dim(primes, 1);
    auto offsets = need_i64({fn, "offsets"}, offsets_, 1);
    need_shape({fn, "offsets"}, offsets, {(n - 1) * h}, "[(N-1)*H]");
    if (pad_id < 0) value_error({fn, "pad_id"}, "must be >= 0, got " + std::to_string(pad_id));
    auto out = need_i64({fn, "out"}, out_, 2);
    need_shape({fn, "out"}, out, {t, (n - 1) * h}, "[T, (N-1)*H]");
    if (!out.writeable()) value_error({fn, "out"}, "must be writable");
    const auto* p = static_cast<const int64_t*>(primes.data());
    for (int64_t i = 0; i < (n - 1) * h; ++i)   // a zero modulus would trap
        if (p[i] < 1) value_error({fn, "primes"}, "entries must be >= 1, got " + std::to_string(p[i]));
    HashArgs a{static_cast<const int64_t*>(window.data()), static_cast<const int64_t*>(mult.data()), p,
               static_cast<const int64_t*>(offsets.data()), t, n, h, pad_id, static_cast<int64_t*>(out.mutable_data())};
    py::gil_scoped_release nogil;
    parallel_for(t, [&](int64_t lo, int64_t hi) { hash_tokens(a, lo, hi); },
                 pick_threads(static_cast<double>(t) * n * (h + 1), 1 << 15));
}

// a 2-D byte array of any (non-negative) strides: the table is addressed, never copied
py::array need_bytes2d(const Arg& a, const py::handle& obj) {
    if (!py::isinstance<py::array>(obj))
        type_error(a, std::string("must be a numpy.ndarray, got ") +
                          py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (arr.ndim() != 2) value_error(a, "must have rank 2, got shape " + shape_str(arr));
    if (kind_of(arr) != Kind::u8) type_error(a, "must have dtype uint8 (the bytes), got " + dtype_str(arr));
    if (arr.strides(0) < 0 || arr.strides(1) < 0) value_error(a, "must have non-negative strides");
    return arr;
}

struct LookupArgs {
    const void* ids;        // [R] int32 / int64 (R = T * n)
    bool ids64;
    const uint8_t* weight;  // [rows, D] E4M3 bytes, strides ws0 / ws1
    const uint8_t* scale;   // [rows, D/32] E8M0 bytes, strides ss0 / ss1
    int64_t ws0, ws1, ss0, ss1;
    int64_t d;
    float* out32;           // [R, D] float32, or
    uint16_t* out16;        // [R, D] bf16 bits
};

inline int64_t id_at(const LookupArgs& a, int64_t r) {
    return a.ids64 ? static_cast<const int64_t*>(a.ids)[r] : static_cast<const int32_t*>(a.ids)[r];
}

DSV4RT_CLONES void lookup_rows(const LookupArgs& a, int64_t r0, int64_t r1) {
    const int64_t nb = a.d / 32;
    float buf[32];
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = id_at(a, r);
        const uint8_t* w = a.weight + row * a.ws0;
        const uint8_t* s = a.scale + row * a.ss0;
        for (int64_t b = 0; b < nb; ++b) {
            const float sc = kE8M0[s[b * a.ss1]];
            float* dst = a.out32 ? a.out32 + r * a.d + b * 32 : buf;
            if (a.ws1 == 1) {
                const uint8_t* wb = w + b * 32;
                for (int i = 0; i < 32; ++i) dst[i] = kE4M3[wb[i]] * sc;
            } else {
                for (int i = 0; i < 32; ++i) dst[i] = kE4M3[w[(b * 32 + i) * a.ws1]] * sc;
            }
            if (a.out16)
                for (int i = 0; i < 32; ++i) a.out16[r * a.d + b * 32 + i] = f32_to_bf16(buf[i]);
        }
    }
}

void engram_lookup(py::handle ids_, py::handle weight_, py::handle scale_, py::handle out_) {
    const char* fn = "engram_lookup";
    auto ids = need({fn, "ids"}, ids_, 2, {Kind::any});
    if (ids.dtype().kind() != 'i' || (ids.itemsize() != 4 && ids.itemsize() != 8))
        type_error({fn, "ids"}, "must have dtype int32 or int64, got " + dtype_str(ids));
    const int64_t t = dim(ids, 0), n = dim(ids, 1);
    auto weight = need_bytes2d({fn, "weight"}, weight_);
    const int64_t rows = dim(weight, 0), d = dim(weight, 1);
    if (d % 32) value_error({fn, "weight"}, "must be [rows, D] with D a multiple of 32, got " + shape_str(weight));
    auto scale = need_bytes2d({fn, "scale"}, scale_);
    need_shape({fn, "scale"}, scale, {rows, d / 32}, "[rows, D/32]");
    auto out = need({fn, "out"}, out_, 3, {Kind::f32, Kind::bf16}, true);
    need_shape({fn, "out"}, out, {t, n, d}, "[T, n, D]");
    LookupArgs a{ids.data(), ids.itemsize() == 8, static_cast<const uint8_t*>(weight.data()),
                 static_cast<const uint8_t*>(scale.data()), weight.strides(0), weight.strides(1), scale.strides(0),
                 scale.strides(1), d, nullptr, nullptr};
    if (kind_of(out) == Kind::f32) a.out32 = static_cast<float*>(out.mutable_data());
    else a.out16 = static_cast<uint16_t*>(out.mutable_data());
    for (int64_t r = 0; r < t * n; ++r) {   // every row read below must exist
        const int64_t v = id_at(a, r);
        if (v < 0 || v >= rows)
            value_error({fn, "ids"}, "entries must be in [0, rows = " + std::to_string(rows) + "), got " +
                                         std::to_string(v) + " at flat index " + std::to_string(r));
    }
    py::gil_scoped_release nogil;
    parallel_for(t * n, [&](int64_t lo, int64_t hi) { lookup_rows(a, lo, hi); },
                 pick_threads(static_cast<double>(t) * n * d, 1 << 16));
}

}  // namespace

void bind_engram(py::module_& m) {
    m.def("engram_hash", &engram_hash, py::arg("window"), py::arg("multipliers"), py::arg("primes"),
          py::arg("offsets"), py::arg("pad_id"), py::arg("out"),
          "V4.1's Engram n-gram hash: window int64 [T, N] (compressed ids, -1 = DEAD: it and every later slot\n"
          "hash as pad_id), multipliers int64 [N], primes int64 [N-1, H] (>= 1), offsets int64 [(N-1)*H];\n"
          "h = tok_0 * m_0, h ^= tok_k * m_k, out[t, (k-1)*H + j] = h mod primes[k-1, j] + offsets[(k-1)*H + j]\n"
          "(uint64 arithmetic; the caller keeps every product below 2^63). Writes out int64 [T, (N-1)*H].");
    m.def("engram_lookup", &engram_lookup, py::arg("ids"), py::arg("weight"), py::arg("scale"), py::arg("out"),
          "Rows of an FP8 table, dequantised: ids int32 / int64 [T, n] in [0, rows), weight E4M3 bytes [rows, D]\n"
          "(D % 32 == 0), scale E8M0 bytes [rows, D/32] (both any strides); out[t, i, :] = e4m3(weight[ids[t, i]]) *\n"
          "2^(scale - 127) per 32, float32 or bf16 bits (rounded to nearest even) [T, n, D]. Reads only the\n"
          "requested rows.");
}

}  // namespace dsv4rt
