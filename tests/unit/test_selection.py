"""Selection rules of design.md section 4, checked with fake backends (no real backend is involved).

The fixture empties the registry (no built-in backends, no entry-point plug-ins) so the tests do not depend
on what the real backends implement, then registers fakes with ``REGISTRY.add_backend``. Fake
implementations return a marker string ``"backend/variant"`` instead of computing anything, and most inputs
live on the ``meta`` device (no data, no real backend claims it).
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

import dsv4rt
from dsv4rt import plugins
from dsv4rt.backend import Backend, Probe
from dsv4rt.errors import BackendSelectionError, ContractError, MixedDeviceError, NoImplementationError
from dsv4rt.registry import REGISTRY

CALLS: list[tuple[str, tuple]] = []


def impl(op="moe_dispatch", variant="v", priority=0, requires=(), supports=None):
    return dict(op=op, variant=variant, priority=priority, requires=requires, supports=supports)


class Fake(Backend):
    def __init__(self, name, impls, device_type="meta", available=True, reason="fake", caps=None):
        self.name, self.device_type, self._impls = name, device_type, impls
        self._probe = Probe(available, reason, dict(caps or {}))

    def probe(self):
        return self._probe

    def load(self, registrar):
        for i in self._impls:
            marker = f"{self.name}/{i['variant']}"

            def fn(*args, _marker=marker):
                CALLS.append((_marker, args))
                return _marker
            registrar.implement(i["op"], i["variant"], fn, priority=i["priority"], requires=i["requires"],
                                supports=i["supports"])


@pytest.fixture
def add(monkeypatch):
    """Empty registry; ``add(*fakes)`` registers fake backends (removed again in teardown)."""
    for k in list(os.environ):
        if k.startswith("DSV4RT_"):
            monkeypatch.delenv(k)
    monkeypatch.setattr(plugins, "BUILTIN", {})
    monkeypatch.setenv("DSV4RT_PLUGINS", "none")
    dsv4rt.refresh()
    REGISTRY.reset()
    CALLS.clear()
    added: list[str] = []

    def _add(*fakes):
        for f in fakes:
            REGISTRY.add_backend(f)
            added.append(f.name)
    yield _add
    for name in added:
        REGISTRY.remove_backend(name)
    monkeypatch.undo()
    dsv4rt.refresh()
    REGISTRY.reset()


@pytest.fixture
def setenv(monkeypatch):
    def _set(name, value):
        monkeypatch.setenv(name, value)
        dsv4rt.refresh()
    return _set


def dispatch_args(t=4, device="meta"):
    return (torch.empty(t, 8, device=device), torch.zeros(t, 2, dtype=torch.int32, device=device), 4)


def dispatch(*, t=4, device="meta", **kw):
    return dsv4rt.ops.moe_dispatch(*dispatch_args(t, device), **kw)


def ladder():
    return [Fake(f"fake_{c}", [impl(priority=p), impl("moe_combine", priority=p)])
            for c, p in zip("abcde", (50, 40, 30, 20, 10))]


def test_automatic_selection_takes_the_highest_priority(add):
    add(Fake("lo", [impl(priority=1)]), Fake("hi", [impl(priority=9)]), Fake("mid", [impl(priority=5)]))
    assert dispatch() == "hi/v"
    assert CALLS[-1][1][0].device.type == "meta"


def test_precedence_backend_arg_beats_use_backend_beats_op_env_beats_preference_beats_auto(add, setenv):
    add(*ladder())
    assert dispatch() == "fake_a/v"                                   # automatic: highest priority
    setenv("DSV4RT_BACKEND", "fake_b")
    assert dispatch() == "fake_b/v"                                   # DSV4RT_BACKEND beats automatic
    setenv("DSV4RT_OP_BACKEND", "moe_dispatch=fake_c")
    assert dispatch() == "fake_c/v"                                   # DSV4RT_OP_BACKEND beats DSV4RT_BACKEND
    with dsv4rt.use_backend("fake_d"):
        assert dispatch() == "fake_d/v"                               # use_backend beats the environment
        assert dispatch(backend="fake_e") == "fake_e/v"               # backend= beats everything
    assert dispatch() == "fake_c/v"


def test_backend_preference_order_wins_over_priority(add, setenv):
    add(*ladder())
    setenv("DSV4RT_BACKEND", "fake_d, fake_a")
    assert dispatch() == "fake_d/v"
    setenv("DSV4RT_BACKEND", "fake_e")
    assert dispatch() == "fake_e/v"                                   # unlisted backends are not chosen
    choice = dsv4rt.ops.moe_dispatch.explain(*dispatch_args())
    assert ("fake_a", "not listed in DSV4RT_BACKEND") in choice.rejected


def test_op_backend_env_wildcard_and_per_op(add, setenv):
    add(*ladder())
    setenv("DSV4RT_OP_BACKEND", "*=fake_d; moe_combine=fake_e")
    assert dispatch() == "fake_d/v"
    y, src = torch.empty(8, 3, device="meta"), torch.zeros(8, dtype=torch.int32, device="meta")
    assert dsv4rt.ops.moe_combine(y, src, None, 2) == "fake_e/v"


def test_use_backend_nests_innermost_wins(add):
    add(*ladder(), Fake("multi", [impl(variant="fast", priority=9), impl(variant="slow", priority=1)]))
    y, src = torch.empty(8, 3, device="meta"), torch.zeros(8, dtype=torch.int32, device="meta")
    with dsv4rt.use_backend("fake_d"):
        with dsv4rt.use_backend({"moe_dispatch": "fake_e"}):
            assert dispatch() == "fake_e/v"
            assert dsv4rt.ops.moe_combine(y, src, None, 2) == "fake_d/v"   # falls through to the outer '*'
            with dsv4rt.use_backend("multi/slow"):
                assert dispatch() == "multi/slow"                          # a variant, below priority
            with dsv4rt.use_backend("multi"):
                assert dispatch() == "multi/fast"
        assert dispatch() == "fake_d/v"
    assert dispatch() == "fake_a/v"


def refuse_big(args):
    return "more than 2 rows" if args["x"].shape[0] > 2 else None


@pytest.mark.parametrize("how", ["arg", "context", "env"])
def test_explicit_choice_that_cannot_run_raises_and_is_never_replaced(add, setenv, how):
    add(Fake("good", [impl(priority=99)]),
        Fake("picky", [impl(variant="fast", priority=5, supports=refuse_big),
                       impl(variant="wide", priority=1, requires=("wide_mma",))]))
    kw = {}
    if how == "arg":
        kw["backend"] = "picky"
    elif how == "env":
        setenv("DSV4RT_OP_BACKEND", "moe_dispatch=picky")
    with dsv4rt.use_backend("picky") if how == "context" else _nullcontext():
        with pytest.raises(NoImplementationError) as exc:
            dispatch(**kw)
    msg = str(exc.value)
    assert "picky/fast: more than 2 rows" in msg
    assert "picky/wide: needs capabilities wide_mma" in msg
    assert "never silently replaced" in msg and "dsv4rt info" in msg
    assert "good" not in msg.split(":", 1)[1].split("\n", 1)[1]      # the runnable one is not a candidate
    assert CALLS == []                                                # and was not run instead


def _nullcontext():
    import contextlib
    return contextlib.nullcontext()


def test_explicit_choice_reasons_for_unavailable_missing_op_and_variant(add):
    add(Fake("good", [impl(priority=99)]), Fake("off", [impl()], available=False, reason="driver missing"),
        Fake("partial", [impl("moe_combine")]), Fake("cpuonly", [impl()], device_type="cpu"))
    cases = {"off": "off: unavailable: driver missing",
             "partial": "partial: does not implement moe_dispatch",
             "good/nosuch": "good/nosuch: no variant 'nosuch' of moe_dispatch is registered",
             "cpuonly": "cpuonly/v: runs on cpu tensors, the inputs are on meta"}
    for choice, reason in cases.items():
        with pytest.raises(NoImplementationError, match="never silently replaced") as exc:
            dispatch(backend=choice)
        assert reason in str(exc.value)
    assert CALLS == []


def test_supports_refusal_falls_to_the_next_variant(add):
    add(Fake("b", [impl(variant="fast", priority=10, supports=refuse_big), impl(variant="slow", priority=1)]))
    assert dispatch(t=2) == "b/fast"
    assert dispatch(t=4) == "b/slow"
    choice = dsv4rt.ops.moe_dispatch.explain(*dispatch_args(4))
    assert choice.impl.name == "b/slow" and ("b/fast", "more than 2 rows") in choice.rejected


def test_strict_forbids_falling_past_a_refused_variant(add, setenv):
    add(Fake("b", [impl(variant="fast", priority=10, supports=refuse_big), impl(variant="slow", priority=1)]))
    setenv("DSV4RT_STRICT", "1")
    assert dispatch(t=2) == "b/fast"
    with pytest.raises(NoImplementationError, match="DSV4RT_STRICT") as exc:
        dispatch(t=4)
    assert "b/fast: more than 2 rows" in str(exc.value)


@pytest.mark.parametrize("caps,expected", [({}, "b/slow"), ({"fp8_mma": False}, "b/slow"),
                                           ({"fp8_mma": True}, "b/fast")])
def test_requirement_on_a_capability(add, caps, expected):
    add(Fake("b", [impl(variant="fast", priority=10, requires=("fp8_mma",)), impl(variant="slow")], caps=caps))
    assert dispatch() == expected
    choice = dsv4rt.ops.moe_dispatch.explain(*dispatch_args())
    if expected == "b/slow":
        assert ("b/fast", "needs capabilities fp8_mma which this device lacks") in choice.rejected


def test_mixed_devices_raise_and_name_the_arguments(add):
    add(Fake("b", [impl()]))
    x, ids, e = torch.empty(4, 8, device="meta"), torch.zeros(4, 2, dtype=torch.int32), 4
    with pytest.raises(MixedDeviceError) as exc:
        dsv4rt.ops.moe_dispatch(x, ids, e)
    assert isinstance(exc.value, ContractError)
    msg = str(exc.value)
    assert "moe_dispatch" in msg and "x on meta" in msg and "ids on cpu" in msg
    assert exc.value.devices == {"x": "meta", "ids": "cpu"}
    assert CALLS == []


def test_fallback_to_another_device_only_when_asked(add, setenv, caplog):
    add(Fake("m", [impl()], device_type="meta"))
    with pytest.raises(NoImplementationError, match="DSV4RT_FALLBACK") as exc:
        dispatch(device="cpu")
    assert "no implementation can run this call on cpu" in str(exc.value)
    setenv("DSV4RT_FALLBACK", "meta")
    with caplog.at_level(logging.WARNING, logger="dsv4rt"):
        assert dispatch(device="cpu") == "m/v"
        assert dispatch(device="cpu", t=3) == "m/v"
    assert all(a.device.type == "meta" for a in CALLS[-1][1] if isinstance(a, torch.Tensor))   # copied over
    warnings = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1                                                                  # warns once
    assert dsv4rt.ops.moe_dispatch.explain(*dispatch_args(device="cpu")).fallback_device == "meta"
    setenv("DSV4RT_STRICT", "1")
    with pytest.raises(NoImplementationError, match="DSV4RT_STRICT=1 forbids the DSV4RT_FALLBACK"):
        dispatch(device="cpu")


def test_unknown_or_malformed_backend_names(add, setenv):
    add(Fake("b", [impl()]))
    with pytest.raises(BackendSelectionError, match="'nope', which does not exist; known backends: b"):
        dispatch(backend="nope")
    with pytest.raises(BackendSelectionError, match="nope"):
        with dsv4rt.use_backend("nope"):
            dispatch()
    with pytest.raises(BackendSelectionError):
        with dsv4rt.use_backend("a/b/c"):
            pass
    for name, value in (("DSV4RT_BACKEND", "nope"), ("DSV4RT_OP_BACKEND", "moe_dispatch=nope"),
                        ("DSV4RT_OP_BACKEND", "garbage")):
        setenv(name, value)
        with pytest.raises(BackendSelectionError):
            dispatch()
        setenv(name, "")
    assert dispatch() == "b/v"


def test_bad_arguments_raise_contract_errors_naming_op_and_argument(add):
    add(Fake("b", [impl()]))
    x, ids, e = dispatch_args()
    bad = [(([[1.0]], ids, e), "x"), ((x, ids.float(), e), "ids"), ((x, [[0, 1]], e), "ids"),
           ((x, ids, "4"), "num_experts"), ((x, ids, 0), "num_experts"), ((x, ids[:3], e), "ids")]
    for args, arg in bad:
        with pytest.raises(ContractError) as exc:
            dsv4rt.ops.moe_dispatch(*args)
        assert (exc.value.op, exc.value.arg) == ("moe_dispatch", arg), str(exc.value)
        assert str(exc.value).startswith(f"moe_dispatch: argument '{arg}': expected ")
    assert CALLS == []


def test_choices_are_cached_and_reselected_after_refresh(add, monkeypatch):
    seen = []

    def counting(args):
        seen.append(args["x"].shape)
    add(Fake("b", [impl(priority=5, supports=counting)]), Fake("c", [impl(priority=1)]))
    op = dsv4rt.ops.moe_dispatch
    for name in ("b", "c"):      # loading bumps the registry generation; load first so that the
        REGISTRY.load(name)      # first call's cache entry is not keyed on the pre-load generation
    assert dispatch() == "b/v" and dispatch() == "b/v"
    assert len(seen) == 1                                             # selected once per cache key
    assert dispatch(t=3) == "b/v" and len(seen) == 2                  # new shape: new key
    impl_ = op.resolve(*dispatch_args())
    assert impl_.name == "b/v" and impl_(*dispatch_args()) == "b/v" and len(seen) == 2
    monkeypatch.setenv("DSV4RT_OP_BACKEND", "moe_dispatch=c")
    assert dispatch() == "b/v"                                        # documented: env is read until refresh()
    dsv4rt.refresh()
    assert dispatch() == "c/v"                                        # refresh re-selects
    monkeypatch.delenv("DSV4RT_OP_BACKEND")
    dsv4rt.refresh()
    assert dispatch() == "b/v"
    add(Fake("d", [impl(priority=9)]))                                # a new backend re-selects too
    assert dispatch() == "d/v"


class Prepared(torch.Tensor):
    """A tensor subclass standing for a weight converted into a fused op's layout."""

    dsv4rt_key = "layout-a"


