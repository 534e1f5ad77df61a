"""Build hook for the optional native extension dsv4rt._C (see csrc/).

Everything else lives in pyproject.toml. The extension is optional: if the C++ build fails,
the package still installs and the CPU backend runs its NumPy variant (`dsv4rt info` says why).

Flags: -O3 and -ffp-contract=fast let the compiler vectorise and fuse multiply-adds; no -march=native
(the wheel may run on another CPU): the kernels pick AVX-512 / AVX2 code at run time (target_clones and
__builtin_cpu_supports). OpenMP is used when a test compile with -fopenmp succeeds, else std::thread.

Install-time output: the csrc/*.cpp files compile in parallel (DSV4RT_BUILD_JOBS jobs, default the CPU count),
and each finished file, the total time and the result (built, or FAILED and why the package still installs)
are printed on stderr and, because pip hides a build's output unless run with -v, also on the terminal
(/dev/tty) when there is one.
"""
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

_told_tty = False


def announce(msg: str) -> None:
    """One line on stderr and, when stderr is not the terminal (pip captures it), on the terminal as well."""
    global _told_tty
    line = f"dsv4rt._C: {msg}"
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:  # no terminal (CI, a pipe): stderr above is all there is
            tty.write(("" if _told_tty else "\n") + line + "\n")
            _told_tty = True
    except OSError:
        pass


def build_jobs() -> int:
    """DSV4RT_BUILD_JOBS, else the CPUs this process may use."""
    raw = os.environ.get("DSV4RT_BUILD_JOBS", "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            announce(f"DSV4RT_BUILD_JOBS={raw!r} is not a number; using the CPU count")
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parallel_compile(compiler, jobs: int):
    """A ``compile`` method for ``compiler`` that runs up to ``jobs`` compiler processes at once and prints
    each finished file; same arguments and result as distutils' ``CCompiler.compile``."""

    def compile_sources(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                        extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        todo = [obj for obj in objects if obj in build]
        t0, done = time.perf_counter(), []

        def one(obj):
            src, ext = build[obj]
            start = time.perf_counter()
            compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
            done.append(obj)
            announce(f"[{len(done)}/{len(todo)}] {src} ({time.perf_counter() - start:.0f} s; "
                     f"{time.perf_counter() - t0:.0f} s in all)")

        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(todo)))) as pool:
            futures = [pool.submit(one, obj) for obj in todo]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
        return objects

    return compile_sources


try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pybind11 missing from the build environment: install without the extension
    announce("pybind11 is not in the build environment: installing WITHOUT the native CPU kernels (cpu/numpy "
             "and cpu/torch run instead; pip install pybind11, then reinstall, to build them)")
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
            announce(f"OpenMP {'enabled' if omp else 'not available, using std::thread'}")
            super().build_extensions()

        def build_extension(self, ext) -> None:
            jobs = 1 if self.compiler.compiler_type == "msvc" else build_jobs()  # MSVC: its own compile()
            announce(f"compiling {len(ext.sources)} C++ files with {jobs} parallel jobs (DSV4RT_BUILD_JOBS; "
                     f"minutes on 2 cores), then linking")
            if self.compiler.compiler_type != "msvc":
                self.compiler.compile = parallel_compile(self.compiler, jobs)
            t0 = time.perf_counter()
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - reported, then handled as before (optional extension)
                bar = "!" * 100
                for line in (bar, f"the native CPU kernels FAILED to build after {time.perf_counter() - t0:.0f} s: "
                             f"{type(exc).__name__}: {str(exc)[:500]}",
                             "dsv4rt still installs and runs: the CPU backend uses cpu/numpy and cpu/torch (much "
                             "slower). `dsv4rt info` repeats why; rerun pip with -v to see the compiler output.", bar):
                    announce(line)
                raise
            announce(f"built the native CPU kernels ({ext.name}) in {time.perf_counter() - t0:.0f} s")

        def copy_file(self, infile, outfile, *args, **kwargs):
            """Install the built library under a new inode (copy beside it, then rename): copying over the old
            file in place would change the pages of every running process that has it mapped (a crash, not an
            error). Processes keep their old library; new ones load the new."""
            if not str(outfile).endswith((".so", ".pyd", ".dylib")) or getattr(self, "dry_run", False):
                return super().copy_file(infile, outfile, *args, **kwargs)
            target = os.path.join(outfile, os.path.basename(infile)) if os.path.isdir(outfile) else outfile
            tmp = f"{target}.{os.getpid()}.tmp"
            try:
                result = super().copy_file(infile, tmp, *args, **kwargs)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return (target, result[1]) if isinstance(result, tuple) else result

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
