// MXFP4 (E2M1 codes + E8M0 per-32 scales) GEMMs on packed weights: fp4_gemm and fp4_grouped_gemm.
//
// Two paths, both decoding the packed bytes on the fly (the dequantised matrix never exists):
//  * GEMV (M <= gemv_max_m, default 8): every weight byte is read once, straight from memory, and decoded
//    in registers; threads split the N rows, so the weight streams at memory bandwidth. AVX-512: one
//    64-byte load holds 128 codes of a row; `vpermps` with the 16-entry E2M1 table decodes 16 of them per
//    instruction (it reads only the low 4 index bits, so the codes need shifts but no masks); x is permuted
//    once per call to match the decoded lane order, and the per-32 scales are applied once per 128 codes.
//    With AVX512-BF16 and VBMI, experts of 2..gemv_max_m rows whose x is exactly bf16 (act_quant's output,
//    bf16 inputs) take the bf16 lane kernel instead (fp4_lane_avx512.cpp: codes decoded to bf16 with the
//    scale in the exponent, vdpbf16ps with K in the lanes, one summation order per output for every M);
//    weight rows with a scale byte it cannot fold exactly go back to the float32 GEMV. Plain mode only: the
//    batch-invariant mode keeps the blocked bf16 numerics (run_invariant; 1-4 rows of an expert through
//    fp4_few_avx512.cpp, which gives those bits with the columns in the vector lanes).
//  * blocked (larger M): a tile of 32 rows x 128 k is dequantised (scale applied) into a 16 KiB L1 scratch
//    in k-major order, then an 8 x 32 register-blocked FMA micro-kernel reuses it for every row of x.
//    Where the CPU has AVX512-BF16, x is exactly bf16 and the scales keep E2M1 x scale a normal bf16, the
//    blocked vdpbf16ps GEMM of bf16_gemm.h runs instead (tiles decoded to bf16, scales folded in).
// The AVX-512 kernels are in fp4_gemm_avx512.cpp.
#include "bf16_gemm.h"
#include "fp4_gemm.h"
#include "fp4_kernels.h"
#include "vec.h"

