// Sparse attention over gathered K=V rows with an attention sink, online softmax (spec 3.5).
//
// One task = one query row (b, s) and a group of heads. The valid indices of the row are compacted, and
// the rows they select are gathered (and widened to float32) 64 at a time into an L1/L2 scratch. For each
// chunk: logits for every head (vectorised over heads: the query is stored transposed, qT[D][H], and each
// gathered value is broadcast against it), a running max / denominator per head (exp rescaling of the
// accumulator only when the max grows), and P.V accumulated per head into acc[H][D]. The sink joins the
// denominator at the end; rows with no valid index return zeros.
//
// kv_format 1 (V4.1): kv holds packed FP8 window rows [B, N, D + D/32] (E4M3 codes, then one UE8M0 scale per
// 32) and kv_global packed FP4 global rows [B, M, D/2 + D/16] (E2M1 pairs, low nibble = even element, then
// one E4M3 scale per 16); idx in [N, N + M) reads global row idx - N. Only the gathered rows are decoded
// (table lookups, exact in float32) into the same float32 scratch, so the softmax path is unchanged.
#include <cmath>
#include <limits>

#include "common.h"
#include "kv_v41.h"
#include "vec.h"

namespace dsv4rt {
namespace {

constexpr int64_t kChunk = 64;
constexpr int64_t kPiece = 4 * kChunk;   // row_invariant: a row's entries are split into pieces of this many
constexpr int64_t kAhead = 4;   // gathered rows prefetched ahead

struct AttnArgs {
    const void* q;       // [B, S, H, D] float32 / bf16 bits
    bool q_bf16;
    const void* kv;      // [B, N, D]
    bool kv_bf16;
    const int32_t* idx;  // [B, S, K]
    const float* sink;   // [H] or null
    float scale;
    float* o;            // [B, S, H, D]
    float* lse;          // [B, S, H] or null
    int p_round;         // P (against the running max) before P.V: 0 kept, 1 rounded to bf16, 2 to fp16
    int64_t b, s, h, d, n, k;
    bool v41 = false;            // kv: packed FP8 rows; kvg: packed FP4 rows (or null); m global rows
    const uint8_t* kvg = nullptr;
    int64_t m = 0;
};

// logits[j][hb*16 + l] = sum_d kv_j[d] * qT[d][hb*16 + l] for KB gathered rows and HB head vectors
template <int KB, int HB>
DSV4RT_INLINE void logits_block(const float* qt, int64_t hp, const float* const* kr, int64_t d, float* out) {
    v16f acc[KB][HB];
    for (int j = 0; j < KB; ++j)
        for (int hb = 0; hb < HB; ++hb) acc[j][hb] = v16f{};
    for (int64_t dd = 0; dd < d; ++dd) {
        v16f qv[HB];
        for (int hb = 0; hb < HB; ++hb) qv[hb] = load16(qt + dd * hp + hb * 16);
        for (int j = 0; j < KB; ++j) {
            const float kv = kr[j][dd];
            for (int hb = 0; hb < HB; ++hb) acc[j][hb] += kv * qv[hb];
        }
    }
    for (int j = 0; j < KB; ++j)
        for (int hb = 0; hb < HB; ++hb) store16(out + j * hp + hb * 16, acc[j][hb]);
}

template <int KB>
DSV4RT_INLINE void logits_rows(const float* qt, int64_t hp, const float* kvf, int64_t d, int64_t nj, float* p) {
    const int64_t hv = hp / 16;
    for (int64_t j = 0; j < nj; j += KB) {   // rows past nj (< kChunk) are computed on duplicates, ignored
        const float* kr[KB];
        for (int i = 0; i < KB; ++i) kr[i] = kvf + std::min<int64_t>(j + i, nj - 1) * d;
        for (int64_t h0 = 0; h0 < hv; h0 += 4) {
            float* out = p + j * hp + h0 * 16;
            switch (std::min<int64_t>(4, hv - h0)) {
                case 1: logits_block<KB, 1>(qt + h0 * 16, hp, kr, d, out); break;
                case 2: logits_block<KB, 2>(qt + h0 * 16, hp, kr, d, out); break;
                case 3: logits_block<KB, 3>(qt + h0 * 16, hp, kr, d, out); break;
                default: logits_block<KB, 4>(qt + h0 * 16, hp, kr, d, out); break;
            }
        }
    }
}

// acc[h0 + i][d0 : d0 + 16 NV] = alpha * acc + sum_j p[j][h0 + i] * kv_j[d0 : ...] for 4 heads
template <int NV>
DSV4RT_INLINE void pv_block(float* acc, int64_t d, const float* alpha, const float* p, int64_t hp, const float* kvf,
                            int64_t nj, int64_t h0, int64_t d0) {
    v16f r[4][NV];
    for (int i = 0; i < 4; ++i)
        for (int q = 0; q < NV; ++q) r[i][q] = load16(acc + (h0 + i) * d + d0 + 16 * q) * alpha[h0 + i];
    for (int64_t j = 0; j < nj; ++j) {
        v16f kv[NV];
        for (int q = 0; q < NV; ++q) kv[q] = load16(kvf + j * d + d0 + 16 * q);
        for (int i = 0; i < 4; ++i) {
            const float pj = p[j * hp + h0 + i];
            for (int q = 0; q < NV; ++q) r[i][q] += pj * kv[q];
        }
    }
    for (int i = 0; i < 4; ++i)
        for (int q = 0; q < NV; ++q) store16(acc + (h0 + i) * d + d0 + 16 * q, r[i][q]);
}

// Online-softmax update with one chunk: kvf [nj][d] gathered rows; qt [d][hp] (scale folded in, padded
// heads zero); m, den [hp] running max / denominator; acc [hp][d]; p [kChunk][hp], alpha [hp] scratch.
DSV4RT_CLONES void attend_chunk(const float* qt, int64_t hp, int64_t d, const float* kvf, int64_t nj, float* m,
                                float* den, float* acc, float* p, float* alpha, int p_round) {
    if (hp <= 32) logits_rows<8>(qt, hp, kvf, d, nj, p);   // few heads: more rows per block, more FMA chains
    else logits_rows<4>(qt, hp, kvf, d, nj, p);
    const int64_t hv = hp / 16;
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t v = 0; v < hv; ++v) {      // running max, weights, denominator (vectorised over heads)
        const v16f m_old = load16(m + v * 16);
        v16f mx = m_old;
        for (int64_t j = 0; j < nj; ++j) mx = vmax(mx, load16(p + j * hp + v * 16));
        v16f sum = v16f{};
        for (int64_t j = 0; j < nj; ++j) {
            const v16f e = exp_neg(load16(p + j * hp + v * 16) - mx);
            // the numerator's P in its precision; the denominator keeps the fp32 e
            store16(p + j * hp + v * 16, p_round == 1 ? round_bf16(e) : p_round == 2 ? round_f16_nonneg(e) : e);
            sum += e;
        }
        const v16f a = m_old == ninf ? v16f{} : exp_neg(m_old - mx);
        store16(alpha + v * 16, a);
        store16(den + v * 16, load16(den + v * 16) * a + sum);
        store16(m + v * 16, mx);
    }
    const int64_t dv = d / 16 * 16;
    for (int64_t h0 = 0; h0 < hp; h0 += 4) {   // P.V: 4 heads x 64 columns per register tile
        int64_t d0 = 0;
        for (; d0 + 64 <= dv; d0 += 64) pv_block<4>(acc, d, alpha, p, hp, kvf, nj, h0, d0);
        for (; d0 < dv; d0 += 16) pv_block<1>(acc, d, alpha, p, hp, kvf, nj, h0, d0);
        for (int64_t i = 0; i < 4; ++i)
            for (int64_t dd = dv; dd < d; ++dd) {
                float r = acc[(h0 + i) * d + dd] * alpha[h0 + i];
                for (int64_t j = 0; j < nj; ++j) r += p[j * hp + h0 + i] * kvf[j * d + dd];
                acc[(h0 + i) * d + dd] = r;
            }
    }
}

// rows of kv (float32 or bf16 bits) -> float32 [n][d]
DSV4RT_CLONES void gather_rows(const void* kv, bool bf16, int64_t d, const int32_t* rows, int64_t n, float* out) {
    const int64_t row_bytes = d * (bf16 ? 2 : 4);
    for (int64_t j = 0; j < std::min(n, kAhead); ++j)
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(static_cast<const char*>(kv) + rows[j] * row_bytes + b);
    for (int64_t j = 0; j < n; ++j) {
        if (j + kAhead < n) {   // random rows defeat the hardware prefetcher: ask for a few rows ahead
            const char* nxt = static_cast<const char*>(kv) + rows[j + kAhead] * row_bytes;
            for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(nxt + b);
        }
        float* dst = out + j * d;
        if (bf16) {
            const uint16_t* src = static_cast<const uint16_t*>(kv) + rows[j] * d;
            int64_t i = 0;
            for (; i + 16 <= d; i += 16) store16(dst + i, load16_bf16(src + i));
            for (; i < d; ++i) dst[i] = bf16_to_f32(src[i]);
        } else {
            std::memcpy(dst, static_cast<const float*>(kv) + rows[j] * d, sizeof(float) * d);
        }
    }
}

struct Scratch {
    std::vector<float> qt, p, kvf, alpha;
    std::vector<int32_t> rows;
};

// Partial softmax state of one task: running max and denominator per head, unnormalised output.
struct Partial {
    float* m;     // [hp]
    float* den;   // [hp]
    float* acc;   // [hp][d]
};

// query row (b, s) transposed to qt [d][hp] (heads zero-padded), softmax scale folded in
void load_query(const AttnArgs& a, int64_t b, int64_t s, float* qt) {
    const int64_t hp = (a.h + 15) / 16 * 16, d = a.d, qbase = (b * a.s + s) * a.h * d;
    std::fill(qt, qt + d * hp, 0.0f);
    for (int64_t h = 0; h < a.h; ++h)
        for (int64_t dd = 0; dd < d; ++dd) {
            const int64_t i = qbase + h * d + dd;
            const float v = a.q_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(a.q)[i]) : static_cast<const float*>(a.q)[i];
            qt[dd * hp + h] = v * a.scale;
        }
}

