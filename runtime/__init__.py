"""dsv4rt: one op registry for DeepSeek-V4, backends for NVIDIA (Triton), Ascend (torch_npu) and CPU.

Importing dsv4rt is cheap: nothing below is imported, no backend is probed and no device is touched
until first use.

    import dsv4rt
    y = dsv4rt.ops.fp4_gemm(x, w, w_scale)           # picks the backend from x's device
    with dsv4rt.use_backend("cpu/numpy"):             # or backend="...", or DSV4RT_OP_BACKEND
        ...
    dsv4rt.diagnose()                                 # what `dsv4rt info` prints, as a dict
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ops": ("dsv4rt.ops", None),
    "use_backend": ("dsv4rt.select", "use_backend"),
    "refresh": ("dsv4rt.select", "refresh"),
    "list_backends": ("dsv4rt.info", "list_backends"),
    "diagnose": ("dsv4rt.info", "diagnose"),
    "Backend": ("dsv4rt.backend", "Backend"),
    "Probe": ("dsv4rt.backend", "Probe"),
    "API_VERSION": ("dsv4rt.backend", "API_VERSION"),
    "REGISTRY": ("dsv4rt.registry", "REGISTRY"),
    "Dsv4rtError": ("dsv4rt.errors", "Dsv4rtError"),
    "ContractError": ("dsv4rt.errors", "ContractError"),
    "MixedDeviceError": ("dsv4rt.errors", "MixedDeviceError"),
    "NoImplementationError": ("dsv4rt.errors", "NoImplementationError"),
    "BackendSelectionError": ("dsv4rt.errors", "BackendSelectionError"),
    "CheckpointError": ("dsv4rt.errors", "CheckpointError"),
    "PluginLoadError": ("dsv4rt.errors", "PluginLoadError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'dsv4rt' has no attribute {name!r}") from None
    import importlib

    obj = importlib.import_module(module)
    if attr is not None:
        obj = getattr(obj, attr)
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return sorted(__all__)