namespace dsv4rt {
namespace fp4 {

// Generic GEMV layout: per 32-block, the 16 even k then the 16 odd k (low nibble = even k).
void permute_x_pairs(const float* x, int64_t k, float* out) {
    for (int64_t b = 0; b < k; b += 32)
        for (int i = 0; i < 16; ++i) {
            out[b + i] = x[b + 2 * i];
            out[b + 16 + i] = x[b + 2 * i + 1];
        }
}

}  // namespace fp4

namespace {
using namespace fp4;
constexpr int kMR = 8;   // blocked path: rows of x per micro-kernel call

// ------------------------------------------------------------------------------------ generic kernels
template <int M>
__attribute__((always_inline)) inline void gemv_rows_generic_t(const float* xr, int64_t k, const uint8_t* w,
                                                               const uint8_t* s, int64_t n0, int64_t n1, float* y,
                                                               int64_t ldy) {
    const int64_t kb = k / 2, ks = k / 32;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wr = w + n * kb;
        const uint8_t* sr = s + n * ks;
        v16f acc[M];
        for (int m = 0; m < M; ++m) acc[m] = v16f{};
        for (int64_t b = 0; b < ks; ++b) {
            float lo_a[16], hi_a[16];
            for (int i = 0; i < 16; ++i) {
                const uint8_t byte = wr[b * 16 + i];
                lo_a[i] = kE2M1[byte & 15];
                hi_a[i] = kE2M1[byte >> 4];
            }
            const v16f lo = load16(lo_a), hi = load16(hi_a);
            const float sc = kE8M0[sr[b]];
            for (int m = 0; m < M; ++m) {
                const float* xp = xr + m * k + b * 32;
                acc[m] += (lo * load16(xp) + hi * load16(xp + 16)) * sc;
            }
        }
        for (int m = 0; m < M; ++m) y[m * ldy + n] = hsum16(acc[m]);
    }
}

DSV4RT_CLONES void gemv_rows_generic(int m, const float* xr, int64_t k, const uint8_t* w, const uint8_t* s,
                                     int64_t n0, int64_t n1, float* y, int64_t ldy) {
    switch (m) {
        case 1: gemv_rows_generic_t<1>(xr, k, w, s, n0, n1, y, ldy); break;
        case 2: gemv_rows_generic_t<2>(xr, k, w, s, n0, n1, y, ldy); break;
        case 3: gemv_rows_generic_t<3>(xr, k, w, s, n0, n1, y, ldy); break;
        case 4: gemv_rows_generic_t<4>(xr, k, w, s, n0, n1, y, ldy); break;
        case 5: gemv_rows_generic_t<5>(xr, k, w, s, n0, n1, y, ldy); break;
        case 6: gemv_rows_generic_t<6>(xr, k, w, s, n0, n1, y, ldy); break;
        case 7: gemv_rows_generic_t<7>(xr, k, w, s, n0, n1, y, ldy); break;
        default: gemv_rows_generic_t<8>(xr, k, w, s, n0, n1, y, ldy); break;
    }
}

// Dequantise rows [n0, n0 + nvalid) x k [k0, k0 + kw) into wt[kw][kNB] (k-major, scale applied).
void decode_tile_generic(const uint8_t* w, const uint8_t* s, int64_t k, int64_t n0, int64_t nvalid, int64_t k0,
                         int64_t kw, float* wt) {
    const int64_t kb = k / 2, ks = k / 32;
    for (int64_t r = 0; r < kNB; ++r) {
        const int64_t n = n0 + std::min(r, nvalid - 1);
        const uint8_t* wr = w + n * kb + k0 / 2;
        const uint8_t* sr = s + n * ks + k0 / 32;
        for (int64_t c = 0; c < kw / 2; ++c) {
            const float sc = kE8M0[sr[c / 16]];
            wt[(2 * c) * kNB + r] = kE2M1[wr[c] & 15] * sc;
            wt[(2 * c + 1) * kNB + r] = kE2M1[wr[c] >> 4] * sc;
        }
    }
}

// c[r, 0:ncols] (+)= sum_k x[r, k] * wt[k, :] for r < R: an R x 32 register tile (R <= 8).
template <int R>
__attribute__((always_inline)) inline void micro_t(const float* x, int64_t ldx, const float* wt, int64_t kw, float* c,
                                                   int64_t ldc, bool accumulate, int64_t ncols) {
    v16f a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = v16f{};
    for (int64_t kk = 0; kk < kw; ++kk) {
        const v16f b0 = load16(wt + kk * kNB), b1 = load16(wt + kk * kNB + 16);
        for (int r = 0; r < R; ++r) {
            const float xv = x[r * ldx + kk];
            a0[r] += xv * b0;
            a1[r] += xv * b1;
        }
    }
    for (int r = 0; r < R; ++r) {
        float* cr = c + r * ldc;
        if (ncols == kNB) {
            if (accumulate) {
                a0[r] += load16(cr);
                a1[r] += load16(cr + 16);
            }
            store16(cr, a0[r]);
            store16(cr + 16, a1[r]);
        } else {
            for (int64_t j = 0; j < ncols; ++j) {
                const float v = j < 16 ? a0[r][j] : a1[r][j - 16];
                cr[j] = accumulate ? cr[j] + v : v;
            }
        }
    }
}

DSV4RT_CLONES void micro(int rows, const float* x, int64_t ldx, const float* wt, int64_t kw, float* c, int64_t ldc,
                         bool accumulate, int64_t ncols) {
    switch (rows) {
        case 1: micro_t<1>(x, ldx, wt, kw, c, ldc, accumulate, ncols); break;
        case 2: micro_t<2>(x, ldx, wt, kw, c, ldc, accumulate, ncols); break;
        case 3: micro_t<3>(x, ldx, wt, kw, c, ldc, accumulate, ncols); break;
        case 4: micro_t<4>(x, ldx, wt, kw, c, ldc, accumulate, ncols); break;
        case 5: micro_t<5>(x, ldx, wt, kw, c, ldc, accumulate, ncols); break;
        case 6: micro_t<6>(x, ldx, wt, kw, c, ldc, accumulate, ncols); break;
        case 7: micro_t<7>(x, ldx, wt, kw, c, ldc, accumulate, ncols); break;
        default: micro_t<8>(x, ldx, wt, kw, c, ldc, accumulate, ncols); break;
    }
}

// ------------------------------------------------------------------------------------ drivers
void gemv_rows(bool avx512, int m, const float* xr, int64_t k, const uint8_t* w, const uint8_t* s, int64_t n0,
               int64_t n1, float* y, int64_t ldy) {
#if defined(DSV4RT_X86)
    if (avx512) return gemv_rows_avx512(m, xr, k, w, s, n0, n1, y, ldy);
#endif
    gemv_rows_generic(m, xr, k, w, s, n0, n1, y, ldy);
}

void decode_tile(bool avx512, const uint8_t* w, const uint8_t* s, int64_t k, int64_t n0, int64_t nvalid, int64_t k0,
                 int64_t kw, float* wt) {
#if defined(DSV4RT_X86)
    if (avx512) return decode_tile_avx512(w, s, k, n0, nvalid, k0, kw, wt);
#endif
    decode_tile_generic(w, s, k, n0, nvalid, k0, kw, wt);
}

// One tile of the blocked path: y[0:M, n0:n0+32] for one expert.
void blocked_tile(bool avx512, const Fp4Expert& ex, int64_t m_rows, int64_t n0) {
    alignas(64) float wt[kKB * kNB];
    const int64_t nvalid = std::min(kNB, ex.n - n0);
    for (int64_t k0 = 0; k0 < ex.k; k0 += kKB) {
        const int64_t kw = std::min(kKB, ex.k - k0);
        decode_tile(avx512, ex.w, ex.s, ex.k, n0, nvalid, k0, kw, wt);
        for (int64_t m0 = 0; m0 < m_rows; m0 += kMR) {
            const int rows = static_cast<int>(std::min<int64_t>(kMR, m_rows - m0));
            micro(rows, ex.x + m0 * ex.k + k0, ex.k, wt, kw, ex.y + m0 * ex.ldy + n0, ex.ldy, k0 > 0, nvalid);
        }
    }
}

template <class T>
T* align64(std::vector<T>& v) {
    return v.data() + ((64 - reinterpret_cast<uintptr_t>(v.data()) % 64) % 64) / sizeof(T);
}

// x [m][k] as bf16 bits [m][kp] (zero past k) into out, and the smallest biased exponent of a nonzero value;
// false where a value is not a bf16 value
bool x_to_bf16(const float* x, int64_t m, int64_t k, int64_t kp, std::vector<uint16_t>& out, int& min_exp) {
    out.assign(static_cast<size_t>(m * kp), 0);
    uint32_t low = 0, emin = 255;
    for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < k; ++c) {
            uint32_t u;
            std::memcpy(&u, x + r * k + c, 4);
            low |= u & 0xFFFF;
            out[r * kp + c] = static_cast<uint16_t>(u >> 16);
            if (u & 0x7FFFFFFF) emin = std::min(emin, (u >> 23) & 0xFF);
        }
    min_exp = static_cast<int>(emin);
    return low == 0;
}

