"""The CPU backend: NumPy implementations of every v1 op (``cpu/numpy``), plus the plain-torch
``cpu/torch`` variants from ``dsv4rt.backends.composite``.

Tensors arrive as torch CPU tensors and are viewed as NumPy without a copy where the dtype allows
(bf16 is converted to float32 once; FP4/FP8/E8M0 are viewed as bytes and decoded by
``dsv4rt.formats``). Nothing heavy is imported until :meth:`CpuBackend.load`.
"""
from __future__ import annotations

import importlib.util

from dsv4rt.backend import Backend, Probe, Registrar

__all__ = ["CpuBackend", "backend"]

NUMPY_PRIORITY = 10
COMPOSITE_PRIORITY = 5


class CpuBackend(Backend):
    """NumPy on the host CPU: always available where NumPy imports."""

    name = "cpu"
    device_type = "cpu"
    description = "NumPy CPU implementations (float32 accumulation), plus the composite torch variants"

    def probe(self) -> Probe:
        """Available wherever NumPy imports; reports the NumPy version and whether dsv4rt._C exists."""
        try:
            import numpy
        except ImportError as exc:  # numpy is a dependency; this only guards broken installs
            return Probe(False, f"numpy does not import: {exc}")
        try:
            native = importlib.util.find_spec("dsv4rt._C") is not None
        except (ImportError, ValueError):
            native = False
        return Probe(True, "numpy is available", {"numpy": numpy.__version__, "native": native})

    def load(self, registrar: Registrar) -> None:
        """Register the ``numpy`` variant of all nine ops (priority 10), then the composite ``torch`` ones."""
        from . import attention, gemm, indexer, moe

        for module, ops in ((gemm, ("fp4_gemm", "fp4_grouped_gemm", "fp8_gemm")),
                            (indexer, ("indexer_topk",)),
                            (attention, ("kv_compress", "sparse_attention")),
                            (moe, ("moe_route", "moe_dispatch", "moe_combine"))):
            for op in ops:
                registrar.implement(op, "numpy", getattr(module, op), priority=NUMPY_PRIORITY)

        from dsv4rt.backends import composite

        composite.register(registrar, priority=COMPOSITE_PRIORITY)


def backend() -> CpuBackend:
    """Plug-in entry point: a zero-argument callable returning the backend."""
    return CpuBackend()
