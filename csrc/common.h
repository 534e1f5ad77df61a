// Shared helpers of dsv4rt._C: argument checks that raise clear Python exceptions, the thread pool
// (OpenMP when the build found it, else std::thread), CPU-feature dispatch, and small number formats.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dsv4rt {
namespace py = pybind11;

// ------------------------------------------------------------------------------------------- dispatch
// target_clones builds one copy of a function per ISA and picks it at load time (GNU ifunc): the wheel
// runs on any x86-64 and uses AVX-512 / AVX2 where present, with no -march=native in the build.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(DSV4RT_NO_CLONES)
#define DSV4RT_X86 1
#define DSV4RT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DSV4RT_CLONES
#endif

enum class Isa { generic = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };   // avx512_bf16: AVX-512 + AVX512-BF16
Isa detected_isa();   // what the CPU supports
Isa active_isa();     // detected, or lowered by set_isa() (tests)
void set_isa(Isa isa);
const char* isa_name(Isa isa);

// ------------------------------------------------------------------------------------------- threads
// Threads to use: OpenMP's setting when built with OpenMP (it follows torch.set_num_threads, since torch
// and this extension share the process's libgomp), else the hardware thread count.
int max_threads();

// How parallel work is run.
//  * `openmp`: `#pragma omp parallel` with a dynamic schedule. torch uses the same libgomp in this
//    process, so kernels run on torch's worker threads, still spinning after the last torch op: no
//    wake-up and no extra threads competing for the cores. But the region's implicit barrier waits until
//    every team thread has been scheduled once: milliseconds per call when other processes keep the
//    cores busy.
//  * `pool`: a std::thread pool whose calls end as soon as every task is done (the calling thread works
//    too), so a helper kept off the CPU costs nothing; but right after a torch op its helpers compete
//    with torch's spinning OpenMP workers. The only mode of builds without OpenMP.
//  * `automatic` (default with OpenMP): openmp, switching to the pool for a second after two calls in a
//    row waited more than 1 ms at the barrier for a stalled team thread.
enum class Threading { pool = 0, openmp = 1, automatic = 2 };
Threading threading_mode();
void set_threading_mode(Threading mode);
bool have_openmp();

// Threads worth using for `work` units when one thread should get at least `grain` of them: small calls
// stay on the calling thread (waking helpers costs microseconds).
inline int64_t pick_threads(double work, double grain) {
    const double n = grain > 0 ? work / grain : work;
    return std::max<int64_t>(1, std::min<int64_t>(max_threads(), static_cast<int64_t>(n)));
}

using TaskFn = void (*)(void* ctx, int64_t i);
// run(ctx, i) for i in [0, n) on at most `threads` threads (0: max_threads()), dynamically scheduled.
void run_tasks(int64_t n, int64_t threads, TaskFn run, void* ctx);

// f(i) for i in [0, n), dynamically scheduled over at most `threads` threads (0: all).
template <class F>
void parallel_tasks(int64_t n, F&& f, int64_t threads = 0) {
    if (n <= 0) return;
    using Fn = std::remove_reference_t<F>;
    run_tasks(n, threads, [](void* ctx, int64_t i) { (*static_cast<Fn*>(ctx))(i); }, const_cast<void*>(static_cast<const void*>(&f)));
}

// f(begin, end) over [0, n) in contiguous slices (a few per thread, dynamically scheduled).
template <class F>
void parallel_for(int64_t n, F&& f, int64_t threads = 0) {
    if (n <= 0) return;
    const int64_t nt = std::min<int64_t>(threads > 0 ? threads : max_threads(), n);
    if (nt <= 1) {
        f(int64_t(0), n);
        return;
    }
    const int64_t slices = std::min<int64_t>(n, 4 * nt);
    parallel_tasks(slices, [&](int64_t i) { f(n * i / slices, n * (i + 1) / slices); }, nt);
}

// ------------------------------------------------------------------------------------------- checks
// Every raw _C function validates its NumPy arguments before releasing the GIL and raises
// TypeError (wrong type / dtype) or ValueError (shape, contiguity, ranges) naming function and argument.
enum class Kind { f32, bf16, u8, i32, any };

