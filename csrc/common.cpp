// Argument checks, ISA detection and format tables of dsv4rt._C (threads: threads.cpp).
#include "common.h"

#include <cmath>
#include <limits>

namespace dsv4rt {

// ------------------------------------------------------------------------------------------- dispatch
static Isa detect() {
#if defined(DSV4RT_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return __builtin_cpu_supports("avx512bf16") ? Isa::avx512_bf16 : Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
    return Isa::generic;
}

static Isa g_detected = detect();
static std::atomic<int> g_active{static_cast<int>(g_detected)};

Isa detected_isa() { return g_detected; }
Isa active_isa() { return static_cast<Isa>(g_active.load(std::memory_order_relaxed)); }
void set_isa(Isa isa) { g_active.store(static_cast<int>(std::min(isa, g_detected))); }

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::avx512_bf16: return "avx512_bf16";
        case Isa::avx512: return "avx512";
        case Isa::avx2: return "avx2";
        default: return "generic";
    }
}

// ------------------------------------------------------------------------------------------- checks
void type_error(const Arg& a, const std::string& msg) {
    throw py::type_error(std::string("dsv4rt._C.") + a.fn + ": argument '" + a.name + "' " + msg);
}

void value_error(const Arg& a, const std::string& msg) {
    throw py::value_error(std::string("dsv4rt._C.") + a.fn + ": argument '" + a.name + "' " + msg);
}

std::string shape_str(const py::array& arr) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < arr.ndim(); ++i) {
        if (i) s += ", ";
        s += std::to_string(arr.shape(i));
    }
    if (arr.ndim() == 1) s += ",";
    return s + ")";
}

std::string dtype_str(const py::array& arr) { return py::str(arr.dtype()).cast<std::string>(); }

bool is_none(const py::handle& obj) { return obj.is_none(); }

Kind kind_of(const py::array& arr) {
    const py::dtype dt = arr.dtype();
    const char k = dt.kind();
    const auto size = dt.itemsize();
    if (k == 'f' && size == 4) return Kind::f32;
    if ((k == 'i' || k == 'u') && size == 2) return Kind::bf16;
    if ((k == 'i' || k == 'u') && size == 1) return Kind::u8;
    if (k == 'i' && size == 4) return Kind::i32;
    return Kind::any;
}

static const char* kind_name(Kind k) {
    switch (k) {
        case Kind::f32: return "float32";
        case Kind::bf16: return "int16/uint16 (bf16 bits)";
        case Kind::u8: return "uint8/int8";
        case Kind::i32: return "int32";
        default: return "any";
    }
}

py::array need(const Arg& a, const py::handle& obj, int ndim, std::initializer_list<Kind> kinds, bool writable) {
    if (!py::isinstance<py::array>(obj))
        type_error(a, std::string("must be a numpy.ndarray, got ") + py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (arr.ndim() != ndim)
        value_error(a, "must have rank " + std::to_string(ndim) + ", got shape " + shape_str(arr));
    const Kind k = kind_of(arr);
    bool ok = false;
    std::string allowed;
    for (Kind want : kinds) {
        ok = ok || want == Kind::any || want == k;
        allowed += (allowed.empty() ? "" : " or ") + std::string(kind_name(want));
    }
    if (!ok) type_error(a, "must have dtype " + allowed + ", got " + dtype_str(arr));
    if (!(arr.flags() & py::array::c_style))
        value_error(a, "must be C-contiguous (got strides of a view; pass numpy.ascontiguousarray(...))");
    if (writable && !arr.writeable()) value_error(a, "must be writable");
    if (reinterpret_cast<uintptr_t>(arr.data()) % std::max<py::ssize_t>(1, std::min<py::ssize_t>(arr.itemsize(), 4)))
        value_error(a, "must be aligned to its element size");
    return arr;
}

void need_shape(const Arg& a, const py::array& arr, std::initializer_list<int64_t> dims, const char* meaning) {
    bool ok = static_cast<size_t>(arr.ndim()) == dims.size();
    int i = 0;
    std::string want = "(";
    for (int64_t d : dims) {
        ok = ok && arr.shape(i) == d;
        want += (i ? ", " : "") + std::to_string(d);
        ++i;
    }
    want += dims.size() == 1 ? ",)" : ")";
    if (!ok) value_error(a, std::string("must have shape ") + meaning + " = " + want + ", got " + shape_str(arr));
}

// ------------------------------------------------------------------------------------------- formats
namespace {
DSV4RT_CLONES void widen_slice(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}
DSV4RT_CLONES void narrow_slice(const float* src, uint16_t* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}
}  // namespace

void bf16_to_f32_array(const uint16_t* src, float* dst, int64_t n) {
    parallel_for(n, [&](int64_t lo, int64_t hi) { widen_slice(src + lo, dst + lo, hi - lo); },
                 pick_threads(static_cast<double>(n), 1 << 20));
}

void f32_to_bf16_array(const float* src, uint16_t* dst, int64_t n) {
    parallel_for(n, [&](int64_t lo, int64_t hi) { narrow_slice(src + lo, dst + lo, hi - lo); },
                 pick_threads(static_cast<double>(n), 1 << 20));
}

const float kE2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                         -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

float kE8M0[256];
float kE4M3[256];

static const bool g_tables_ready = [] {
    for (int e = 0; e < 256; ++e) {
        kE8M0[e] = e == 255 ? std::numeric_limits<float>::quiet_NaN() : std::ldexp(1.0f, e - 127);
        const int sign = e >> 7, exp = (e >> 3) & 15, man = e & 7;
        float v;
        if (exp == 15 && man == 7) v = std::numeric_limits<float>::quiet_NaN();
        else if (exp == 0) v = std::ldexp(static_cast<float>(man), -9);
        else v = std::ldexp(1.0f + man / 8.0f, exp - 7);
        kE4M3[e] = sign ? -v : v;
    }
    return true;
}();
}  // namespace dsv4rt
