"""Plug-in discovery (design.md section 5): entry points, allowlist, failures, API version, duplicates.

The real ``example`` plug-in (tests/plugins/example_backend, installed by the README's install command) is
discovered through its entry point; the failure cases inject fake entry points by replacing the
``metadata`` module that ``dsv4rt.plugins`` lists them from.
"""
from __future__ import annotations

import os
import types
from importlib import metadata

import pytest

import dsv4rt
from dsv4rt import plugins
from dsv4rt.backend import Backend, Probe
from dsv4rt.errors import PluginLoadError
from dsv4rt.registry import REGISTRY


class Good(Backend):
    name, device_type = "good", "cpu"

    def probe(self):
        return Probe(True, "ok")

    def load(self, registrar):
        pass


class FakeEntryPoint:
    """What dsv4rt.plugins uses of an importlib.metadata.EntryPoint."""

    def __init__(self, name, factory, value=None):
        self.name, self._factory = name, factory
        self.value = value or f"fake_module:{name}"
        self.dist = types.SimpleNamespace(name=f"fake-dist-{name}")

    def load(self):
        if isinstance(self._factory, BaseException):
            raise self._factory
        return self._factory


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("DSV4RT_"):
            monkeypatch.delenv(k)
    dsv4rt.refresh()
    yield monkeypatch
    monkeypatch.undo()
    dsv4rt.refresh()
    REGISTRY.reset()


@pytest.fixture
def fake_eps(clean_env):
    """``fake_eps(*entry_points)``: discovery sees only these plug-ins and no built-in backend."""
    def _set(*eps):
        clean_env.setattr(plugins, "BUILTIN", {})
        clean_env.setattr(plugins, "metadata", types.SimpleNamespace(
            entry_points=lambda group: list(eps) if group == plugins.ENTRY_POINT_GROUP else []))
    return _set


def record(records, name):
    found = [r for r in records if r.name == name]
    assert found, f"no record for {name!r} in {records}"
    return found[-1]


def test_example_plugin_is_discovered_through_its_entry_point(clean_env):
    eps = [ep for ep in metadata.entry_points(group="dsv4rt.backends") if ep.name == "example"]
    assert eps, ("the example plug-in is not installed: "
                 "pip install -e tests/plugins/example_backend (the README's install command does it)")
    backends, records = plugins.discover()
    assert backends["example"].device_type == "cpu"
    r = record(records, "example")
    assert r.status == "loaded" and "dsv4rt_example:backend" in r.source and "dsv4rt-example-backend" in r.source
    REGISTRY.reset()
    names = {b["name"]: b for b in dsv4rt.list_backends()}
    assert names["example"]["available"] and names["example"]["status"] == "loaded"
    impls = {i.op: i for i in REGISTRY.load("example")}
    assert set(impls) == {"moe_route", "moe_dispatch", "moe_combine"}
    assert all(i.priority == 1 and i.name == "example/torch" for i in impls.values())


def test_example_plugin_computes_through_the_registry(clean_env):
    import torch

    REGISTRY.reset()
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    ids = torch.tensor([[1, 0], [1, 1], [0, 2]], dtype=torch.int32)
    xs, offsets, src = dsv4rt.ops.moe_dispatch(x, ids, 3, backend="example")
    assert offsets.tolist() == [0, 2, 5, 6] and src.tolist() == [1, 4, 0, 2, 3, 5]
    assert torch.equal(xs, x[torch.tensor([0, 2, 0, 1, 1, 2])])
    w = torch.full((3, 2), 0.5)
    y = dsv4rt.ops.moe_combine(xs, src, w, backend="example")
    assert torch.allclose(y, x)


def test_allowlist_skips_plugins_not_listed(clean_env):
    clean_env.setenv("DSV4RT_PLUGINS", "something_else")
    dsv4rt.refresh()
    backends, records = plugins.discover()
    assert "example" not in backends
    r = record(records, "example")
    assert (r.status, r.reason) == ("skipped", "not in DSV4RT_PLUGINS")
    clean_env.setenv("DSV4RT_PLUGINS", "none")
    dsv4rt.refresh()
    assert "example" not in plugins.discover()[0]
    clean_env.setenv("DSV4RT_PLUGINS", "example")
    dsv4rt.refresh()
    assert "example" in plugins.discover()[0]


def test_failing_plugin_is_recorded_and_shown_by_info(fake_eps):
    def boom():
        raise RuntimeError("driver exploded")
    fake_eps(FakeEntryPoint("broken", boom), FakeEntryPoint("unimportable", ImportError("no module named x")),
             FakeEntryPoint("good", Good))
    backends, records = plugins.discover()
    assert list(backends) == ["good"]
    assert record(records, "broken").status == "failed"
    assert "RuntimeError: driver exploded" in record(records, "broken").reason
    assert "ImportError" in record(records, "unimportable").reason
    REGISTRY.reset()
    d = dsv4rt.diagnose()
    failed = {p["name"]: p for p in d["plugins"] if p["status"] == "failed"}
    assert "driver exploded" in failed["broken"]["reason"]
    from dsv4rt.info import format_info
    assert "driver exploded" in format_info(d)


def test_failing_plugin_is_fatal_with_plugins_strict(fake_eps, clean_env):
    def boom():
        raise RuntimeError("driver exploded")
    fake_eps(FakeEntryPoint("good", Good), FakeEntryPoint("broken", boom))
    clean_env.setenv("DSV4RT_PLUGINS_STRICT", "1")
    dsv4rt.refresh()
    with pytest.raises(PluginLoadError, match="broken.*driver exploded"):
        plugins.discover()
    REGISTRY.reset()
    with pytest.raises(PluginLoadError, match="driver exploded"):
        dsv4rt.diagnose()


def test_api_version_mismatch_is_refused(fake_eps):
    class Future(Good):
        name, api_version = "future", 999
    fake_eps(FakeEntryPoint("future", Future))
    backends, records = plugins.discover()
    assert "future" not in backends
    r = record(records, "future")
    assert r.status == "failed" and "backend API 999" in r.reason and f"API {dsv4rt.API_VERSION}" in r.reason


def test_factory_must_return_a_backend(fake_eps):
    fake_eps(FakeEntryPoint("notabackend", lambda: object()))
    backends, records = plugins.discover()
    assert not backends and "not a dsv4rt Backend" in record(records, "notabackend").reason


def test_duplicate_names_are_refused(fake_eps):
    class Twin(Good):
        description = "second"
    fake_eps(FakeEntryPoint("good", Good), FakeEntryPoint("good2", Twin))
    backends, records = plugins.discover()
    assert type(backends["good"]) is Good                      # the first one stays
    dup = [r for r in records if r.status == "failed"]
    assert len(dup) == 1 and "duplicate backend name 'good'" in dup[0].reason
    REGISTRY.reset()
    with pytest.raises(PluginLoadError, match="already exists"):
        REGISTRY.add_backend(Good())