constexpr int64_t kAllGemv = std::numeric_limits<int64_t>::max();

// The GEMV with every row of x as an expert of its own (one parallel call): the GEMV sums one row
// differently from several, and the lane kernel's choice of weight rows depends on all its rows
void gemv_alone(const std::vector<Fp4Expert>& experts) {
    std::vector<Fp4Expert> one;
    for (const Fp4Expert& e : experts)
        for (int64_t r = 0; r < e.m; ++r) one.push_back({e.x + r * e.k, e.w, e.s, e.y + r * e.ldy, 1, e.n, e.k, e.ldy});
    fp4_gemm_run(one, kAllGemv);
}

// fp4_gemm_run's row_invariant mode (see fp4_gemm.h)
void run_invariant(const std::vector<Fp4Expert>& experts, int64_t few_max) {
    std::vector<Fp4Expert> gemv;
#if defined(DSV4RT_X86)
    if (bf16gemm::available()) {
        for (const Fp4Expert& e : experts) {
            if (e.m <= 0 || e.n <= 0) continue;
            const auto [lo, hi] = e.k > 0 ? scale_range(e) : std::pair<int, int>{0, 0};
            if (e.k == 0 || lo < 2 || hi > 252) {   // zero-fill, or folded weights beyond normal bf16
                gemv.push_back(e);
                continue;
            }
            bf16gemm::run_rows({e.x, false, e.m, e.k, e.n, lo - 1, decode_tile_bf16, decode_tile_bf16_t, &e, e.y, e.ldy,
                                few_rows_bf16},
                               few_max,
                               [&e](const float* x, int64_t rows, float* y) {
                                   gemv_alone({{x, e.w, e.s, y, rows, e.n, e.k, e.n}});
                               });
        }
        if (!gemv.empty()) gemv_alone(gemv);
        return;
    }
#endif
    (void)few_max;
    gemv_alone(experts);
}

}  // namespace