// Entries [e0, e1) of the valid indices of query row (b, s), all heads, into `out` (initialised here);
// qt: the row's transposed query (load_query), or null to build it in the scratch.
void attend_task(const AttnArgs& a, int64_t b, int64_t s, int64_t e0, int64_t e1, const float* qt, Partial out,
                 Scratch& w) {
    const int64_t hp = (a.h + 15) / 16 * 16, d = a.d;
    std::fill(out.m, out.m + hp, -std::numeric_limits<float>::infinity());
    std::fill(out.den, out.den + hp, 0.0f);
    std::fill(out.acc, out.acc + hp * d, 0.0f);
    const int32_t* sel = a.idx + (b * a.s + s) * a.k;
    w.rows.clear();
    for (int64_t j = 0, v = 0; j < a.k && v < e1; ++j)
        if (sel[j] >= 0 && v++ >= e0)
            w.rows.push_back(sel[j] < a.n ? static_cast<int32_t>(b * a.n + sel[j])
                                          : static_cast<int32_t>(-(b * a.m + sel[j] - a.n) - 1));
    if (w.rows.empty()) return;
    if (!qt) {
        w.qt.resize(static_cast<size_t>(d * hp));
        load_query(a, b, s, w.qt.data());
        qt = w.qt.data();
    }
    w.p.resize(static_cast<size_t>(kChunk * hp));
    w.kvf.resize(static_cast<size_t>(kChunk * d));
    w.alpha.resize(static_cast<size_t>(hp));
    const int64_t nvalid = static_cast<int64_t>(w.rows.size());
    for (int64_t c0 = 0; c0 < nvalid; c0 += kChunk) {
        const int64_t nj = std::min(kChunk, nvalid - c0);
        if (a.v41)
            gather_rows_v41(static_cast<const uint8_t*>(a.kv), a.kvg, d, w.rows.data() + c0, nj, w.kvf.data());
        else gather_rows(a.kv, a.kv_bf16, d, w.rows.data() + c0, nj, w.kvf.data());
        attend_chunk(qt, hp, d, w.kvf.data(), nj, out.m, out.den, out.acc, w.p.data(), w.alpha.data(), a.p_round);
    }
}

