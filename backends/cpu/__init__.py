"""The CPU backend: NumPy implementations of every v1 op (``cpu/numpy``), native C++ fast paths for the
hot ops (``cpu/native``, from the optional extension ``dsv4rt._C``), plus the plain-torch ``cpu/torch``
variants from ``dsv4rt.backends.composite``.

Tensors arrive as torch CPU tensors and are viewed as NumPy without a copy where the dtype allows
(bf16 is converted to float32 once; FP4/FP8/E8M0 are viewed as bytes and decoded by
``dsv4rt.formats``). Nothing heavy is imported until :meth:`CpuBackend.load`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from dsv4rt.backend import Backend, Probe, Registrar

__all__ = ["CpuBackend", "backend", "native_status", "native_isa", "native_isa_cap"]

log = logging.getLogger("dsv4rt")

NATIVE_PRIORITY = 20
NUMPY_PRIORITY = 10
COMPOSITE_PRIORITY = 5
NATIVE_ABI = 7
NATIVE_OPS = ("fp4_gemm", "fp4_grouped_gemm", "fp8_gemm", "indexer_topk", "indexer_scores", "select_candidate_blocks",
              "kv_compress", "sparse_attention", "moe_route", "moe_dispatch", "moe_combine",
              "engram_hash", "engram_lookup")


def native_status() -> tuple[bool, str]:
    """(available, reason) of the native kernels: whether ``dsv4rt._C`` imports and matches this source."""
    try:
        from dsv4rt import _C
    except Exception as exc:  # ImportError when not built; OSError/ImportError for a broken or foreign build
        return False, (f"dsv4rt._C does not import ({type(exc).__name__}: {exc}); the optional C++ extension was "
                       "not built or does not load here, so cpu/numpy runs instead. Rebuild with "
                       "`pip install --no-build-isolation -e .` (needs a C++17 compiler and pybind11)")
    abi = getattr(_C, "ABI_VERSION", None)
    if abi != NATIVE_ABI:
        return False, f"dsv4rt._C is a stale build (ABI_VERSION {abi}, this source needs {NATIVE_ABI}); rebuild it"
    info = _C.compiled_with()
    return True, (f"dsv4rt._C loaded: {info['active_isa']} kernels, {info['threading']} threading, "
                  f"{info['threads']} threads")


def native_isa() -> str | None:
    """The instruction-set level the native kernels run at (``"avx512_bf16"``, ``"avx512"``, ``"avx2"``,
    ``"generic"``: ``_C.compiled_with()["active_isa"]``), or None where ``dsv4rt._C`` is not usable."""
    if not native_status()[0]:
        return None
    from dsv4rt import _C
    return _C.compiled_with()["active_isa"]


@contextlib.contextmanager
def native_isa_cap(isa: str) -> Iterator[None]:
    """Inside the block the native kernels use at most ``isa`` (``_C.set_isa``); the previous level after."""
    from dsv4rt import _C
    before = _C.set_isa(isa)
    try:
        yield
    finally:
        _C.set_isa(before)


class CpuBackend(Backend):
    """NumPy on the host CPU: always available where NumPy imports."""

    name = "cpu"
    device_type = "cpu"
    description = ("C++ kernels (dsv4rt._C) for the hot ops and NumPy implementations of every op (float32 "
                   "accumulation), plus the composite torch variants")
    prepared_variants = ("native",)   # the packed MXFP4 layout is for cpu/native's kernels

    def probe(self) -> Probe:
        """Available wherever NumPy imports; reports the NumPy version and whether the native kernels
        (dsv4rt._C) load (``native``) and why not (``native_reason``, the import error)."""
        try:
            import numpy
        except ImportError as exc:  # numpy is a dependency; this only guards broken installs
            return Probe(False, f"numpy does not import: {exc}")
        native, why = native_status()
        return Probe(True, "numpy is available",
                     {"numpy": numpy.__version__, "native": native, "native_reason": why})

    def offers(self) -> dict[str, tuple[str, ...]]:
        """numpy and torch for every op; native for the ops dsv4rt._C implements (where it built)."""
        from dsv4rt.registry import REGISTRY

        return {op: (("native",) if op in NATIVE_OPS else ()) + ("numpy", "torch") for op in REGISTRY.specs}

    def prepare_weight(self, op: str, w: Any, w_scale: Any, block_size: int = 128) -> Any:
        """The model's load-time hook (``dsv4rt.prepare``): an MXFP4 weight (``fp4_gemm``, ``fp4_grouped_gemm``)
        is packed in place for ``cpu/native``'s kernels and returned as a
        :class:`~dsv4rt.backends.cpu.packed.PackedMXFP4`, which every other variant reads as the released
        tensor (``backends/cpu/packed.py``); where it cannot be (another op, the CPU, the shape, the scales,
        DSV4RT_CPU_PACK_FP4=0) ``w`` itself, the reason logged at debug level."""
        from .packed import pack_mxfp4, packable

        why = packable(op, w, w_scale)
        if why is not None:
            log.debug("dsv4rt: cpu keeps a released %s weight %s: %s", op, tuple(w.shape), why)
            return w
        return pack_mxfp4(w)

    def prepare_inputs(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Conformance and bench hand the GEMMs released weights: an MXFP4 weight that
        :meth:`prepare_weight` would pack is packed (a copy: the caller's tensor is left as it is), so the
        variants run on what the model runs on."""
        from .packed import FP4_OPS, packable

        if op not in FP4_OPS or packable(op, args["w"], args["w_scale"]) is not None:
            return args
        return dict(args, w=self.prepare_weight(op, args["w"].clone(), args["w_scale"]))

    def load(self, registrar: Registrar) -> None:
        """Register the ``native`` variants (priority 20) when dsv4rt._C loads, the ``numpy`` variant of all
        nine ops (priority 10), then the composite ``torch`` ones."""
        from . import attention, engram, gemm, indexer, moe

        if native_status()[0]:
            from . import native as native_impl

            for op in NATIVE_OPS:
                registrar.implement(op, "native", getattr(native_impl, op), priority=NATIVE_PRIORITY,
                                    requires=("native",), supports=native_impl.SUPPORTS[op])

        for module, ops in ((gemm, ("fp4_gemm", "fp4_grouped_gemm", "fp8_gemm")),
                            (indexer, ("indexer_topk", "indexer_scores", "select_candidate_blocks")),
                            (attention, ("kv_compress", "sparse_attention")),
                            (moe, ("moe_route", "moe_dispatch", "moe_combine")),
                            (engram, ("engram_hash", "engram_lookup"))):
            for op in ops:
                registrar.implement(op, "numpy", getattr(module, op), priority=NUMPY_PRIORITY)

        from dsv4rt.backends import composite

        composite.register(registrar, priority=COMPOSITE_PRIORITY)


def backend() -> CpuBackend:
    """Plug-in entry point: a zero-argument callable returning the backend."""
    return CpuBackend()
