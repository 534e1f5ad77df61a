// dsv4rt._C: native CPU kernels for the cpu backend (the cpu/native variant).
#include "common.h"

namespace py = pybind11;

namespace dsv4rt {
void bind_gemm(py::module_& m);
void bind_fp8_gemm(py::module_& m);
void bind_indexer(py::module_& m);
void bind_candidates(py::module_& m);
void bind_attention(py::module_& m);
void bind_moe(py::module_& m);
void bind_evict(py::module_& m);
void bind_compress(py::module_& m);
void bind_route(py::module_& m);
void bind_act_quant(py::module_& m);
void bind_peak(py::module_& m);
void bind_engram(py::module_& m);
void bind_dense_gemm(py::module_& m);
void bind_mhc(py::module_& m);
void bind_glue_quant(py::module_& m);
void bind_dense_packed(py::module_& m);
void bind_glue_rope(py::module_& m);
void bind_glue_mxsim(py::module_& m);
void bind_glue_bf16_packed(py::module_& m);
void bind_dense_fp8_packed(py::module_& m);
}  // namespace dsv4rt

PYBIND11_MODULE(_C, m) {
    using namespace dsv4rt;
    m.doc() = "dsv4rt native CPU kernels (NumPy buffers in, GIL released while they run)";
    m.attr("ABI_VERSION") = 7;   // 2: sparse_attention p_round, indexer_topk score_bf16; 3: fp8_gemm;
                                 // 4: kv_compress, moe_route; 5: act_quant in the GEMMs, avx512_bf16, peak_gflops;
                                 // 6: row_invariant in the GEMMs and sparse_attention, dense_gemm;
                                 // 7: the packed MXFP4 layout (fp4_pack, packed= in the FP4 GEMMs)
    m.def("compiled_with", []() {
        py::dict info;
        info["cxx_standard"] = __cplusplus;
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        info["isa"] = isa_name(detected_isa());
        info["active_isa"] = isa_name(active_isa());
        info["threads"] = max_threads();
        static const char* names[] = {"pool", "openmp", "automatic"};
        info["threading"] = names[static_cast<int>(threading_mode())];
        return info;
    }, "Build and run-time facts of the extension (C++ standard, OpenMP, detected and active ISA, threads).");
    m.def("set_isa", [](const std::string& name) {
        const std::string before = isa_name(active_isa());
        if (name == "avx512_bf16") set_isa(Isa::avx512_bf16);
        else if (name == "avx512") set_isa(Isa::avx512);
        else if (name == "avx2") set_isa(Isa::avx2);
        else if (name == "generic") set_isa(Isa::generic);
        else throw py::value_error("dsv4rt._C.set_isa: argument 'name' must be 'avx512_bf16', 'avx512', 'avx2' or 'generic', got '" + name + "'");
        return before;
    }, py::arg("name"),
       "Use at most this instruction set for the hand-written kernels (capped at what the CPU has); returns the "
       "previous setting. For tests and comparisons.");
    m.def("set_threading", [](const std::string& name) {
        static const char* names[] = {"pool", "openmp", "automatic"};
        const std::string before = names[static_cast<int>(threading_mode())];
        if (name == "pool") set_threading_mode(Threading::pool);
        else if ((name == "openmp" || name == "automatic") && !have_openmp())
            throw py::value_error("dsv4rt._C.set_threading: argument 'name': this build has no OpenMP (only 'pool')");
        else if (name == "openmp") set_threading_mode(Threading::openmp);
        else if (name == "automatic") set_threading_mode(Threading::automatic);
        else throw py::value_error("dsv4rt._C.set_threading: argument 'name' must be 'automatic', 'openmp' or 'pool', got '" + name + "'");
        return before;
    }, py::arg("name"),
       "How kernels run in parallel: 'automatic' (default in OpenMP builds: OpenMP on torch's own worker threads,\n"
       "falling back to the pool for a second when a call waited > 1 ms for a thread another process kept off\n"
       "the CPU), 'openmp', or 'pool' (std::thread pool; calls end when their tasks are done; the only mode\n"
       "without OpenMP). Returns the previous setting.");
    bind_gemm(m);
    bind_fp8_gemm(m);
    bind_indexer(m);
    bind_candidates(m);
    bind_attention(m);
    bind_moe(m);
    bind_evict(m);
    bind_compress(m);
    bind_route(m);
    bind_act_quant(m);
    bind_peak(m);
    bind_engram(m);
    bind_dense_gemm(m);
    bind_mhc(m);
    bind_glue_quant(m);
    bind_dense_packed(m);
    bind_glue_rope(m);
    bind_glue_mxsim(m);
    bind_glue_bf16_packed(m);
    bind_dense_fp8_packed(m);
}