// o, lse of row (b, s) from `parts` partial states over disjoint entry ranges (merged exactly), plus the sink
void finish_row(const AttnArgs& a, int64_t row, const Partial* parts, int64_t nparts) {
    const int64_t d = a.d;
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t h = 0; h < a.h; ++h) {
        float mh = ninf;
        for (int64_t i = 0; i < nparts; ++i) mh = std::max(mh, parts[i].m[h]);
        float mm = mh;
        if (a.sink) mm = mh == ninf ? a.sink[h] : std::max(mh, a.sink[h]);
        float dn = a.sink ? std::exp(a.sink[h] - mm) : 0.0f;
        float* o = a.o + (row * a.h + h) * d;
        std::fill(o, o + d, 0.0f);
        for (int64_t i = 0; i < nparts; ++i) {
            if (parts[i].m[h] == ninf) continue;
            const float e = std::exp(parts[i].m[h] - mm);
            dn += parts[i].den[h] * e;
            const float* ah = parts[i].acc + h * d;
            for (int64_t dd = 0; dd < d; ++dd) o[dd] += ah[dd] * e;
        }
        const float f = dn > 0.0f ? 1.0f / dn : 0.0f;
        for (int64_t dd = 0; dd < d; ++dd) o[dd] *= f;
        if (a.lse)   // a NaN row (NaN in q, kv or the sink) gives NaN, not -inf
            a.lse[row * a.h + h] = std::isnan(dn) || std::isnan(mm) ? std::numeric_limits<float>::quiet_NaN()
                                   : dn > 0.0f ? mm + std::log(dn) : ninf;
    }
}

