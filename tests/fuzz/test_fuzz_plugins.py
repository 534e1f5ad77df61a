"""Broken plug-ins never take down the runtime or the other backends: a plug-in whose import, factory,
probe(), load() or supports() raises (sys.exit included), returns the wrong thing, registers unusable
implementations or names an unknown device type is recorded with its reason, and every other backend
keeps working. With DSV4RT_PLUGINS_STRICT=1 each failure is an error instead."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

import dsv4rt
from dsv4rt import plugins
from dsv4rt.backend import Backend, Probe
from dsv4rt.errors import PluginLoadError
from dsv4rt.registry import REGISTRY


class FakeEntryPoint:
    def __init__(self, name, factory):
        self.name, self._factory = name, factory
        self.value = f"fake_module:{name}"
        self.dist = types.SimpleNamespace(name=f"fake-dist-{name}")

    def load(self):
        if isinstance(self._factory, BaseException):
            raise self._factory
        return self._factory


def _backend(probe=None, load=None, device_type="cpu", name="broken"):
    attrs = {"name": name, "device_type": device_type,
             "probe": probe or (lambda self: Probe(True, "ok")),
             "load": load or (lambda self, reg: None)}
    return type("Broken", (Backend,), attrs)()


def _combine_impl(y, src, w, topk=None):
    raise RuntimeError("kernel exploded")


CASES = {
    "import-sys-exit": SystemExit(3),
    "import-raises": ImportError("no module"),
    "factory-sys-exit": lambda: sys.exit(4),
    "factory-returns-none": lambda: None,
    "probe-sys-exit": lambda: _backend(probe=lambda self: sys.exit(5)),
    "probe-returns-none": lambda: _backend(probe=lambda self: None),
    "probe-returns-tuple": lambda: _backend(probe=lambda self: (True, "ok")),
    "load-sys-exit": lambda: _backend(load=lambda self, reg: sys.exit(6)),
    "load-raises": lambda: _backend(load=lambda self, reg: 1 / 0),
    "impl-not-callable": lambda: _backend(load=lambda self, reg: reg.implement("moe_combine", "x", 42, priority=99)),
    "impl-bad-signature": lambda: _backend(load=lambda self, reg: reg.implement("moe_combine", "x", lambda a: a,
                                                                                priority=99)),
    "supports-raises": lambda: _backend(load=lambda self, reg: reg.implement(
        "moe_combine", "x", _combine_impl, priority=99, supports=lambda a: 1 / 0)),
    "device-quantum": lambda: _backend(device_type="quantum"),
}


@pytest.fixture
def fake_eps(monkeypatch):
    for k in list(os.environ):
        if k.startswith("DSV4RT_"):
            monkeypatch.delenv(k)

    def _set(*eps, strict=False):
        monkeypatch.setattr(plugins, "metadata", types.SimpleNamespace(
            entry_points=lambda group: list(eps) if group == plugins.ENTRY_POINT_GROUP else []))
        if strict:
            monkeypatch.setenv("DSV4RT_PLUGINS_STRICT", "1")
        dsv4rt.refresh()
        REGISTRY.reset()
    yield _set
    monkeypatch.undo()
    dsv4rt.refresh()
    REGISTRY.reset()


def _combine_works() -> None:
    y = torch.randn(6, 4)
    src = torch.randperm(6).to(torch.int32)
    out = dsv4rt.ops.moe_combine(y, src, None, 2)          # automatic selection across every backend
    want = torch.zeros(3, 4).index_add_(0, src.long() // 2, y)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_plugin_leaves_the_runtime_working(fake_eps, case):
    fake_eps(FakeEntryPoint(case, CASES[case]))
    info = dsv4rt.diagnose() if hasattr(dsv4rt, "diagnose") else None
    assert info is None or isinstance(info, (str, dict, list))
    _combine_works()
    assert dsv4rt.ops.moe_combine.explain(torch.randn(6, 4), torch.randperm(6).int(), None, 2).impl.backend != "broken"


def test_an_implementation_that_raises_is_named(fake_eps):
    fake_eps(FakeEntryPoint("raiser", lambda: _backend(
        load=lambda self, reg: reg.implement("moe_combine", "x", _combine_impl, priority=99))))
    with pytest.raises(RuntimeError, match="kernel exploded") as info:
        dsv4rt.ops.moe_combine(torch.randn(6, 4), torch.randperm(6).int(), None, 2)
    assert any("broken/x" in n for n in getattr(info.value, "__notes__", [])), getattr(info.value, "__notes__", None)


@pytest.mark.parametrize("case", ["import-sys-exit", "factory-sys-exit", "factory-returns-none"])
def test_strict_makes_a_broken_plugin_fatal_at_discovery(fake_eps, case):
    fake_eps(FakeEntryPoint(case, CASES[case]), strict=True)
    with pytest.raises(PluginLoadError):
        REGISTRY.backends()


def test_strict_makes_a_failing_load_fatal(fake_eps):
    fake_eps(FakeEntryPoint("load-raises", CASES["load-raises"]), strict=True)
    with pytest.raises(PluginLoadError, match="failed to load"):
        _combine_works()


def test_conformance_of_an_unknown_device_type_is_a_clear_error(fake_eps):
    from dsv4rt.conformance.runner import run_conformance
    from dsv4rt.errors import BackendSelectionError

    fake_eps(FakeEntryPoint("quantum", lambda: _backend(
        name="quantum", device_type="quantum",
        load=lambda self, reg: reg.implement("moe_combine", "x", _combine_impl))))
    with pytest.raises(BackendSelectionError, match="device type 'quantum'"):
        run_conformance("quantum", ["moe_combine"])