struct Arg {
    const char* fn;
    const char* name;
};

[[noreturn]] void type_error(const Arg& a, const std::string& msg);
[[noreturn]] void value_error(const Arg& a, const std::string& msg);

std::string shape_str(const py::array& arr);
std::string dtype_str(const py::array& arr);

// arr must be a C-contiguous NumPy array of rank `ndim` and one of the dtypes; returns it.
py::array need(const Arg& a, const py::handle& obj, int ndim, std::initializer_list<Kind> kinds, bool writable = false);
void need_shape(const Arg& a, const py::array& arr, std::initializer_list<int64_t> dims, const char* meaning);
Kind kind_of(const py::array& arr);   // f32, bf16 (int16/uint16 bits), u8 (uint8/int8), i32 or any
bool is_none(const py::handle& obj);

inline int64_t dim(const py::array& a, int i) { return static_cast<int64_t>(a.shape(i)); }

// ------------------------------------------------------------------------------------------- formats
inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

// float32 -> bf16 bits, round to nearest even (as torch); NaN stays a quiet NaN
inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Whole-array conversions (vectorised, split over threads when large); for bf16 inputs and outputs of
// the Python wrappers, so a call needs no NumPy conversion of its own.
void bf16_to_f32_array(const uint16_t* src, float* dst, int64_t n);
void f32_to_bf16_array(const float* src, uint16_t* dst, int64_t n);

// act_quant='fp8' in place on the float32 rows x[m, k] (act_quant.cpp): each block-wide K block of a row
// (128 V4, 32 V4.1) becomes q * s, bit-identical to dsv4rt.formats.act_quant_fp8(x, block)
void act_quant_fp8_rows(float* x, int64_t m, int64_t k, int64_t block = 128);

// A float32 view of a float32 or bf16-bits array: the data itself, or a copy converted by load()
// (which runs without the GIL; the constructor reads the array with it).
struct F32In {
    std::vector<float> buf;
    const void* data;
    bool bf16;
    int64_t n;
    const float* ptr = nullptr;
    explicit F32In(const py::array& a) : data(a.data()), bf16(kind_of(a) == Kind::bf16), n(a.size()) {}
    void load() {
        if (bf16) {
            buf.resize(static_cast<size_t>(n));
            bf16_to_f32_array(static_cast<const uint16_t*>(data), buf.data(), n);
            ptr = buf.data();
        } else {
            ptr = static_cast<const float*>(data);
        }
    }
    // load() for the GEMMs: with act_quant, a copy of the [m, k] rows after act_quant='fp8' with 1 x block
    // scales (the input is never written)
    void load_gemm(bool act_quant, int64_t m, int64_t k, int64_t block = 128) {
        if (!act_quant) return load();
        buf.resize(static_cast<size_t>(n));
        if (bf16) bf16_to_f32_array(static_cast<const uint16_t*>(data), buf.data(), n);
        else std::copy(static_cast<const float*>(data), static_cast<const float*>(data) + n, buf.begin());
        act_quant_fp8_rows(buf.data(), m, k, block);
        ptr = buf.data();
        bf16 = false;
    }
};

// A float32 output buffer for a float32 or bf16-bits output array: the array itself, or scratch that
// finish() rounds into it.
struct F32Out {
    std::vector<float> buf;
    float* ptr = nullptr;
    uint16_t* bits = nullptr;
    int64_t n = 0;
    explicit F32Out(py::array& a) : n(a.size()) {
        if (kind_of(a) == Kind::bf16) {
            buf.resize(static_cast<size_t>(n));
            ptr = buf.data();
            bits = static_cast<uint16_t*>(a.mutable_data());
        } else {
            ptr = static_cast<float*>(a.mutable_data());
        }
    }
    void finish() {
        if (bits) f32_to_bf16_array(ptr, bits, n);
    }
};

// float(E2M1 code) for codes 0..15 (spec 1.1)
extern const float kE2M1[16];
// 2^(e - 127) for E8M0 byte e (255 -> NaN)
extern float kE8M0[256];
// float(E4M3 byte), finite bytes only (0x7F / 0xFF are NaN)
extern float kE4M3[256];

}  // namespace dsv4rt
