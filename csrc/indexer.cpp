// Lightning-indexer top-k: score[t] = sum_h w[h] * relu(q[h] . k[t]) for t < visible, then the top-k.
//
// Fused: keys are scored a tile at a time into one float buffer per query row (the per-head products
// never leave registers), then std::nth_element picks the k best of each row in O(N) and only those k
// are sorted (descending score, or ascending key with sorted_out). Scoring vectorises over heads: each
// query is transposed once to qT[D][H] (heads padded to 16; the pad lanes are left out of the head sum,
// where an infinite key would make their 0 * inf a NaN) and every key value is broadcast against it, so
// keys are read in their natural [N, D] layout (converted from bf16 / E4M3 * scale / MXFP4 (E2M1 pairs *
// per-32 E8M0) to float32 one tile at a time). V4.1's candidate mask drops the non-candidate keys of a row
// before the selection. indexer_scores runs the same scoring and writes each row's scores instead of
// selecting (-inf beyond the row's visible keys and for NaN).
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "common.h"
#include "vec.h"

namespace dsv4rt {
namespace {

constexpr int64_t kTile = 64;    // keys per tile
constexpr int64_t kGroup = 8;    // queries sharing a key tile

struct IndexerArgs {
    const void* q;           // [B, S, H, D] float32 or bf16 bits
    bool q_bf16;
    const void* k;           // [B, N, D] float32, bf16 bits or E4M3 bytes; [B, N, D/2] E2M1 pairs (MXFP4)
    Kind k_kind;
    const float* k_scale;    // [B, N] for E4M3 keys
    const uint8_t* k_e8m0;   // [B, N, D/32] E8M0 scale bytes of MXFP4 keys (k_kind u8), else null
    float* full;             // indexer_scores: [B, S, N] output (no selection), else null
    const float* w;          // [B, S, H]
    const int32_t* vis;      // [B, S]
    int32_t* idx;            // [B, S, topk]
    float* scores;           // [B, S, topk] or null
    const uint8_t* cand;     // [B, S, N] candidate mask (bool bytes) or null: all candidates
    bool sorted_out;         // each row's indices in ascending key order (else by descending score)
    bool score_bf16;         // round q.k, w * relu(.) and the head sum to bf16
    int64_t b, s, h, d, n, topk, hp;   // hp: heads padded to a multiple of 16
};

// 4 keys x HB head vectors: acc[j][hb] = sum_d k_j[d] * qT[d][hb]; part[j] += sum_h w[h] relu(acc[j][h])
// over the `real` heads of the block (lanes from `real` on are padding: q = 0, w = 0, so an infinite key
// gives 0 * inf = NaN there, which must not reach the sum)
template <int HB, bool RND>
DSV4RT_INLINE void score_block(const float* qt, int64_t hp, const float* k0, const float* k1, const float* k2,
                               const float* k3, int64_t d, const float* w, int32_t real, float* part) {
    v16f acc[4][HB];
    for (int j = 0; j < 4; ++j)
        for (int hb = 0; hb < HB; ++hb) acc[j][hb] = v16f{};
    for (int64_t dd = 0; dd < d; ++dd) {
        v16f qv[HB];
        for (int hb = 0; hb < HB; ++hb) qv[hb] = load16(qt + dd * hp + hb * 16);
        const float a = k0[dd], b = k1[dd], c = k2[dd], e = k3[dd];
        for (int hb = 0; hb < HB; ++hb) {
            acc[0][hb] += a * qv[hb];
            acc[1][hb] += b * qv[hb];
            acc[2][hb] += c * qv[hb];
            acc[3][hb] += e * qv[hb];
        }
    }
    const v16i lane = v16i{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int j = 0; j < 4; ++j) {
        v16f t = v16f{};
        for (int hb = 0; hb < HB; ++hb) {
            // the release's bf16 tensors: round(q.k), round(w * relu), the sum rounded by the caller
            v16f term = RND ? round_bf16(load16(w + hb * 16) * relu(round_bf16(acc[j][hb])))
                            : load16(w + hb * 16) * relu(acc[j][hb]);
            if (real < (hb + 1) * 16) term = lane + hb * 16 < real ? term : v16f{};
            t += term;
        }
        part[j] += hsum16(t);
    }
}

// Scores of keys kf[0:nk] ([nk][d] float32) for one query: qt [d][hp] and w [hp] zero-padded beyond h.
// rnd: the bf16 precision points (score_block<.., true> and the rounded head sum)
DSV4RT_CLONES void score_keys(const float* qt, const float* w, int64_t h, int64_t hp, int64_t d, const float* kf,
                              int64_t nk, float* out, bool rnd) {
    const int64_t hv = hp / 16;
    for (int64_t t = 0; t < nk; t += 4) {
        const int64_t nt = std::min<int64_t>(4, nk - t);
        const float* k0 = kf + t * d;
        const float* k1 = kf + (t + std::min<int64_t>(1, nt - 1)) * d;
        const float* k2 = kf + (t + std::min<int64_t>(2, nt - 1)) * d;
        const float* k3 = kf + (t + std::min<int64_t>(3, nt - 1)) * d;
        float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t h0 = 0; h0 < hv; h0 += 4) {
            const float* q0 = qt + h0 * 16;
            const float* w0 = w + h0 * 16;
            const int64_t nb = std::min<int64_t>(4, hv - h0);
            const int32_t real = static_cast<int32_t>(std::min<int64_t>(h - h0 * 16, 64));   // real heads here
            if (rnd) {
                switch (nb) {
                    case 1: score_block<1, true>(q0, hp, k0, k1, k2, k3, d, w0, real, part); break;
                    case 2: score_block<2, true>(q0, hp, k0, k1, k2, k3, d, w0, real, part); break;
                    case 3: score_block<3, true>(q0, hp, k0, k1, k2, k3, d, w0, real, part); break;
                    default: score_block<4, true>(q0, hp, k0, k1, k2, k3, d, w0, real, part); break;
                }
            } else {
                switch (nb) {
                    case 1: score_block<1, false>(q0, hp, k0, k1, k2, k3, d, w0, real, part); break;
                    case 2: score_block<2, false>(q0, hp, k0, k1, k2, k3, d, w0, real, part); break;
                    case 3: score_block<3, false>(q0, hp, k0, k1, k2, k3, d, w0, real, part); break;
                    default: score_block<4, false>(q0, hp, k0, k1, k2, k3, d, w0, real, part); break;
                }
            }
        }
        for (int64_t j = 0; j < nt; ++j) out[t + j] = rnd ? round_bf16(part[j]) : part[j];
    }
}

// keys [t0, t0 + nk) of batch row b as float32 [nk][d]
void load_keys(const IndexerArgs& a, int64_t b, int64_t t0, int64_t nk, float* kf) {
    const int64_t base = (b * a.n + t0) * a.d;
    if (a.k_kind == Kind::f32) {
        std::memcpy(kf, static_cast<const float*>(a.k) + base, sizeof(float) * nk * a.d);
    } else if (a.k_kind == Kind::bf16) {
        const uint16_t* src = static_cast<const uint16_t*>(a.k) + base;
        for (int64_t i = 0; i < nk * a.d; ++i) kf[i] = bf16_to_f32(src[i]);
    } else if (a.k_e8m0) {   // MXFP4: byte i of a key holds elements 2i (low nibble) and 2i + 1
        const int64_t half = a.d / 2, nsc = a.d / 32;
        const uint8_t* src = static_cast<const uint8_t*>(a.k) + (b * a.n + t0) * half;
        const uint8_t* sc = a.k_e8m0 + (b * a.n + t0) * nsc;
        for (int64_t t = 0; t < nk; ++t)
            for (int64_t i = 0; i < half; ++i) {
                const uint8_t byte = src[t * half + i];
                const float s = kE8M0[sc[t * nsc + i / 16]];
                kf[t * a.d + 2 * i] = kE2M1[byte & 15] * s;
                kf[t * a.d + 2 * i + 1] = kE2M1[byte >> 4] * s;
            }
    } else {
        const uint8_t* src = static_cast<const uint8_t*>(a.k) + base;
        for (int64_t t = 0; t < nk; ++t) {
            const float sc = a.k_scale[b * a.n + t0 + t];
            for (int64_t i = 0; i < a.d; ++i) kf[t * a.d + i] = kE4M3[src[t * a.d + i]] * sc;
        }
    }
}

// query (b, s) as qt[d][hp] (heads zero-padded) and its head weights as w[hp]
void load_query(const IndexerArgs& a, int64_t b, int64_t s, float* qt, float* w) {
    std::fill(qt, qt + a.d * a.hp, 0.0f);
    std::fill(w, w + a.hp, 0.0f);
    const int64_t base = ((b * a.s + s) * a.h) * a.d;
    for (int64_t h = 0; h < a.h; ++h) {
        for (int64_t dd = 0; dd < a.d; ++dd) {
            const int64_t i = base + h * a.d + dd;
            qt[dd * a.hp + h] = a.q_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(a.q)[i])
                                         : static_cast<const float*>(a.q)[i];
        }
        w[h] = a.w[(b * a.s + s) * a.h + h];
    }
}

