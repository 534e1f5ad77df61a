// The packed MXFP4 layout (fp4_gemm.h): packing in place at load, and the driver of the GEMMs on it.
//
// The layout exists for the kernels with the output columns in the vector lanes (fp4_packed_avx512.cpp); where
// they do not run (no AVX512-BF16 / VBMI, a scale byte outside [2, 252], a row of x whose products leave
// float32's normal range) an expert is unpacked into scratch and the released layout's kernels run, so every
// call gives the same result as on the released bytes in the row-invariant mode.
#include <cstring>
#include <limits>

#include "bf16_gemm.h"
#include "fp4_gemm.h"
#include "fp4_kernels.h"

namespace dsv4rt {

namespace {

constexpr int64_t kGroupRows = 16;

// one dword of 4 released bytes (pairs) -> the packed dword: the low nibbles in word 0, the high in word 1
inline uint32_t pack_dword(uint32_t d) {
    auto squeeze = [](uint32_t nib) {   // nibbles at bits 0, 8, 16, 24 -> bits 0, 4, 8, 12
        nib = (nib | nib >> 4) & 0x00FF00FFu;
        return (nib | nib >> 8) & 0xFFFFu;
    };
    return squeeze(d & 0x0F0F0F0Fu) | squeeze(d >> 4 & 0x0F0F0F0Fu) << 16;
}

inline uint32_t unpack_dword(uint32_t p) {
    auto spread = [](uint32_t w) {   // bits 0, 4, 8, 12 -> nibbles at bits 0, 8, 16, 24
        w = (w | w << 8) & 0x00FF00FFu;
        return (w | w << 4) & 0x0F0F0F0Fu;
    };
    return spread(p & 0xFFFFu) | spread(p >> 16) << 4;
}

// one group of 16 rows: released [16][k/2] <-> packed [k/128][16 quads][16 rows] dwords, through scratch
void pack_group(uint8_t* g, int64_t k, bool pack, std::vector<uint32_t>& tmp) {
    const int64_t dwords = k / 8;   // per row
    tmp.resize(static_cast<size_t>(kGroupRows * dwords));
    std::memcpy(tmp.data(), g, tmp.size() * 4);
    uint32_t* out = reinterpret_cast<uint32_t*>(g);   // rows of k/2 bytes are 4-byte multiples: k % 128 == 0
    for (int64_t kb = 0; kb < k / 128; ++kb)
        for (int64_t q = 0; q < 16; ++q)
            for (int64_t j = 0; j < kGroupRows; ++j) {
                const int64_t released = j * dwords + kb * 16 + q, packed = (kb * 16 + q) * kGroupRows + j;
                if (pack)
                    out[packed] = pack_dword(tmp[static_cast<size_t>(released)]);
                else
                    out[released] = unpack_dword(tmp[static_cast<size_t>(packed)]);
            }
}

void repack(uint8_t* w, int64_t rows, int64_t k, bool pack) {
    const int64_t groups = rows / kGroupRows, bytes = kGroupRows * (k / 2);
    parallel_tasks(groups, [&](int64_t g) {
        thread_local std::vector<uint32_t> tmp;
        pack_group(w + g * bytes, k, pack, tmp);
    }, pick_threads(static_cast<double>(rows) * k, 1 << 20));
}

// The released-layout run of one packed expert: its bytes unpacked into scratch
void run_unpacked(const Fp4Expert& e, int64_t gemv_max_m, bool row_invariant) {
    std::vector<uint8_t> w(e.w, e.w + e.n * (e.k / 2));
    fp4_unpack(w.data(), e.n, e.k);
    Fp4Expert raw = e;
    raw.w = w.data();
    raw.packed = false;
    fp4_gemm_run({raw}, gemv_max_m, row_invariant);
}

}  // namespace

bool fp4_packable(int64_t n, int64_t k) { return n > 0 && k > 0 && n % kGroupRows == 0 && k % 128 == 0; }

bool fp4_packed_fast() {
#if defined(DSV4RT_X86)
    return bf16gemm::available() && fp4::lane_available();
#else
    return false;
#endif
}

void fp4_pack(uint8_t* w, int64_t rows, int64_t k) { repack(w, rows, k, true); }
void fp4_unpack(uint8_t* w, int64_t rows, int64_t k) { repack(w, rows, k, false); }

void fp4_gemm_run_packed(const std::vector<Fp4Expert>& experts, int64_t gemv_max_m) {
    for (const Fp4Expert& e : experts) {
        if (e.m <= 0 || e.n <= 0) continue;
#if defined(DSV4RT_X86)
        if (fp4_packed_fast() && fp4_packable(e.n, e.k)) {
            const auto [lo, hi] = fp4::scale_range(e);
            if (lo >= 2 && hi <= 252) {
                // every row on gemm()'s numerics where x allows (run_rows), as the released layout's
                // row-invariant mode; the rows it declines take that mode's float32 GEMV, one row at a time
                bf16gemm::run_rows({e.x, false, e.m, e.k, e.n, lo - 1, fp4::decode_packed, fp4::decode_packed_t, &e,
                                    e.y, e.ldy, fp4::few_rows_packed},
                                   gemv_max_m, [&e](const float* x, int64_t rows, float* y) {
                                       Fp4Expert one = e;
                                       one.x = x;
                                       one.y = y;
                                       one.m = rows;
                                       one.ldy = e.n;
                                       run_unpacked(one, std::numeric_limits<int64_t>::max(), true);
                                   });
                continue;
            }
        }
#endif
        run_unpacked(e, gemv_max_m, true);
    }
}

}  // namespace dsv4rt
