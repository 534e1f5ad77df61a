"""The Ascend backend: torch_npu fused variants (``ascend/fused``) and the Triton kernels through triton-ascend
(``ascend/triton``, ``triton_npu.py``) on top of the composite ``ascend/torch``.

``probe()`` never imports torch_npu (``import torch_npu`` needs the CANN libraries on the loader path and
fails, or initialises the NPU runtime, otherwise; docs/ascend.md section 0). It checks that torch_npu is
installed (``importlib.util.find_spec``), that a CANN toolkit is present (``ASCEND_HOME_PATH`` /
``ASCEND_TOOLKIT_HOME`` / ``ASCEND_OPP_PATH`` or ``/usr/local/Ascend/ascend-toolkit``) and that NPU device
nodes exist. Only when torch_npu is already imported (e.g. by torch's device-backend autoload) does it
read the device count, the SoC family (A2 / A3 / 950) and which fused ops torch_npu has (feature probes
by name); otherwise it says those are probed at ``load()``.

``load()`` imports torch_npu, probes the features, registers the composite ``torch`` variants and, for
each op whose torch_npu call exists, an ``ascend/fused`` variant above them (``requires=`` the feature,
``supports()`` = the documented shape/dtype limits). The features found at load are published in this
backend's probe capabilities (``Registrar.publish_capabilities``), so ``requires=`` sees them although the probe ran
before the import. Per op (see README.md in this folder):

=================== ===================================================== ==============================
op                  fused call                                            needs
=================== ===================================================== ==============================
fp4_grouped_gemm    npu_grouped_matmul (+ npu_dynamic_mx_quant on 950)     a PreparedWeight (weights.py)
fp4_gemm, fp8_gemm  BF16 matmul on a prepared weight                      a PreparedWeight
moe_dispatch        npu_moe_init_routing_v2
moe_combine         npu_moe_token_unpermute
indexer_topk        npu_lightning_indexer                                 decode (S = 1), no candidates,
                                                                          keys in q's dtype
indexer_scores      composite only (npu_lightning_indexer returns top-k
                    indices / values, never the whole score matrix)
sparse_attention    npu_fused_infer_attention_score (window) + LSE merge   a WindowedIndex (attention.py)
every op            ascend/triton: backends/cuda/kernels via triton-ascend triton-ascend installed (else each
                    (priority between fused and torch)                    call declines with the reason)
kv_compress,        composite only (moe_route: npu_moe_gating_top_k has
moe_route,          no sqrt-softplus score and one bias for all tokens;
engram_hash,        engram: no torch_npu op gathers FP8 rows with E8M0
engram_lookup       scales; index_select runs on the NPU)
=================== ===================================================== ==============================
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
from typing import Any, Mapping

from dsv4rt.backend import Backend, Probe, Registrar

from ._npu import soc_family

log = logging.getLogger("dsv4rt")

__all__ = ["AscendBackend", "backend", "COMPOSITE_PRIORITY", "FUSED_PRIORITY", "FAMILIES", "cann_home",
           "soc_family", "prepare_weights", "PreparedWeight", "WindowedIndex"]

COMPOSITE_PRIORITY = 0
"""Priority of the composite ``ascend/torch`` variants (the fused torch_npu variants register above it)."""
FUSED_PRIORITY = 10
"""Priority of the ``ascend/fused`` variants."""
FAMILIES = ("gemm", "moe", "indexer", "attention")
"""One module per op family, each with ``register(registrar, npu, features, priority, device_type)``."""

_CANN_ENV = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME", "ASCEND_OPP_PATH")
_CANN_DIRS = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/ascend-toolkit",
              "/usr/local/Ascend/cann")
_SET_ENV = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
_FUSED_OPS = ("fp4_grouped_gemm", "fp4_gemm", "fp8_gemm", "moe_dispatch", "moe_combine", "indexer_topk",
              "sparse_attention")
_ALL_OPS = _FUSED_OPS + ("kv_compress", "moe_route", "engram_hash", "engram_lookup", "select_candidate_blocks",
                         "indexer_scores")
_TRITON_OPS = _ALL_OPS
"""Ops the Triton families of backends/cuda register (ascend/triton); a test compares with triton_npu.triton_ops()."""
_GEMM_OPS = ("fp4_gemm", "fp4_grouped_gemm", "fp8_gemm")
"""The ops whose weights :meth:`AscendBackend.prepare_weight` converts."""
_LAZY = {"prepare_weights": "weights", "PreparedWeight": "weights", "WindowedIndex": "attention"}


def __getattr__(name: str) -> Any:
    """``prepare_weights`` / ``PreparedWeight`` / ``WindowedIndex`` import torch: loaded on first access."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _imported_details(caps: dict[str, Any]) -> Probe:
    """torch_npu is already imported: the device count, the SoC and the features are cheap to read."""
    from ._npu import probe_features

    npu_mod = sys.modules["torch_npu"]
    try:
        count = int(npu_mod.npu.device_count())
    except Exception as exc:
        return Probe(False, f"torch_npu is imported but torch_npu.npu.device_count() failed: {exc}", caps)
    caps["device_count"] = count
    try:
        caps.update(probe_features(npu_mod).capabilities())
    except Exception as exc:  # an optional detail; never fail the probe over it
        caps["features"] = f"feature probe failed: {exc}"
    if count == 0:
        return Probe(False, "torch_npu is imported but no NPU is visible (torch.npu.device_count() == 0; check "
                            "the driver and ASCEND_RT_VISIBLE_DEVICES)", caps)
    soc = f", SoC {caps['soc']} ({caps['soc_version']})" if "soc_version" in caps else ""
    return Probe(True, f"{count} Ascend NPU(s){soc}; fused ops: {caps.get('features', 'none')}", caps)