// top-k of sc[0:vis] into idx / best (descending score, or ascending key with `in_order`; -1 / -inf after
// the valid ones): the k-th best score is found by std::nth_element on a copy of the scores (O(vis)), the
// chosen indices by one scan, and only those k are sorted. With a candidate row `cand`, the candidates'
// scores are first packed to the front of sc (their keys in `keys`) and only they are selected.
void select_row(float* sc, int64_t vis, int64_t topk, int32_t* idx, float* best, std::vector<int32_t>& order,
                std::vector<float>& tmp, const uint8_t* cand, bool in_order, std::vector<int32_t>& keys) {
    if (cand) {
        keys.clear();
        for (int64_t t = 0; t < vis; ++t)
            if (cand[t]) {
                sc[keys.size()] = sc[t];
                keys.push_back(static_cast<int32_t>(t));
            }
        vis = static_cast<int64_t>(keys.size());
    }
    const int64_t kk = std::min(topk, vis);
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < vis; ++t)
        if (std::isnan(sc[t])) sc[t] = ninf;   // a strict weak order
    order.clear();
    if (kk < vis) {
        tmp.assign(sc, sc + vis);
        std::nth_element(tmp.begin(), tmp.begin() + (kk - 1), tmp.end(), std::greater<float>());
        const float thr = tmp[static_cast<size_t>(kk - 1)];
        for (int64_t t = 0; t < vis; ++t)
            if (sc[t] > thr) order.push_back(static_cast<int32_t>(t));
        for (int64_t t = 0; t < vis && static_cast<int64_t>(order.size()) < kk; ++t)
            if (sc[t] == thr) order.push_back(static_cast<int32_t>(t));   // ties at the threshold: lowest t
    } else {
        for (int64_t t = 0; t < vis; ++t) order.push_back(static_cast<int32_t>(t));
    }
    if (in_order)   // packed candidates keep their key order
        std::sort(order.begin(), order.end());
    else
        std::sort(order.begin(), order.end(), [sc](int32_t x, int32_t y) { return sc[x] > sc[y] || (sc[x] == sc[y] && x < y); });
    for (int64_t i = 0; i < topk; ++i) {
        const int32_t o = i < kk ? order[static_cast<size_t>(i)] : -1;
        idx[i] = o < 0 ? -1 : cand ? keys[static_cast<size_t>(o)] : o;
        if (best) best[i] = o < 0 ? ninf : sc[o];
    }
}