// row_invariant: a row's valid entries are cut into pieces of kPiece (by its own count only), each piece
// one partial state, merged in order: the same sums whatever the other rows and the threads
void attention_run_invariant(const AttnArgs& a, const std::vector<int64_t>& nvalid, int64_t nt) {
    const int64_t rows = a.b * a.s, hp = (a.h + 15) / 16 * 16, d = a.d, stride = 2 * hp + hp * d;
    auto part_at = [&](float* base) { return Partial{base, base + hp, base + 2 * hp}; };
    std::vector<int64_t> first(static_cast<size_t>(rows + 1), 0);
    for (int64_t r = 0; r < rows; ++r)
        first[r + 1] = first[r] + std::max<int64_t>(1, (nvalid[r] + kPiece - 1) / kPiece);
    if (rows >= 2 * nt || first[rows] == rows) {   // many rows (or one piece each): a task per row
        parallel_tasks(rows, [&](int64_t r) {
            thread_local Scratch scr;
            thread_local std::vector<float> st;
            const int64_t np = first[r + 1] - first[r];
            st.resize(static_cast<size_t>(np * stride));
            std::vector<Partial> parts;
            for (int64_t i = 0; i < np; ++i) {
                parts.push_back(part_at(st.data() + i * stride));
                attend_task(a, r / a.s, r % a.s, i * kPiece, std::min(nvalid[r], (i + 1) * kPiece), nullptr,
                            parts.back(), scr);
            }
            finish_row(a, r, parts.data(), np);
        }, nt);
        return;
    }
    std::vector<float> state(static_cast<size_t>(first[rows] * stride)), qts(static_cast<size_t>(rows * d * hp));
    for (int64_t r = 0; r < rows; ++r) load_query(a, r / a.s, r % a.s, qts.data() + r * d * hp);
    parallel_tasks(first[rows], [&](int64_t t) {   // few rows: a task per piece
        thread_local Scratch scr;
        const int64_t r = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1, i = t - first[r];
        attend_task(a, r / a.s, r % a.s, i * kPiece, std::min(nvalid[r], (i + 1) * kPiece), qts.data() + r * d * hp,
                    part_at(state.data() + t * stride), scr);
    }, nt);
    for (int64_t r = 0; r < rows; ++r) {
        std::vector<Partial> parts;
        for (int64_t t = first[r]; t < first[r + 1]; ++t) parts.push_back(part_at(state.data() + t * stride));
        finish_row(a, r, parts.data(), first[r + 1] - first[r]);
    }
}

