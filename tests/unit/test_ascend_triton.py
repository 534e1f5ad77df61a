"""WIRING tests of ``ascend/triton`` (backends/ascend/triton_npu.py) with the torch_npu stand-in.

They prove that the ascend backend registers the CUDA backend's Triton launchers for NPU tensors, between
``ascend/fused`` and ``ascend/torch``, and that each call declines with the reason where triton-ascend
cannot run (not installed, or community Triton installed instead) and otherwise asks the launcher's own
supports(). No kernel runs on an NPU here (none is available; the binary stage needs CANN).
"""
from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest
import torch

from dsv4rt.backend import Registrar
from dsv4rt.backends import ascend
from dsv4rt.backends.ascend import AscendBackend, fake_torch_npu, triton_npu
from dsv4rt.backends.cuda import TRITON_FAMILIES
from dsv4rt.registry import REGISTRY


def load(monkeypatch, versions: dict[str, str | None] | None = None) -> SimpleNamespace:
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu.make(223))
    if versions is not None:
        monkeypatch.setattr(triton_npu, "_dist_version", lambda name: versions.get(name))
    backend = AscendBackend()
    registrar = Registrar(backend, REGISTRY.specs)
    backend.load(registrar)
    impls = {(i.op, i.variant): i for i in registrar.implementations}
    return SimpleNamespace(impls=impls, caps=registrar.capabilities, backend=backend)


def cuda_launchers() -> dict[str, object]:
    out = {}

    class Collect:
        def implement(self, op, variant, fn, **kw):
            out[op] = (fn, kw.get("supports"))

    for family in TRITON_FAMILIES:
        importlib.import_module(f"dsv4rt.backends.cuda.{family}").register(Collect(), device_type="npu", priority=0)
    return out


def test_every_triton_launcher_is_registered_for_npu_between_fused_and_torch(monkeypatch):
    env = load(monkeypatch, {"triton-ascend": "3.2.0", "triton": None})
    launchers = cuda_launchers()
    assert set(launchers) == set(triton_npu.triton_ops()) == set(ascend._TRITON_OPS)
    for op, (fn, _) in launchers.items():
        impl = env.impls[(op, "triton")]
        assert impl.fn is fn and impl.device_type == "npu"
        assert ascend.COMPOSITE_PRIORITY < impl.priority == triton_npu.TRITON_PRIORITY < ascend.FUSED_PRIORITY
        assert "triton" in env.backend.offers()[op]
    assert env.caps["triton_ascend"] == "3.2.0" and env.caps["triton_ascend_reason"] == "available"


@pytest.mark.parametrize("versions,expect", [
    ({"triton-ascend": None, "triton": "3.9.0"}, "community Triton"),
    ({"triton-ascend": None, "triton": None}, "triton-ascend is not installed"),
])
def test_declines_with_the_reason_without_triton_ascend(monkeypatch, versions, expect):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if (name == "triton" and versions["triton"]) else None)
    env = load(monkeypatch, versions)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    reason = env.impls[("moe_route", "triton")].supports(
        {"logits": x.float(), "bias": None, "topk": 2, "route_scale": 1.0})
    assert reason and reason.startswith("ascend/triton: ") and expect in reason, reason
    assert env.caps["triton_ascend"] is False and expect in env.caps["triton_ascend_reason"]


def test_with_triton_ascend_the_launchers_own_supports_decides(monkeypatch):
    env = load(monkeypatch, {"triton-ascend": "3.2.0", "triton": None})
    launchers = cuda_launchers()
    impl = env.impls[("moe_route", "triton")]
    _, own = launchers["moe_route"]
    for args in ({"logits": torch.zeros(3, 16), "bias": None, "topk": 2, "route_scale": 1.5},
                 {"logits": torch.zeros(3, 2048), "bias": None, "topk": 2, "route_scale": 1.5}):
        want = own(args) if own is not None else None
        assert impl.supports(args) == want
    assert impl.supports({"logits": torch.zeros(3, 2048), "bias": None, "topk": 2, "route_scale": 1.5})


def test_unavailable_without_torch_npu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert "torch_npu is not imported" in triton_npu.unavailable()
