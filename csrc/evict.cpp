// evict: write back and drop a memory range from every cache level (clflush per 64-byte line), so a
// benchmark can time an op on cold data while the runtime's own code and state stay warm, as a GPU
// benchmark's L2 flush does (dsv4rt bench on CPU; see runtime/bench/timing.py).
#include "common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DSV4RT_HAVE_CLFLUSH 1
#endif

namespace dsv4rt {

static bool evict_range(uintptr_t addr, int64_t nbytes) {
#if defined(DSV4RT_HAVE_CLFLUSH)
    if (nbytes <= 0) return true;
    const uintptr_t end = addr + static_cast<uintptr_t>(nbytes);
    for (uintptr_t p = addr & ~uintptr_t(63); p < end; p += 64) _mm_clflush(reinterpret_cast<const void*>(p));
    _mm_mfence();
    return true;
#else
    (void)addr;
    (void)nbytes;
    return false;
#endif
}

void bind_evict(py::module_& m) {
    m.def("evict", [](uintptr_t addr, int64_t nbytes) {
        py::gil_scoped_release nogil;
        return evict_range(addr, nbytes);
    }, py::arg("addr"), py::arg("nbytes"),
       "Flush [addr, addr + nbytes) out of every cache level (x86-64 clflush); the range must be memory this\n"
       "process owns (a tensor's data_ptr() and nbytes). Returns False where the CPU has no such instruction.");
}

}  // namespace dsv4rt