struct Scratch {
    std::vector<float> qt, w, kf, sc, tmp;
    std::vector<int32_t> order, keys;
};

// One group of queries [s0, s1) of batch row b. With `inner` the key tiles are split over the threads.
void run_group(const IndexerArgs& a, int64_t b, int64_t s0, int64_t s1, bool inner, Scratch& scr) {
    const int64_t ng = s1 - s0;
    int64_t vis[kGroup], nmax = 0;
    for (int64_t i = 0; i < ng; ++i) {
        vis[i] = std::min<int64_t>(std::max<int32_t>(a.vis[b * a.s + s0 + i], 0), a.n);
        nmax = std::max(nmax, vis[i]);
    }
    scr.qt.resize(static_cast<size_t>(ng * a.d * a.hp));
    scr.w.resize(static_cast<size_t>(ng * a.hp));
    scr.sc.resize(static_cast<size_t>(ng * std::max<int64_t>(nmax, 1)));
    for (int64_t i = 0; i < ng; ++i) load_query(a, b, s0 + i, scr.qt.data() + i * a.d * a.hp, scr.w.data() + i * a.hp);
    const int64_t tiles = (nmax + kTile - 1) / kTile;
    auto score_tiles = [&](int64_t t_lo, int64_t t_hi, std::vector<float>& kf) {
        kf.resize(static_cast<size_t>(kTile * a.d));
        for (int64_t ti = t_lo; ti < t_hi; ++ti) {
            const int64_t t0 = ti * kTile, nk = std::min(kTile, nmax - t0);
            load_keys(a, b, t0, nk, kf.data());
            for (int64_t i = 0; i < ng; ++i) {
                const int64_t nv = std::min(nk, vis[i] - t0);
                if (nv > 0)
                    score_keys(scr.qt.data() + i * a.d * a.hp, scr.w.data() + i * a.hp, a.h, a.hp, a.d, kf.data(),
                               nv, scr.sc.data() + i * nmax + t0, a.score_bf16);
            }
        }
    };
    if (inner) {
        double macs = 0;   // one thread per ~2 M multiply-adds
        for (int64_t i = 0; i < ng; ++i) macs += static_cast<double>(vis[i]) * a.hp * a.d;
        parallel_for(tiles, [&](int64_t lo, int64_t hi) {
            std::vector<float> kf;
            score_tiles(lo, hi, kf);
        }, pick_threads(macs, 2e6));
    } else {
        score_tiles(0, tiles, scr.kf);
    }
    if (a.full) {   // indexer_scores: the row's scores, -inf beyond its visible keys and for NaN
        const float ninf = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < ng; ++i) {
            float* out = a.full + (b * a.s + s0 + i) * a.n;
            const float* sc = scr.sc.data() + i * nmax;
            for (int64_t t = 0; t < vis[i]; ++t) out[t] = std::isnan(sc[t]) ? ninf : sc[t];
            std::fill(out + vis[i], out + a.n, ninf);
        }
        return;
    }
    for (int64_t i = 0; i < ng; ++i) {
        const int64_t row = b * a.s + s0 + i;
        select_row(scr.sc.data() + i * nmax, vis[i], a.topk, a.idx + row * a.topk,
                   a.scores ? a.scores + row * a.topk : nullptr, scr.order, scr.tmp,
                   a.cand ? a.cand + row * a.n : nullptr, a.sorted_out, scr.keys);
    }
}

