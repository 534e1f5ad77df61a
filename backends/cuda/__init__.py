"""The CUDA backend: Triton kernels (``cuda/triton``, in ``kernels/``) on top of the composite ``cuda/torch``.

``probe()`` is cheap: ``torch.cuda.is_available()`` (a device count through the driver; it creates no
CUDA context and leaves ``torch.cuda`` uninitialised) and ``importlib.util.find_spec("triton")``; Triton
is not imported. The compute capability, and per op what ``cuda/triton`` runs on it and why
(``capability.op_report``), are reported only when ``torch.cuda`` is already initialised.

Triton-interpreter mode (``DSV4RT_TRITON_INTERPRET=1``, for CI without a GPU): the backend reports
``interpreter: True`` and registers its implementations for *CPU* tensors, at priorities far below the
cpu backend's (``INTERPRETER_PRIORITY_OFFSET``), so automatic selection on CPU tensors never picks them;
only an explicit ``backend="cuda"`` / ``--backend cuda`` / ``use_backend("cuda")`` does.
``TRITON_INTERPRET=1`` is set by :func:`enable_interpreter` in ``load()``, before any kernel is defined.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from dsv4rt import env
from dsv4rt.backend import Backend, Probe, Registrar

__all__ = ["CudaBackend", "backend", "enable_interpreter", "interpreter_requested", "INTERPRETER_PRIORITY_OFFSET",
           "COMPOSITE_PRIORITY"]

COMPOSITE_PRIORITY = 0
"""Priority of the composite ``cuda/torch`` variants (Triton variants register above it)."""

INTERPRETER_PRIORITY_OFFSET = -1000
"""Added to every priority in interpreter mode, keeping ``cuda/*`` below every ``cpu/*`` variant."""

_KERNELS = __name__ + ".kernels"


def interpreter_requested() -> bool:
    """True when ``DSV4RT_TRITON_INTERPRET`` is set (read through :mod:`dsv4rt.env`)."""
    return env.flag("DSV4RT_TRITON_INTERPRET")


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _kernels_imported() -> list[str]:
    return sorted(m for m in sys.modules if m.startswith(_KERNELS + "."))


def enable_interpreter() -> None:
    """Set ``TRITON_INTERPRET=1`` so ``@triton.jit`` kernels defined from now on run on CPU tensors.

    Triton reads the variable when a kernel is decorated (``triton.knobs.runtime.interpret``), not at
    ``import triton``. So this raises RuntimeError only when it can no longer take effect: our kernel
    modules were already imported (decorated for the GPU) without it, or Triton is imported and its
    ``interpret`` knob was forced off in code.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    early = _kernels_imported()
    if early:
        raise RuntimeError(
            "DSV4RT_TRITON_INTERPRET=1 came too late: the Triton kernels (" + ", ".join(early) + ") were "
            "already imported without TRITON_INTERPRET=1, so they are compiled for a GPU. Set "
            "DSV4RT_TRITON_INTERPRET=1 (or TRITON_INTERPRET=1) before the first dsv4rt op call.")
    os.environ["TRITON_INTERPRET"] = "1"
    triton = sys.modules.get("triton")
    knobs = getattr(triton, "knobs", None) if triton is not None else None
    if knobs is not None and not bool(knobs.runtime.interpret):
        raise RuntimeError(
            "Triton was imported and its interpreter knob (triton.knobs.runtime.interpret) is forced off, "
            "so TRITON_INTERPRET=1 has no effect; unset it or set TRITON_INTERPRET=1 before importing Triton.")


def _interpreter_probe(triton: bool) -> Probe:
    if not triton:
        return Probe(False, "DSV4RT_TRITON_INTERPRET=1 but Triton is not installed (pip install triton); the "
                            "interpreter mode exists to run the Triton kernels on CPU tensors",
                     {"interpreter": True, "triton": False})
    early = _kernels_imported()
    if early and os.environ.get("TRITON_INTERPRET") != "1":
        return Probe(False, "DSV4RT_TRITON_INTERPRET=1 but the Triton kernels were already imported without "
                            "TRITON_INTERPRET=1; set it before the first dsv4rt op call",
                     {"interpreter": True, "triton": True})
    return Probe(True, "Triton interpreter mode (DSV4RT_TRITON_INTERPRET=1): cuda/* runs on CPU tensors, only "
                       "when chosen explicitly (backend='cuda'); slow, for CI",
                 {"interpreter": True, "triton": True, "device_type": "cpu"})


def _capability() -> tuple[int, int] | None:
    """(major, minor) of device 0, only when torch.cuda is already initialised (else querying would init it)."""
    import torch

    try:
        if torch.cuda.is_initialized():
            return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]
    except Exception:  # a probe must not raise over an optional detail
        pass
    return None


TRITON_PRIORITY = 20
# One launcher module per op family (backends/cuda/<family>.py); each has
# register(registrar, device_type, priority) and keeps its @triton.jit code in backends/cuda/kernels/.
TRITON_FAMILIES = tuple(f for f in ("gemm", "indexer", "attention", "moe", "engram")
                        if importlib.util.find_spec(f"{__name__}.{f}") is not None)


class CudaBackend(Backend):
    """NVIDIA (and ROCm builds of torch) through Triton; composite torch variants underneath."""

    name = "cuda"
    device_type = "cuda"
    description = "Triton kernels on CUDA GPUs, plus the composite torch variants (cuda/torch)"

    def probe(self) -> Probe:
        """Cheap: no CUDA context, no Triton import. Interpreter mode is checked first."""
        triton = _triton_installed()
        if interpreter_requested():
            return _interpreter_probe(triton)
        import torch

        caps: dict[str, Any] = {"interpreter": False, "triton": triton}
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return Probe(False, f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA "
                                f"build of torch, or set DSV4RT_TRITON_INTERPRET=1 to run the Triton kernels on CPU",
                         caps)
        if "torch_npu.contrib.transfer_to_npu" in sys.modules:
            return Probe(False, "torch.cuda is redirected to Ascend NPUs by torch_npu.contrib.transfer_to_npu; "
                                "use the ascend backend", caps)
        caps["runtime"] = "hip" if getattr(torch.version, "hip", None) else "cuda"
        if not torch.cuda.is_available():
            return Probe(False, "no CUDA device is visible (torch.cuda.is_available() is False; check the driver "
                                "and CUDA_VISIBLE_DEVICES)", caps)
        caps["device_count"] = torch.cuda.device_count()
        sm = _capability()
        reason = f"{caps['device_count']} CUDA device(s)"
        if sm is not None:
            from .capability import op_report
            from dsv4rt.registry import REGISTRY

            caps["sm"] = sm
            if triton and caps["runtime"] == "cuda":   # per op: what sm_XY runs, and why (dsv4rt info)
                caps["triton_ops"] = op_report(sm, tuple(REGISTRY.specs))
                reason += f", sm_{sm[0]}{sm[1]}"
        elif triton:
            caps["triton_ops"] = ("per op after CUDA is initialised (the probe does not initialise it); "
                                  "op.explain(...) gives the reason for a call")
        if not triton:
            reason += "; Triton is not installed, so only the cuda/torch variants run (pip install triton)"
        return Probe(True, reason, caps)

    def offers(self) -> dict[str, tuple[str, ...]]:
        """Every op as ``triton`` (where Triton is installed) and ``torch``."""
        from dsv4rt.registry import REGISTRY

        return {op: ("triton", "torch") for op in REGISTRY.specs}

    def load(self, registrar: Registrar) -> None:
        """Register the composite ``torch`` variants (and, later, the Triton ones).

        In interpreter mode everything is registered for device type "cpu" at
        ``priority + INTERPRETER_PRIORITY_OFFSET``, after :func:`enable_interpreter`.
        """
        interp = interpreter_requested()
        if interp:
            enable_interpreter()
        device_type = "cpu" if interp else self.device_type
        offset = INTERPRETER_PRIORITY_OFFSET if interp else 0

        from dsv4rt.backends import composite

        composite.register(registrar, priority=COMPOSITE_PRIORITY + offset, device_type=device_type)
        if not _triton_installed():  # the probe already says only cuda/torch runs
            return
        import importlib

        for family in TRITON_FAMILIES:
            module = importlib.import_module(f"{__name__}.{family}")
            module.register(registrar, device_type=device_type, priority=TRITON_PRIORITY + offset)


def backend() -> CudaBackend:
    """Plug-in entry point: a zero-argument callable returning the backend."""
    return CudaBackend()