class AscendBackend(Backend):
    """Huawei Ascend NPUs through torch_npu; composite torch variants underneath."""

    name = "ascend"
    device_type = "npu"
    description = "torch_npu on Ascend NPUs: fused torch_npu variants (ascend/fused) over composite ascend/torch"

    def probe(self) -> Probe:
        """Cheap and import-free: torch_npu installed? CANN present? device nodes? (see the module doc)."""
        imported = "torch_npu" in sys.modules
        caps: dict[str, Any] = {"torch_npu": imported or _installed("torch_npu"), "imported": imported}
        if imported:
            p = _imported_details(caps)
            return Probe(p.available, p.reason, caps)
        caps["features"] = "probed at load() (torch_npu is not imported yet)"
        if not caps["torch_npu"]:
            return Probe(False, "torch_npu is not installed (install the torch-npu wheel matching your torch and "
                                "CANN versions on an Ascend host)", caps)
        home = cann_home()
        if home is None:
            return Probe(False, "CANN toolkit not found (set ASCEND_HOME_PATH, e.g. `" + _SET_ENV + "`, or install "
                                "CANN under /usr/local/Ascend); torch_npu cannot be imported without it",
                         caps)
        caps["cann"] = home
        nodes = glob.glob("/dev/davinci[0-9]*")
        caps["device_nodes"] = len(nodes)
        if not nodes:
            return Probe(False, "no Ascend NPU device nodes (/dev/davinci*) are visible; check the driver "
                                "(/usr/local/Ascend/driver) and the container's device mounts", caps)
        return Probe(True, f"torch_npu installed, CANN at {home}, {len(nodes)} NPU device node(s); torch_npu is "
                           "imported, and its SoC and fused ops probed, on first use", caps)

    def offers(self) -> Mapping[str, tuple[str, ...]]:
        """Every op has ``torch``; the ops with a torch_npu call also ``fused`` (when the feature exists); the
        ops of the Triton kernels ``triton`` (declining where triton-ascend is not installed)."""
        return {op: (("fused",) if op in _FUSED_OPS else ()) + (("triton",) if op in _TRITON_OPS else ()) + ("torch",)
                for op in _ALL_OPS}

    def prepare_inputs(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Conformance and bench hand the GEMMs released weights; convert them once through
        :meth:`prepare_weight` so the fused variants run. Other ops are left as they are."""
        if op not in _GEMM_OPS:
            return args
        return dict(args, w=self.prepare_weight(op, args["w"], args["w_scale"], args.get("block_size", 128)))

    def prepare_weight(self, op: str, w: Any, w_scale: Any, block_size: int = 128) -> Any:
        """The model's load-time hook (``dsv4rt.prepare``): a GEMM weight on the NPU becomes a
        :class:`PreparedWeight` in the chip's exact default layout (:func:`prepare_weights`), which the fused
        GEMMs take and every other variant reads as the released tensor. Weights whose only layouts round
        (FP8 with float32 scales), and MXFP4 experts on A2/A3 unless DSV4RT_ASCEND_BF16_EXPERTS=1 (their BF16
        copy is 4x the released bytes), stay as they are, with the reason logged: the fused variants then
        refuse them and the composite path runs."""
        if op not in _GEMM_OPS:
            return w
        from .weights import bf16_experts_declined, prepare_weights

        try:
            declined = bf16_experts_declined(op, w, w_scale)
            if declined:
                log.info("dsv4rt: ascend keeps a released %s weight %s: %s", op, tuple(w.shape), declined)
                return w
            return prepare_weights(w, w_scale, **({"block_size": block_size} if op == "fp8_gemm" else {}))
        except ValueError as exc:
            log.info("dsv4rt: ascend keeps a released %s weight %s: %s", op, tuple(w.shape), exc)
            return w

    def load(self, registrar: Registrar) -> None:
        """Import torch_npu (asked for explicitly: it registers 'npu', torch.npu and the custom ops), probe its
        features by name, register the composite ``torch`` variants and the ``fused`` ones whose op exists."""
        try:
            import torch_npu  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"import torch_npu failed: {exc}. The CANN libraries must be on the loader path "
                              f"(`{_SET_ENV}`)") from exc
        import importlib

        from dsv4rt.backends import composite

        from ._npu import module, probe_features

        npu = module()
        features = probe_features(npu)
        registrar.publish_capabilities(features.capabilities())
        composite.register(registrar, priority=COMPOSITE_PRIORITY, device_type=self.device_type)
        for family in FAMILIES:
            importlib.import_module(f"{__name__}.{family}").register(
                registrar, npu, features, FUSED_PRIORITY, self.device_type)
        from .triton_npu import TRITON_PRIORITY, register as register_triton

        register_triton(registrar, npu, features, TRITON_PRIORITY, self.device_type)


def backend() -> AscendBackend:
    """Plug-in entry point: a zero-argument callable returning the backend."""
    return AscendBackend()
