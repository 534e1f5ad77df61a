"""torch_npu feature probes, SoC family, and torch_npu's low-precision dtype constants.

Imported only once torch_npu is imported (by ``load()``, by ``prepare_weights`` or by the probe when
torch's device-backend autoload already imported it): nothing here imports torch_npu by itself except
:func:`module`, which ``load()`` and ``prepare_weights`` call on purpose.

Features are probed **by name** (``hasattr(torch_npu, op)`` or ``torch.ops.npu.<op>``), never guessed
from version numbers (docs/ascend.md section 0).

The dtype trap (docs/ascend.md section 0): ``torch_npu.float4_e2m1fn_x2``, ``float8_e8m0fnu``,
``hifloat8``, ... are Python **ints** (``torch_npu._C._cd.DType``), not ``torch.dtype``. They are only
ever passed to the ``*_dtype=`` / ``dst_type=`` arguments of torch_npu ops; tensors keep an ordinary
storage dtype (uint8 for packed FP4 and for E8M0). :func:`npu_dtype` returns them and refuses anything
that is neither an int nor a torch.dtype, and nothing in this backend passes them to ``Tensor.to`` or
``Tensor.view``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OPS", "DTYPES", "Features", "module", "probe_features", "npu_dtype", "soc_family", "NZ", "ND"]

OPS = ("npu_grouped_matmul", "npu_dynamic_mx_quant", "npu_dynamic_quant", "npu_format_cast",
       "npu_moe_init_routing_v2", "npu_moe_token_unpermute", "npu_lightning_indexer",
       "npu_fused_infer_attention_score")
"""The torch_npu ops the fused variants call; each is a capability of the same name."""

DTYPES = ("float4_e2m1fn_x2", "float8_e8m0fnu", "float8_e4m3fn")
"""torch_npu dtype constants the fused variants pass to ``*_dtype=`` arguments (capabilities too)."""

NZ = 29
"""ACL_FORMAT_FRACTAL_NZ, the second argument of ``torch_npu.npu_format_cast``."""
ND = 2


def soc_family(soc_version: int) -> str:
    """Chip family of a ``torch_npu.npu.get_soc_version()`` value (docs/ascend.md chip table)."""
    if 220 <= soc_version <= 225:
        return "A2"      # Atlas 800 A2, Ascend 910B
    if 250 <= soc_version <= 255:
        return "A3"      # Atlas A3, Ascend 910C
    if soc_version == 260:
        return "950"     # Ascend 950PR / 950DT
    if 200 <= soc_version <= 205:
        return "310P"
    return "unknown"


def module() -> Any:
    """The torch_npu module: the one already imported (possibly a test stand-in), else ``import torch_npu``."""
    mod = sys.modules.get("torch_npu")
    if mod is None:
        import torch_npu as mod  # noqa: F811  (needs CANN on the loader path; callers explain failures)
    return mod


def _has_op(npu: Any, name: str) -> bool:
    if callable(getattr(npu, name, None)):
        return True
    try:
        import torch

        return hasattr(torch.ops.npu, name)
    except Exception:  # torch.ops lookups raise RuntimeError on some versions; absent means absent
        return False


def npu_dtype(npu: Any, name: str) -> Any:
    """torch_npu's constant ``name`` (an int, or a torch.dtype on builds that alias one), falling back to
    torch's dtype of the same name; KeyError when neither exists. Pass the result only to ``*_dtype=``."""
    import torch

    value = getattr(npu, name, None)
    if isinstance(value, bool):
        value = None
    if isinstance(value, (int, torch.dtype)):
        return value
    native = getattr(torch, name, None)
    if isinstance(native, torch.dtype):
        return native
    raise KeyError(f"neither torch_npu.{name} nor torch.{name} exists in this installation")


@dataclass(frozen=True)
class Features:
    """What the installed torch_npu offers, by name, and the chip it runs on."""

    soc: str = "unknown"
    soc_version: int | None = None
    ops: frozenset[str] = frozenset()
    dtypes: dict[str, Any] = field(default_factory=dict)

    def has(self, *names: str) -> bool:
        return all(n in self.ops or n in self.dtypes for n in names)

    def missing(self, *names: str) -> list[str]:
        return [n for n in names if n not in self.ops and n not in self.dtypes]

    def capabilities(self) -> dict[str, Any]:
        """Probe capabilities: one truthy/falsy entry per op and dtype constant, plus the SoC."""
        caps: dict[str, Any] = {n: n in self.ops for n in OPS}
        caps.update({n: n in self.dtypes for n in DTYPES})
        caps["soc"] = self.soc
        if self.soc_version is not None:
            caps["soc_version"] = self.soc_version
        caps["features"] = ", ".join(sorted(self.ops | set(self.dtypes))) or "none"
        return caps


def probe_features(npu: Any) -> Features:
    """Feature probes by name on an imported torch_npu (or stand-in); cheap, never initialises a device
    beyond what ``torch_npu.npu.get_soc_version()`` does."""
    ops = frozenset(n for n in OPS if _has_op(npu, n))
    dtypes: dict[str, Any] = {}
    for name in DTYPES:
        value = getattr(npu, name, None)
        if value is not None and not isinstance(value, bool):
            dtypes[name] = value
    soc_version = None
    try:
        soc_version = int(npu.npu.get_soc_version())
    except Exception:  # an optional detail; the fused variants then refuse by chip
        pass
    return Features(soc_family(soc_version) if soc_version is not None else "unknown", soc_version, ops, dtypes)