void attention_run(const AttnArgs& a, bool row_invariant) {
    const int64_t rows = a.b * a.s, hp = (a.h + 15) / 16 * 16, d = a.d;
    if (rows == 0 || a.h == 0) return;   // no query row or no head: o and lse are empty (and rows divides below)
    const double macs = 2.0 * rows * a.k * hp * d;
    const int64_t nt = pick_threads(macs, 2e6);
    // decode (few rows): each row's valid entries are split over tasks (merged exactly afterwards), so
    // every task keeps all heads and the gathered rows are converted once
    int64_t max_valid = 0;
    std::vector<int64_t> nvalid(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
        int64_t c = 0;
        for (int64_t j = 0; j < a.k; ++j) c += a.idx[r * a.k + j] >= 0;
        nvalid[r] = c;
        max_valid = std::max(max_valid, c);
    }
    if (row_invariant) return attention_run_invariant(a, nvalid, nt);
    const int64_t splits = rows >= 2 * nt ? 1 : std::max<int64_t>(1, std::min<int64_t>((2 * nt + rows - 1) / rows,
                                                                                      (max_valid + kChunk - 1) / kChunk));
    const int64_t stride = 2 * hp + hp * d;   // floats per partial state
    auto part_at = [&](float* base) { return Partial{base, base + hp, base + 2 * hp}; };
    if (splits == 1) {
        parallel_tasks(rows, [&](int64_t r) {
            thread_local Scratch scr;
            thread_local std::vector<float> st;
            st.resize(static_cast<size_t>(stride));
            const Partial pt = part_at(st.data());
            attend_task(a, r / a.s, r % a.s, 0, nvalid[r], nullptr, pt, scr);
            finish_row(a, r, &pt, 1);
        }, nt);
        return;
    }
    // partial states and transposed queries, kept between calls (decode runs this every step)
    thread_local std::vector<float> state, qts;
    state.resize(static_cast<size_t>(rows * splits * stride));
    qts.resize(static_cast<size_t>(rows * d * hp));
    float* const qp = qts.data();   // (thread_local names are not captured: each thread would see its own)
    float* const sp = state.data();
    for (int64_t r = 0; r < rows; ++r) load_query(a, r / a.s, r % a.s, qp + r * d * hp);
    parallel_tasks(rows * splits, [&](int64_t t) {
        thread_local Scratch scr;
        const int64_t r = t / splits, i = t % splits;
        const int64_t per = (nvalid[r] + splits - 1) / splits;
        attend_task(a, r / a.s, r % a.s, i * per, std::min(nvalid[r], (i + 1) * per), qp + r * d * hp,
                    part_at(sp + t * stride), scr);
    }, nt);
    for (int64_t r = 0; r < rows; ++r) {
        std::vector<Partial> parts;
        for (int64_t i = 0; i < splits; ++i) parts.push_back(part_at(sp + (r * splits + i) * stride));
        finish_row(a, r, parts.data(), splits);
    }
}

