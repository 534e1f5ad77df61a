// ggml's side of the kernel table in tools/peer_kernels.py: one weight matrix times f32 activations,
// the way llama.cpp runs a quantised linear layer on the CPU.
//
//   peer_kernels TYPE N K M[,M...] THREADS WARMUP REPS [COLD_MB]
//
// TYPE mxfp4 or q8_0. The weight [N, K] is seeded normal data quantised by ggml_quantize_chunk (ggml's own
// quantiser) and placed where llama.cpp's loader would place it: the first of the CPU backend's extra
// buffer types whose supports_op accepts ggml_mul_mat(w, x) (the repack buffer "CPU_REPACK" for MXFP4 on
// AVX2 / AVX-512: 8x8-interleaved blocks, Q8_0 activations), else the plain CPU buffer (Q8_0 on x86: no
// repacked layout; ggml quantises the activations to Q8_0 and runs its vec_dot / llamafile sgemm). The
// activation quantisation is inside every timed call. For each M: WARMUP untimed calls, then REPS timed
// calls of ggml_backend_graph_compute (COLD_MB > 0: a buffer of that many MiB is written before each timed
// call, so the weight is not in cache). Prints, per M,
//   M <m> median_us <t> min_us <t> weight_bytes <b> buffer <name> rel_err <e>
// rel_err: ||y0 - w_f32 @ x0|| / ||w_f32 @ x0|| for row 0 against the unquantised weight (a check that the
// timed graph computes the product; quantisation error, a few percent for MXFP4).
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static void fail(const char * msg) {
    std::fprintf(stderr, "peer_kernels: %s\n", msg);
    std::exit(2);
}

static std::vector<int> parse_ms(const char * s) {
    std::vector<int> ms;
    for (const char * p = s; *p;) {
        char * end = nullptr;
        long v = std::strtol(p, &end, 10);
        if (end == p || v <= 0) fail("M must be a comma-separated list of positive integers");
        ms.push_back((int) v);
        p = *end == ',' ? end + 1 : end;
    }
    return ms;
}

// The buffer type llama.cpp's loader would pick for this weight: an extra buffer type of the CPU device
// whose supports_op accepts the product (probed with a zero-size buffer, as llama.cpp probes), else CPU.
static ggml_backend_buffer_type_t weight_buft(ggml_backend_dev_t dev, ggml_tensor * w) {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (get_extra) {
        ggml_init_params p = {ggml_tensor_overhead() * 4, nullptr, true};
        ggml_context * ctx = ggml_init(p);
        ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, w->ne[0], 512);
        ggml_tensor * y = ggml_mul_mat(ctx, w, x);
        for (ggml_backend_buffer_type_t * b = get_extra(dev); b && *b; ++b) {
            ggml_backend_buffer_t probe = ggml_backend_buft_alloc_buffer(*b, 0);
            w->buffer = probe;
            bool ok = ggml_backend_dev_supports_op(dev, y);
            w->buffer = nullptr;
            ggml_backend_buffer_free(probe);
            if (ok) {
                ggml_free(ctx);
                return *b;
            }
        }
        ggml_free(ctx);
    }
    return ggml_backend_dev_buffer_type(dev);
}

int main(int argc, char ** argv) {
    if (argc < 8) fail("usage: peer_kernels mxfp4|q8_0 N K M[,M...] THREADS WARMUP REPS [COLD_MB]");
    const std::string tname = argv[1];
    const ggml_type type = tname == "mxfp4" ? GGML_TYPE_MXFP4 : tname == "q8_0" ? GGML_TYPE_Q8_0 : GGML_TYPE_COUNT;
    if (type == GGML_TYPE_COUNT) fail("TYPE must be mxfp4 or q8_0");
    const int64_t N = std::atoll(argv[2]), K = std::atoll(argv[3]);
    const std::vector<int> ms = parse_ms(argv[4]);
    const int threads = std::atoi(argv[5]), warmup = std::atoi(argv[6]), reps = std::atoi(argv[7]);
    const size_t cold = argc > 8 ? (size_t) std::atoll(argv[8]) << 20 : 0;
    if (N <= 0 || K <= 0 || K % 32 || threads <= 0 || warmup < 0 || reps <= 0) fail("bad N / K / THREADS / REPS");

    std::mt19937 rng(20261206);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> wf((size_t) (N * K));
    for (float & v : wf) v = nd(rng);
    std::vector<uint8_t> wq(ggml_row_size(type, K) * N);
    ggml_quantize_chunk(type, wf.data(), wq.data(), 0, N, K, nullptr);

    ggml_backend_t be = ggml_backend_cpu_init();
    if (!be) fail("ggml_backend_cpu_init failed");
    ggml_backend_cpu_set_n_threads(be, threads);
    ggml_backend_dev_t dev = ggml_backend_get_device(be);

    ggml_init_params pw = {ggml_tensor_overhead() * 2, nullptr, true};
    ggml_context * ctx_w = ggml_init(pw);
    ggml_tensor * w = ggml_new_tensor_2d(ctx_w, type, K, N);
    ggml_backend_buffer_type_t buft = weight_buft(dev, w);
    ggml_backend_buffer_t buf_w = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, buft);
    if (!buf_w) fail("weight allocation failed");
    ggml_backend_buffer_set_usage(buf_w, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    ggml_backend_tensor_set(w, wq.data(), 0, wq.size());   // the repack buffer repacks here

    std::vector<uint8_t> flush(cold);
    for (int m : ms) {
        ggml_init_params pg = {ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true};
        ggml_context * ctx = ggml_init(pg);
        ggml_tensor * x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, m);
        ggml_set_input(x);
        ggml_tensor * y = ggml_mul_mat(ctx, w, x);
        ggml_set_output(y);
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, y);
        ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
        if (!ggml_gallocr_alloc_graph(ga, gf)) fail("graph allocation failed");
        std::vector<float> xf((size_t) (K * m));
        for (float & v : xf) v = nd(rng);
        ggml_backend_tensor_set(x, xf.data(), 0, xf.size() * sizeof(float));

        for (int i = 0; i < warmup; ++i) ggml_backend_graph_compute(be, gf);
        std::vector<double> us;
        for (int i = 0; i < reps; ++i) {
            if (cold) std::memset(flush.data(), i & 0xff, cold);
            auto t0 = std::chrono::steady_clock::now();
            if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) fail("graph compute failed");
            auto t1 = std::chrono::steady_clock::now();
            us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        }
        std::sort(us.begin(), us.end());

        std::vector<float> y0((size_t) N);
        ggml_backend_tensor_get(y, y0.data(), 0, N * sizeof(float));   // row 0 of y [N, m]
        double num = 0, den = 0;
        for (int64_t n = 0; n < N; ++n) {
            double r = 0;
            for (int64_t k = 0; k < K; ++k) r += (double) wf[(size_t) (n * K + k)] * xf[(size_t) k];
            num += (y0[(size_t) n] - r) * (y0[(size_t) n] - r);
            den += r * r;
        }
        std::printf("M %d median_us %.2f min_us %.2f weight_bytes %zu buffer %s rel_err %.4f\n", m, us[us.size() / 2],
                    us[0], ggml_nbytes(w), ggml_backend_buft_name(buft), std::sqrt(num / std::max(den, 1e-30)));
        std::fflush(stdout);
        ggml_gallocr_free(ga);
        ggml_free(ctx);
    }
    ggml_backend_buffer_free(buf_w);
    ggml_free(ctx_w);
    ggml_backend_free(be);
    return 0;
}
