"""The Ascend backend: torch_npu fused variants (``ascend/fused``, later) on top of the composite ``ascend/torch``.

``probe()`` never imports torch_npu (``import torch_npu`` needs the CANN libraries on the loader path and
fails, or initialises the NPU runtime, otherwise; spec/ascend.md section 0). It checks that torch_npu is
installed (``importlib.util.find_spec``), that a CANN toolkit is present (``ASCEND_HOME_PATH`` /
``ASCEND_TOOLKIT_HOME`` / ``ASCEND_OPP_PATH`` or ``/usr/local/Ascend/ascend-toolkit``) and that NPU device
nodes exist. Only when torch_npu is already imported (e.g. by torch's device-backend autoload) does it
read the device count and the SoC version. ``load()`` imports torch_npu.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import Any

from dsv4rt.backend import Backend, Probe, Registrar

__all__ = ["AscendBackend", "backend", "COMPOSITE_PRIORITY", "cann_home", "soc_family"]

COMPOSITE_PRIORITY = 0
"""Priority of the composite ``ascend/torch`` variants (the fused torch_npu variants register above it)."""

_CANN_ENV = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH")
_CANN_DIRS = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/ascend-toolkit",
              "/usr/local/Ascend/cann")
_SET_ENV = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"


def cann_home() -> str | None:
    """Where the CANN toolkit is, from the environment its ``set_env.sh`` exports or the default install
    directories; None when none is found."""
    for var in _CANN_ENV:
        path = os.environ.get(var, "").strip()
        if path and os.path.isdir(path):
            return path
    for path in _CANN_DIRS:
        if os.path.isdir(path):
            return path
    return None


def soc_family(soc_version: int) -> str:
    """Chip family of a ``torch_npu.npu.get_soc_version()`` value (spec/ascend.md chip table)."""
    if 220 <= soc_version <= 225:
        return "A2"      # Atlas 800 A2, Ascend 910B
    if 250 <= soc_version <= 255:
        return "A3"      # Atlas A3, Ascend 910C
    if soc_version == 260:
        return "950"     # Ascend 950PR / 950DT
    if 200 <= soc_version <= 205:
        return "310P"
    return "unknown"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _imported_details(caps: dict[str, Any]) -> Probe:
    """torch_npu is already imported: the device count and SoC are cheap to read."""
    import torch

    npu = getattr(torch, "npu", None)
    try:
        count = int(npu.device_count()) if npu is not None else 0
    except Exception as exc:
        return Probe(False, f"torch_npu is imported but torch.npu.device_count() failed: {exc}", caps)
    caps["device_count"] = count
    try:
        soc = int(sys.modules["torch_npu"].npu.get_soc_version())
        caps["soc_version"] = soc
        caps["soc"] = soc_family(soc)
    except Exception:  # an optional detail; never fail the probe over it
        pass
    if count == 0:
        return Probe(False, "torch_npu is imported but no NPU is visible (torch.npu.device_count() == 0; check "
                            "the driver and ASCEND_RT_VISIBLE_DEVICES)", caps)
    soc = f", SoC {caps['soc']} ({caps['soc_version']})" if "soc" in caps else ""
    return Probe(True, f"{count} Ascend NPU(s){soc}", caps)


class AscendBackend(Backend):
    """Huawei Ascend NPUs through torch_npu; composite torch variants underneath."""

    name = "ascend"
    device_type = "npu"
    description = "torch_npu on Ascend NPUs: composite torch variants (ascend/torch), fused torch_npu ops later"

    def probe(self) -> Probe:
        """Cheap and import-free: torch_npu installed? CANN present? device nodes? (see the module doc)."""
        imported = "torch_npu" in sys.modules
        caps: dict[str, Any] = {"torch_npu": imported or _installed("torch_npu"), "imported": imported}
        if imported:
            return _imported_details(caps)
        if not caps["torch_npu"]:
            return Probe(False, "torch_npu is not installed (install the torch-npu wheel matching your torch and "
                                "CANN versions on an Ascend host)", caps)
        home = cann_home()
        if home is None:
            return Probe(False, "CANN toolkit not found (set ASCEND_HOME_PATH, e.g. `" + _SET_ENV + "`, or install "
                                "CANN under /usr/local/Ascend); torch_npu cannot be imported without it", caps)
        caps["cann"] = home
        nodes = glob.glob("/dev/davinci[0-9]*")
        caps["device_nodes"] = len(nodes)
        if not nodes:
            return Probe(False, "no Ascend NPU device nodes (/dev/davinci*) are visible; check the driver "
                                "(/usr/local/Ascend/driver) and the container's device mounts", caps)
        return Probe(True, f"torch_npu installed, CANN at {home}, {len(nodes)} NPU device node(s); torch_npu is "
                           "imported on first use", caps)

    def load(self, registrar: Registrar) -> None:
        """Import torch_npu (registers the 'npu' device), then register the composite ``torch`` variants."""
        try:
            import torch_npu  # noqa: F401  (registers 'npu', torch.npu and the custom ops)
        except ImportError as exc:
            raise ImportError(f"import torch_npu failed: {exc}. The CANN libraries must be on the loader path "
                              f"(`{_SET_ENV}`)") from exc
        from dsv4rt.backends import composite

        composite.register(registrar, priority=COMPOSITE_PRIORITY, device_type=self.device_type)
        # Fused torch_npu variants ("fused") are registered here, above COMPOSITE_PRIORITY.


def backend() -> AscendBackend:
    """Plug-in entry point: a zero-argument callable returning the backend."""
    return AscendBackend()
