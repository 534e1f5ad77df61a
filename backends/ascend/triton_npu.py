"""``ascend/triton``: the Triton kernels of ``backends/cuda/kernels`` launched on Ascend NPUs by triton-ascend.

triton-ascend (PyPI ``triton-ascend``, imported as ``triton``; it replaces community Triton, the two
cannot be installed together) compiles ``@triton.jit`` kernels for the NPU: its front end lowers TTIR
through ``triton-adapter-opt`` to linalg / HIVM MLIR, and CANN's ``bishengir-compile`` makes the binary
(docs/ascend.md, section 7). The launchers are the CUDA backend's (``backends/cuda/<family>.py``): they
take device-agnostic tensors, import their kernel module on the first launch, and size blocks from
shapes. On NPU tensors they plan the device build (``INTERP`` off, the GPU tiles, grids sized by the cube
cores), multiply float32 operands with ``input_precision="hf32"`` (triton-ascend refuses "tf32") and
launch on the current device (``backends/cuda/_launch``: on_interpreter, dot_precision, core_count).

The variant is registered for every op the Triton families cover, below ``ascend/fused`` (torch_npu's
fused ops win where they apply) and above ``ascend/torch``. Each call is declined, with the reason, when
:func:`unavailable` says triton-ascend cannot run here: triton-ascend is not installed, the installed
``triton`` is community Triton (CUDA / ROCm only), or torch_npu is not imported. Nothing here imports
Triton: the check reads package metadata.

Status (docs/ascend.md, section 10): ``tools/ascend_lower.sh`` tries to lower every recorded kernel launch
through triton-ascend's front end to MLIR on a machine without an NPU, and the table there says which
kernels do. No kernel has run on an NPU (the binary stage needs CANN), so the GPU tiles are untuned there.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from typing import Any, Callable, Mapping

from ._npu import Features

__all__ = ["register", "unavailable", "TRITON_PRIORITY", "triton_ops"]

TRITON_PRIORITY = 5
"""Between the composite ``ascend/torch`` (0) and ``ascend/fused`` (10)."""


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unavailable() -> str | None:
    """Why the Triton kernels cannot run on this NPU host (None when triton-ascend and torch_npu are there)."""
    if "torch_npu" not in sys.modules:
        return "torch_npu is not imported (the ascend backend imports it at load)"
    try:
        triton = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        triton = False
    ascend = _dist_version("triton-ascend")
    if ascend is None:
        if triton:
            return (f"the installed triton ({_dist_version('triton') or 'unknown version'}) is community Triton, "
                    f"which has no NPU target; install triton-ascend in its place (pip install triton-ascend)")
        return "triton-ascend is not installed (pip install triton-ascend; it needs CANN)"
    if not triton:
        return f"triton-ascend {ascend} is installed but its 'triton' package cannot be found"
    return None


def triton_ops() -> dict[str, tuple[str, ...]]:
    """op -> the Triton families registering it (the CUDA backend's launcher modules)."""
    from dsv4rt.backends.cuda import TRITON_FAMILIES

    class _Collect:
        def __init__(self) -> None:
            self.ops: dict[str, tuple[str, ...]] = {}
            self.family = ""

        def implement(self, op: str, variant: str, fn: Any, **_: Any) -> None:
            self.ops[op] = self.ops.get(op, ()) + (self.family,)

    col = _Collect()
    for family in TRITON_FAMILIES:
        col.family = family
        importlib.import_module(f"dsv4rt.backends.cuda.{family}").register(col, device_type="npu", priority=0)
    return col.ops


class _Declining:
    """A registrar proxy: every ``triton`` variant first asks :func:`unavailable`, then its own supports()."""

    def __init__(self, registrar: Any, reason: str | None) -> None:
        self.registrar, self.reason = registrar, reason

    def implement(self, op: str, variant: str, fn: Callable[..., Any], *, priority: int = 0,
                  requires: Any = (), supports: Callable[[Mapping[str, Any]], str | None] | None = None,
                  device_type: str | None = None) -> None:
        reason = self.reason

        def gate(args: Mapping[str, Any]) -> str | None:
            if reason is not None:
                return f"ascend/triton: {reason}"
            return supports(args) if supports is not None else None

        self.registrar.implement(op, variant, fn, priority=priority, requires=requires, supports=gate,
                                 device_type=device_type)


def register(registrar: Any, npu: Any, feat: Features, priority: int, device_type: str) -> None:
    """Register ``ascend/triton`` for every op of the Triton families (declining, with the reason, where
    triton-ascend cannot run); publishes ``triton_ascend`` (version or False) as a capability."""
    from dsv4rt.backends.cuda import TRITON_FAMILIES

    reason = unavailable()
    registrar.publish_capabilities({"triton_ascend": _dist_version("triton-ascend") or False,
                                    "triton_ascend_reason": reason or "available"})
    proxy = _Declining(registrar, reason)
    for family in TRITON_FAMILIES:
        importlib.import_module(f"dsv4rt.backends.cuda.{family}").register(proxy, device_type=device_type,
                                                                           priority=priority)