void indexer_run(const IndexerArgs& a) {
    const int64_t groups_per_b = (a.s + kGroup - 1) / kGroup, groups = a.b * groups_per_b;
    const double macs = static_cast<double>(a.b) * a.s * a.n * a.hp * a.d;   // upper bound
    if (groups >= 2 * max_threads() && macs >= 4e6) {   // prefill: whole query groups per thread
        parallel_tasks(groups, [&](int64_t g) {
            thread_local Scratch scr;
            const int64_t b = g / groups_per_b, s0 = (g % groups_per_b) * kGroup;
            run_group(a, b, s0, std::min(a.s, s0 + kGroup), false, scr);
        }, pick_threads(macs, 2e6));
    } else {                              // decode: split each group's keys over the threads
        Scratch scr;
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t b = g / groups_per_b, s0 = (g % groups_per_b) * kGroup;
            run_group(a, b, s0, std::min(a.s, s0 + kGroup), true, scr);
        }
    }
}

// The inputs shared by indexer_topk and indexer_scores, validated; keeps the arrays alive.
struct Inputs {
    py::array q, k, ks, w, vis;
};

Inputs common_args(const char* fn, py::handle q_, py::handle k_, py::handle k_scale_, py::handle w_,
                   py::handle vis_, IndexerArgs& a) {
    Inputs in;
    in.q = need({fn, "q"}, q_, 4, {Kind::f32, Kind::bf16});
    in.k = need({fn, "k"}, k_, 3, {Kind::f32, Kind::bf16, Kind::u8});
    const int64_t b = dim(in.q, 0), s = dim(in.q, 1), h = dim(in.q, 2), d = dim(in.q, 3), n = dim(in.k, 1);
    a.q = in.q.data();
    a.q_bf16 = kind_of(in.q) == Kind::bf16;
    a.k = in.k.data();
    a.k_kind = kind_of(in.k);
    const bool mx = a.k_kind == Kind::u8 && !is_none(k_scale_) && py::array::ensure(k_scale_).ndim() == 3;
    if (mx) {   // MXFP4: uint8 [B, N, D/2] pairs with uint8 E8M0 [B, N, D/32]
        if (d % 32) value_error({fn, "k"}, "MXFP4 keys need D % 32 == 0, got D = " + std::to_string(d));
        need_shape({fn, "k"}, in.k, {b, n, d / 2}, "[B, N, D/2]");
        in.ks = need({fn, "k_scale"}, k_scale_, 3, {Kind::u8});
        need_shape({fn, "k_scale"}, in.ks, {b, n, d / 32}, "[B, N, D/32]");
        a.k_e8m0 = static_cast<const uint8_t*>(in.ks.data());
    } else {
        need_shape({fn, "k"}, in.k, {b, n, d}, "[B, N, D]");
        if (a.k_kind == Kind::u8) {
            if (is_none(k_scale_))
                value_error({fn, "k_scale"}, "must be a float32 [B, N] array when k holds E4M3 bytes");
            in.ks = need({fn, "k_scale"}, k_scale_, 2, {Kind::f32});
            need_shape({fn, "k_scale"}, in.ks, {b, n}, "[B, N]");
            a.k_scale = static_cast<const float*>(in.ks.data());
        } else if (!is_none(k_scale_)) {
            value_error({fn, "k_scale"}, "must be None unless k holds E4M3 bytes or MXFP4 pairs (uint8)");
        }
    }
    in.w = need({fn, "weights"}, w_, 3, {Kind::f32});
    need_shape({fn, "weights"}, in.w, {b, s, h}, "[B, S, H]");
    in.vis = need({fn, "visible"}, vis_, 2, {Kind::i32});
    need_shape({fn, "visible"}, in.vis, {b, s}, "[B, S]");
    a.w = static_cast<const float*>(in.w.data());
    a.vis = static_cast<const int32_t*>(in.vis.data());
    a.b = b, a.s = s, a.h = h, a.d = d, a.n = n, a.hp = (h + 15) / 16 * 16;
    return in;
}

