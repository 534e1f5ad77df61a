// dsv4rt._C: native CPU kernels for the cpu backend (the cpu/native variant).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "dsv4rt native CPU kernels";
    m.attr("ABI_VERSION") = 1;
    m.def("compiled_with", []() {
        py::dict info;
        info["cxx_standard"] = __cplusplus;
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        return info;
    }, "Build facts of the extension (C++ standard, OpenMP).");
}