def test_a_tensor_subclass_is_selected_separately_from_a_plain_tensor(add):
    """The selection cache keys on the tensor type: a prepared input never reuses a plain input's choice
    (or the reverse), although both have the same shape, dtype and device."""
    only_prepared = impl(variant="fused", priority=10,
                         supports=lambda a: None if isinstance(a["x"], Prepared) else "needs a prepared x")
    add(Fake("b", [only_prepared, impl(variant="plain")]))
    x = torch.empty(4, 8, device="meta")
    ids = torch.zeros(4, 2, dtype=torch.int32, device="meta")
    assert dsv4rt.ops.moe_dispatch(x.as_subclass(Prepared), ids, 4) == "b/fused"
    assert dsv4rt.ops.moe_dispatch(x, ids, 4) == "b/plain"
    assert dsv4rt.ops.moe_dispatch(x.as_subclass(Prepared), ids, 4) == "b/fused"


def test_capabilities_published_at_load_satisfy_requirements(add):
    class Late(Fake):
        def load(self, registrar):
            registrar.publish_capabilities({"late_feature": True})
            super().load(registrar)

    add(Late("b", [impl(variant="fast", priority=10, requires=("late_feature",)), impl(variant="slow")]))
    assert "late_feature" not in REGISTRY.probe("b").capabilities
    assert dispatch() == "b/fast"
    assert REGISTRY.probe("b").capabilities["late_feature"] is True
