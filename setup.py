"""Build hook for the optional native extension dsv4rt._C (see csrc/).

Everything else lives in pyproject.toml. The extension is optional: if the C++ build fails,
the package still installs and the CPU backend runs its NumPy variant (`dsv4rt info` says why).

Flags: -O3 and -ffp-contract=fast let the compiler vectorise and fuse multiply-adds; no -march=native
(the wheel may run on another CPU): the kernels pick AVX-512 / AVX2 code at run time (target_clones and
__builtin_cpu_supports). OpenMP is used when a test compile with -fopenmp succeeds, else std::thread.
"""
import os
import sys
import tempfile

from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pybind11 missing from the build environment: install without the extension
    ext_modules, cmdclass = [], {}
else:
    import glob

    class BuildExt(build_ext):
        """build_ext that adds OpenMP flags when the compiler accepts them (checked by a test compile)."""

        def _compiles(self, flags: list[str]) -> bool:
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "omp_probe.cpp")
                with open(src, "w") as f:
                    f.write("#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel reduction(+:n)\n"
                            "n += omp_get_num_threads();\nreturn n > 0 ? 0 : 1; }\n")
                try:
                    objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
                    self.compiler.link_executable(objs, os.path.join(tmp, "omp_probe"), extra_postargs=flags)
                except Exception:  # noqa: BLE001 - any compiler or linker failure means "no OpenMP"
                    return False
            return True

        def build_extensions(self) -> None:
            flags = ["/openmp"] if self.compiler.compiler_type == "msvc" else ["-fopenmp"]
            omp = self._compiles(flags)
            for ext in self.extensions:
                if omp:
                    ext.extra_compile_args += flags
                    ext.extra_link_args += flags
                ext.define_macros.append(("DSV4RT_OPENMP_PROBED", "1" if omp else "0"))
            print(f"dsv4rt._C: OpenMP {'enabled' if omp else 'not available, using std::thread'}", file=sys.stderr)
            super().build_extensions()

    unix_flags = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi"]
    ext_modules = [
        Pybind11Extension(
            "dsv4rt._C",
            sorted(glob.glob("csrc/*.cpp")),
            depends=sorted(glob.glob("csrc/*.h")),
            cxx_std=17,
            extra_compile_args=[] if sys.platform == "win32" else unix_flags,
        )
    ]
    for ext in ext_modules:
        ext.optional = True
    cmdclass = {"build_ext": BuildExt}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