void fp4_gemm_run(const std::vector<Fp4Expert>& experts, int64_t gemv_max_m, bool row_invariant) {
    if (std::any_of(experts.begin(), experts.end(), [](const Fp4Expert& e) { return e.packed; })) {
        std::vector<Fp4Expert> packed, rest;
        for (const Fp4Expert& e : experts) (e.packed ? packed : rest).push_back(e);
        fp4_gemm_run_packed(packed, gemv_max_m);
        if (!rest.empty()) fp4_gemm_run(rest, gemv_max_m, row_invariant);
        return;
    }
    if (row_invariant) return run_invariant(experts, gemv_max_m);
    const bool avx512 = active_isa() >= Isa::avx512;
    std::vector<const Fp4Expert*> gemv, blocked;
    for (const auto& e : experts) {
        if (e.m <= 0 || e.n <= 0) continue;
        if (e.k == 0) {
            for (int64_t r = 0; r < e.m; ++r) std::fill(e.y + r * e.ldy, e.y + r * e.ldy + e.n, 0.0f);
            continue;
        }
        (e.m <= gemv_max_m ? gemv : blocked).push_back(&e);
    }
    if (!gemv.empty()) {
        // x permuted once per call into a 64-byte aligned buffer (rows of k floats per expert)
        std::vector<int64_t> xoff{0}, roff{0};
        for (const Fp4Expert* e : gemv) {
            xoff.push_back(xoff.back() + e->m * e->k);
            roff.push_back(roff.back() + e->n);
        }
        std::vector<float> xbuf(static_cast<size_t>(xoff.back()) + 16);
        float* const xr = align64(xbuf);
        for (size_t i = 0; i < gemv.size(); ++i)
            for (int64_t r = 0; r < gemv[i]->m; ++r) {
                const int64_t k = gemv[i]->k;
                float* dst = xr + xoff[i] + r * k;
#if defined(DSV4RT_X86)
                if (avx512) {
                    permute_x_avx512(gemv[i]->x + r * k, k, dst);
                    continue;
                }
#endif
                permute_x_pairs(gemv[i]->x + r * k, k, dst);
            }
        // AVX512-BF16 + VBMI: the bf16 lane kernel for each expert of 2 or more rows whose x is exactly bf16
        // (act_quant's output is; other float32 x keeps the float32 GEMV, as the blocked path does). One row
        // stays on the float32 GEMV: it decodes fewer instructions per weight and was faster (measured on the
        // 2-core EPYC, 2026-12-06: 0.65-0.75x with the lane kernel at M = 1, 1.05-1.3x at 2, 1.2-1.8x at 4-8)
        std::vector<std::vector<uint16_t>> xb(gemv.size());
        std::vector<int> e_lo(gemv.size(), -1);   // -1: the float32 GEMV
#if defined(DSV4RT_X86)
        if (lane_available())
            for (size_t i = 0; i < gemv.size(); ++i) {
                if (gemv[i]->m < 2) continue;
                const int64_t kp = (gemv[i]->k + 127) / 128 * 128;
                int min_exp = 255;
                if (x_to_bf16(gemv[i]->x, gemv[i]->m, gemv[i]->k, kp, xb[i], min_exp))
                    e_lo[i] = std::max(2, 21 + 128 - min_exp);   // products >= 2^(21 - 127): bf16_gemm.h
                if (e_lo[i] > 252) e_lo[i] = -1;
            }
#endif
        // Blocks of rows handed out dynamically (a thread kept off the CPU by another process does not
        // stall the call); each block is a contiguous run of weight rows, streamed once.
        const int64_t total = roff.back(), threads = max_threads();
        const int64_t rows_per = std::max<int64_t>(16, (total / (threads * 8) + 15) / 16 * 16);
        double bytes = 0;   // weight bytes, weighted by the rows of x; one thread per 512 KiB of it
        for (const Fp4Expert* e : gemv) bytes += static_cast<double>(e->n) * e->k / 2 * (1 + 0.5 * (e->m - 1));
        parallel_tasks((total + rows_per - 1) / rows_per, [&](int64_t blk) {
            const int64_t b = blk * rows_per, e = std::min(total, b + rows_per);
            for (size_t i = 0; i < gemv.size(); ++i) {
                const int64_t lo = std::max(b, roff[i]), hi = std::min(e, roff[i + 1]);
                if (lo >= hi) continue;
                const Fp4Expert& ex = *gemv[i];
#if defined(DSV4RT_X86)
                if (e_lo[i] >= 0) {
                    std::vector<int64_t> bad;
                    lane_rows({xb[i].data(), ex.m, (ex.k + 127) / 128 * 128, ex.w, ex.s, ex.k, e_lo[i], ex.y, ex.ldy},
                              lo - roff[i], hi - roff[i], bad);
                    for (const int64_t n : bad)
                        for (int64_t m0 = 0; m0 < ex.m; m0 += 8)
                            gemv_rows(avx512, static_cast<int>(std::min<int64_t>(8, ex.m - m0)),
                                      xr + xoff[i] + m0 * ex.k, ex.k, ex.w, ex.s, n, n + 1, ex.y + m0 * ex.ldy, ex.ldy);
                    continue;
                }
#endif
                for (int64_t m0 = 0; m0 < ex.m; m0 += 8)
                    gemv_rows(avx512, static_cast<int>(std::min<int64_t>(8, ex.m - m0)), xr + xoff[i] + m0 * ex.k,
                              ex.k, ex.w, ex.s, lo - roff[i], hi - roff[i], ex.y + m0 * ex.ldy, ex.ldy);
            }
        }, pick_threads(bytes, 512 << 10));
    }
#if defined(DSV4RT_X86)
    // AVX512-BF16: the blocked vdpbf16ps GEMM for each expert whose x is exactly bf16, whose scales keep
    // the folded weights normal bf16 and whose products stay normal (the smallest nonzero folded weight,
    // 0.5 * 2^(lo - 127), has the biased exponent lo - 1); the others take the float32 tiles below
    if (!blocked.empty() && bf16gemm::available()) {
        std::vector<const Fp4Expert*> rest;
        for (const Fp4Expert* e : blocked) {
            bf16gemm::PackedX px;
            const auto [lo, hi] = scale_range(*e);
            if (lo >= 2 && hi <= 252 && bf16gemm::pack_x(e->x, false, e->m, e->k, px) &&
                bf16gemm::products_normal(px, lo - 1))
                bf16gemm::gemm(px, e->n, decode_tile_bf16, e, e->y, e->ldy);
            else
                rest.push_back(e);
        }
        blocked.swap(rest);
    }
#endif
    if (!blocked.empty()) {
        std::vector<std::pair<const Fp4Expert*, int64_t>> tiles;
        for (const Fp4Expert* e : blocked)
            for (int64_t n0 = 0; n0 < e->n; n0 += kNB) tiles.emplace_back(e, n0);
        double flops = 0;   // one thread per ~4 MFLOP
        for (const Fp4Expert* e : blocked) flops += 2.0 * e->m * e->n * e->k;
        parallel_tasks(static_cast<int64_t>(tiles.size()), [&](int64_t i) {
            blocked_tile(avx512, *tiles[i].first, tiles[i].first->m, tiles[i].second);
        }, pick_threads(flops, 4e6));
    }
}

}  // namespace dsv4rt
