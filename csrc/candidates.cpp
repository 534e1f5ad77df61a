// V4.1's candidate blocks: select_candidate_blocks (level one of the two-level top-k).
//
// One task = a slice of query rows. Per row: the max score of each block of `block` positions (NaN counts
// as -inf; the last block may be short), +inf for the block of position compress_len - 1 (the newest,
// pinned), then the min(n_keep, live) best of the `live` blocks above -inf: std::nth_element on a copy of
// the live scores finds the threshold, one scan takes the blocks above it and then the ties at it (lower
// block first). The mask bytes of the row's positions are written from the kept blocks.
#include <algorithm>
#include <functional>
#include <limits>

#include "common.h"

namespace dsv4rt {
namespace {

struct BlockArgs {
    const void* sc;        // [R, N] float32 or bf16 bits
    bool bf16;
    const int32_t* len;    // [R] compress_len
    uint8_t* mask;         // [R, N] bool bytes
    int64_t rows, n, block, keep;
};

void select_blocks_row(const BlockArgs& a, int64_t r, std::vector<float>& best, std::vector<float>& tmp,
                       std::vector<uint8_t>& kept) {
    const float ninf = -std::numeric_limits<float>::infinity();
    const int64_t nb = (a.n + a.block - 1) / a.block;
    best.assign(static_cast<size_t>(nb), ninf);
    for (int64_t j = 0; j < nb; ++j) {
        const int64_t t1 = std::min(a.n, (j + 1) * a.block);
        float m = ninf;
        for (int64_t i = r * a.n + j * a.block; i < r * a.n + t1; ++i) {
            const float v = a.bf16 ? bf16_to_f32(static_cast<const uint16_t*>(a.sc)[i]) : static_cast<const float*>(a.sc)[i];
            if (v > m) m = v;                    // NaN compares false: it counts as -inf
        }
        best[static_cast<size_t>(j)] = m;
    }
    const int64_t len = a.len[r];
    if (len >= 1) best[static_cast<size_t>((len - 1) / a.block)] = std::numeric_limits<float>::infinity();
    tmp.clear();
    for (int64_t j = 0; j < nb; ++j)
        if (best[static_cast<size_t>(j)] > ninf) tmp.push_back(best[static_cast<size_t>(j)]);
    const int64_t live = static_cast<int64_t>(tmp.size());
    const int64_t want = std::min(a.keep, live);
    kept.assign(static_cast<size_t>(nb), 0);
    if (want == live) {
        for (int64_t j = 0; j < nb; ++j) kept[static_cast<size_t>(j)] = best[static_cast<size_t>(j)] > ninf;
    } else if (want > 0) {
        std::nth_element(tmp.begin(), tmp.begin() + (want - 1), tmp.end(), std::greater<float>());
        const float thr = tmp[static_cast<size_t>(want - 1)];
        int64_t taken = 0;
        for (int64_t j = 0; j < nb; ++j) {
            if (best[static_cast<size_t>(j)] > thr) {
                kept[static_cast<size_t>(j)] = 1;
                ++taken;
            }
        }
        for (int64_t j = 0; j < nb && taken < want; ++j) {
            if (best[static_cast<size_t>(j)] == thr) {
                kept[static_cast<size_t>(j)] = 1;
                ++taken;
            }
        }
    }
    uint8_t* out = a.mask + r * a.n;
    for (int64_t j = 0; j < nb; ++j) {
        const int64_t t0 = j * a.block, t1 = std::min(a.n, t0 + a.block);
        std::fill(out + t0, out + t1, kept[static_cast<size_t>(j)]);
    }
}

void select_candidate_blocks(py::handle scores_, py::handle len_, int64_t block, int64_t keep, py::handle mask_) {
    const char* fn = "select_candidate_blocks";
    auto sc = need({fn, "scores"}, scores_, 3, {Kind::f32, Kind::bf16});
    const int64_t b = dim(sc, 0), s = dim(sc, 1), n = dim(sc, 2);
    auto len = need({fn, "compress_len"}, len_, 2, {Kind::i32});
    need_shape({fn, "compress_len"}, len, {b, s}, "[B, S]");
    if (block < 1) value_error({fn, "block_size"}, "must be >= 1, got " + std::to_string(block));
    if (keep < 1) value_error({fn, "n_blocks"}, "must be >= 1, got " + std::to_string(keep));
    auto mask = need({fn, "mask"}, mask_, 3, {Kind::u8}, true);
    need_shape({fn, "mask"}, mask, {b, s, n}, "[B, S, N]");
    BlockArgs a{sc.data(), kind_of(sc) == Kind::bf16, static_cast<const int32_t*>(len.data()),
                static_cast<uint8_t*>(mask.mutable_data()), b * s, n, block, keep};
    for (int64_t r = 0; r < a.rows; ++r)
        if (a.len[r] < 0 || a.len[r] > n)
            value_error({fn, "compress_len"}, "entries must lie in [0, " + std::to_string(n) + "], got " +
                                                  std::to_string(a.len[r]));
    if (n == 0) return;
    py::gil_scoped_release nogil;
    parallel_for(a.rows, [&](int64_t lo, int64_t hi) {
        std::vector<float> best, tmp;
        std::vector<uint8_t> kept;
        for (int64_t r = lo; r < hi; ++r) select_blocks_row(a, r, best, tmp, kept);
    }, pick_threads(static_cast<double>(a.rows) * n, 1e5));
}

}  // namespace

void bind_candidates(py::module_& m) {
    m.def("select_candidate_blocks", &select_candidate_blocks, py::arg("scores"), py::arg("compress_len"),
          py::arg("block_size"), py::arg("n_blocks"), py::arg("mask"),
          "V4.1's candidate blocks: scores float32 or int16/uint16 (bf16 bits) [B, S, N] (-inf: unreachable, NaN\n"
          "counts as -inf), compress_len int32 [B, S] in [0, N], block_size >= 1, n_blocks >= 1. Per row, block j\n"
          "(positions [j * block_size, (j + 1) * block_size) within N) scores the max of its positions, the block\n"
          "of position compress_len - 1 +inf; of the blocks above -inf the min(n_blocks, their count) best are\n"
          "kept (ties to the lower block). Writes mask uint8 [B, S, N]: 1 where the position's block is kept.");
}

}  // namespace dsv4rt