void sparse_attention(py::handle q_, py::handle kv_, py::handle idx_, py::handle sink_, double scale, py::handle o_,
                      py::handle lse_, int p_round, bool row_invariant, py::handle kv_global_, int kv_format) {
    const char* fn = "sparse_attention";
    if (kv_format != 0 && kv_format != 1) value_error({fn, "kv_format"}, "must be 0 (plain) or 1 (V4.1 packed)");
    const bool v41 = kv_format == 1;
    auto q = need({fn, "q"}, q_, 4, {Kind::f32, Kind::bf16});
    auto kv = v41 ? need({fn, "kv"}, kv_, 3, {Kind::u8}) : need({fn, "kv"}, kv_, 3, {Kind::f32, Kind::bf16});
    const int64_t b = dim(q, 0), s = dim(q, 1), h = dim(q, 2), d = dim(q, 3), n = dim(kv, 1);
    py::array kvg;
    int64_t m = 0;
    if (v41) {
        if (d % 32) value_error({fn, "q"}, "head dim must be a multiple of 32 with kv_format 1");
        need_shape({fn, "kv"}, kv, {b, n, d + d / 32}, "[B, N, D + D/32]");
        if (!is_none(kv_global_)) {
            kvg = need({fn, "kv_global"}, kv_global_, 3, {Kind::u8});
            m = dim(kvg, 1);
            need_shape({fn, "kv_global"}, kvg, {b, m, d / 2 + d / 16}, "[B, M, D/2 + D/16]");
        }
    } else {
        if (!is_none(kv_global_)) value_error({fn, "kv_global"}, "must be None unless kv_format is 1");
        need_shape({fn, "kv"}, kv, {b, n, d}, "[B, N, D]");
    }
    auto idx = need({fn, "idx"}, idx_, 3, {Kind::i32});
    const int64_t k = dim(idx, 2);
    need_shape({fn, "idx"}, idx, {b, s, k}, "[B, S, K]");
    AttnArgs a{};
    py::array sk;
    if (!is_none(sink_)) {
        sk = need({fn, "sink"}, sink_, 1, {Kind::f32});
        need_shape({fn, "sink"}, sk, {h}, "[H]");
        a.sink = static_cast<const float*>(sk.data());
    }
    if (!(scale > 0.0) || !std::isfinite(scale)) value_error({fn, "scale"}, "must be a finite positive number");
    if (p_round < 0 || p_round > 2) value_error({fn, "p_round"}, "must be 0 (fp32 P), 1 (bf16) or 2 (fp16)");
    auto o = need({fn, "o"}, o_, 4, {Kind::f32, Kind::bf16}, true);
    need_shape({fn, "o"}, o, {b, s, h, d}, "[B, S, H, D]");
    py::array lse;
    if (!is_none(lse_)) {
        lse = need({fn, "lse"}, lse_, 3, {Kind::f32}, true);
        need_shape({fn, "lse"}, lse, {b, s, h}, "[B, S, H]");
        a.lse = static_cast<float*>(lse.mutable_data());
    }
    const int32_t* ip = static_cast<const int32_t*>(idx.data());
    for (int64_t i = 0; i < b * s * k; ++i)
        if (ip[i] < -1 || ip[i] >= n + m)
            value_error({fn, "idx"}, "entries must be -1 or in [0, N + M = " + std::to_string(n + m) + "), got " +
                                         std::to_string(ip[i]) + " at flat index " + std::to_string(i));
    a.q = q.data(), a.q_bf16 = kind_of(q) == Kind::bf16;
    a.kv = kv.data(), a.kv_bf16 = kind_of(kv) == Kind::bf16;
    a.idx = ip, a.scale = static_cast<float>(scale), a.p_round = p_round;
    F32Out of(o);
    a.o = of.ptr;
    a.b = b, a.s = s, a.h = h, a.d = d, a.n = n, a.k = k;
    a.v41 = v41, a.m = m, a.kvg = m ? static_cast<const uint8_t*>(kvg.data()) : nullptr;
    if (v41 && (b * std::max(n, m) >= (int64_t(1) << 31)))
        value_error({fn, "kv"}, "B * max(N, M) rows must stay below 2^31 with kv_format 1");
    py::gil_scoped_release nogil;
    attention_run(a, row_invariant);
    of.finish();
}

}  // namespace

void bind_attention(py::module_& m) {
    m.def("sparse_attention", &sparse_attention, py::arg("q"), py::arg("kv"), py::arg("idx"), py::arg("sink"),
          py::arg("scale"), py::arg("o"), py::arg("lse") = py::none(), py::arg("p_round") = 0,
          py::arg("row_invariant") = false, py::arg("kv_global") = py::none(), py::arg("kv_format") = 0,
          "One softmax per (b, s, h) over the gathered K=V rows plus the sink, online, in float32.\n\n"
          "q [B, S, H, D] and kv [B, N, D] float32 or int16/uint16 (bf16 bits); idx int32 [B, S, K] in [0, N) or -1;\n"
          "sink float32 [H] or None; scale > 0. Writes o float32 or bf16 bits [B, S, H, D] (zeros for rows with no valid\n"
          "index) and, if given, lse float32 [B, S, H] (log of the full denominator, sink included). p_round 1 / 2\n"
          "rounds the probabilities of the P.V product to bf16 / fp16 (against the running max; the denominator\n"
          "stays float32). row_invariant: a row's entries are split over tasks by its own count only (pieces of 256,\n"
          "merged in order), so its result never depends on the other rows or the threads (the batch-invariant mode).\n"
          "kv_format 1 (V4.1): kv uint8 [B, N, D + D/32] packed FP8 rows, kv_global uint8 [B, M, D/2 + D/16] packed FP4\n"
          "rows or None; idx in [N, N + M) reads global row idx - N; the gathered rows are decoded in the kernel.");
}

}  // namespace dsv4rt