void indexer_topk(py::handle q_, py::handle k_, py::handle k_scale_, py::handle w_, py::handle vis_, int64_t topk,
                  py::handle idx_, py::handle scores_, bool score_bf16, py::handle cand_, bool sorted_out) {
    const char* fn = "indexer_topk";
    IndexerArgs a{};
    Inputs in = common_args(fn, q_, k_, k_scale_, w_, vis_, a);
    const int64_t b = a.b, s = a.s, n = a.n;
    if (topk < 1) value_error({fn, "topk"}, "must be >= 1, got " + std::to_string(topk));
    auto idx = need({fn, "idx"}, idx_, 3, {Kind::i32}, true);
    need_shape({fn, "idx"}, idx, {b, s, topk}, "[B, S, topk]");
    py::array sc;
    if (!is_none(scores_)) {
        sc = need({fn, "scores"}, scores_, 3, {Kind::f32}, true);
        need_shape({fn, "scores"}, sc, {b, s, topk}, "[B, S, topk]");
        a.scores = static_cast<float*>(sc.mutable_data());
    }
    a.idx = static_cast<int32_t*>(idx.mutable_data());
    a.topk = topk;
    a.score_bf16 = score_bf16;
    py::array cand;
    if (!is_none(cand_)) {
        cand = need({fn, "candidates"}, cand_, 3, {Kind::u8});
        need_shape({fn, "candidates"}, cand, {b, s, n}, "[B, S, N]");
        a.cand = static_cast<const uint8_t*>(cand.data());
    }
    a.sorted_out = sorted_out;
    py::gil_scoped_release nogil;
    indexer_run(a);
}

