"""Build hook for the optional native extension dsv4rt._C (see csrc/).

Everything else lives in pyproject.toml. The extension is optional: if the C++ build fails,
the package still installs and the CPU backend runs its NumPy variant (`dsv4rt info` says why).
"""
from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pybind11 missing from the build environment: install without the extension
    ext_modules, cmdclass = [], {}
else:
    import glob

    ext_modules = [
        Pybind11Extension(
            "dsv4rt._C",
            sorted(glob.glob("csrc/*.cpp")),
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]
    for ext in ext_modules:
        ext.optional = True
    cmdclass = {"build_ext": build_ext}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