void indexer_scores(py::handle q_, py::handle k_, py::handle k_scale_, py::handle w_, py::handle vis_,
                    py::handle out_, bool score_bf16) {
    const char* fn = "indexer_scores";
    IndexerArgs a{};
    Inputs in = common_args(fn, q_, k_, k_scale_, w_, vis_, a);
    auto out = need({fn, "out"}, out_, 3, {Kind::f32}, true);
    need_shape({fn, "out"}, out, {a.b, a.s, a.n}, "[B, S, N]");
    a.full = static_cast<float*>(out.mutable_data());
    a.topk = 1;
    a.score_bf16 = score_bf16;
    py::gil_scoped_release nogil;
    indexer_run(a);
}

}  // namespace

void bind_indexer(py::module_& m) {
    m.def("indexer_topk", &indexer_topk, py::arg("q"), py::arg("k"), py::arg("k_scale"), py::arg("weights"),
          py::arg("visible"), py::arg("topk"), py::arg("idx"), py::arg("scores") = py::none(),
          py::arg("score_bf16") = false, py::arg("candidates") = py::none(), py::arg("sorted_out") = false,
          "Fused lightning-indexer scores and top-k selection.\n\n"
          "q [B, S, H, D] float32 or int16/uint16 (bf16 bits); k [B, N, D] float32, bf16 bits, or uint8 E4M3\n"
          "bytes with k_scale float32 [B, N] (else None); weights float32 [B, S, H]; visible int32 [B, S]\n"
          "(clamped to [0, N]). Writes idx int32 [B, S, topk] (descending score, -1 after the visible ones)\n"
          "and, if given, scores float32 [B, S, topk] (-inf where idx is -1). score_bf16 rounds q.k, w * relu(q.k) and\n"
          "the head sum to bf16 (the release's bf16 indexer). candidates: None or uint8 [B, S, N] (bool bytes):\n"
          "only keys t < visible with candidates[b, s, t] != 0 are selected (V4.1). sorted_out: each row's\n"
          "indices in ascending key order, then the -1s. MXFP4 keys: k uint8 [B, N, D/2] (E2M1 pairs, low nibble\n"
          "= even element) with k_scale uint8 E8M0 [B, N, D/32].");
    m.def("indexer_scores", &indexer_scores, py::arg("q"), py::arg("k"), py::arg("k_scale"), py::arg("weights"),
          py::arg("visible"), py::arg("out"), py::arg("score_bf16") = false,
          "Lightning-indexer score matrix (the scoring of indexer_topk, no selection).\n\n"
          "Inputs as indexer_topk (float32 / bf16 / E4M3 / MXFP4 keys). Writes out float32 [B, S, N]:\n"
          "sum_h w[h] * relu(q[h] . k[t]) for t < visible, -inf beyond it and for NaN scores.");
}

}  // namespace dsv4rt
