"""`dsv4rt info` and `dsv4rt conformance` (exit codes, output), and what dsv4rt.info computes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import dsv4rt
from dsv4rt import info, plugins
from dsv4rt.backend import Backend, Probe
from dsv4rt.cli import main
from dsv4rt.errors import BackendSelectionError
from dsv4rt.registry import REGISTRY


@pytest.fixture
def env(monkeypatch):
    """No DSV4RT_* from the caller's shell, an unknown DSV4RT_FOO, a fresh registry; all undone after."""
    for k in list(os.environ):
        if k.startswith("DSV4RT_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("DSV4RT_FOO", "1")
    dsv4rt.refresh()
    REGISTRY.reset()
    yield monkeypatch
    monkeypatch.undo()
    dsv4rt.refresh()
    REGISTRY.reset()


def test_info_text(env, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.split()[:2] == ["cpu", "cpu"] for line in lines), out       # the cpu backend row
    assert "DSV4RT_FOO=1" in out and "UNKNOWN" in out
    assert "Triton interpreter mode" in out
    for op in REGISTRY.specs:
        assert op in out
    assert "\x1b[" not in out                                                   # no colours


def test_info_json(env, capsys):
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    cpu = {b["name"]: b for b in d["backends"]}["cpu"]
    assert cpu["device_type"] == "cpu" and cpu["available"] is True and cpu["source"] == "built-in"
    assert d["env"]["unknown"] == ["DSV4RT_FOO"] and d["env"]["in_effect"]["DSV4RT_FOO"] == "1"
    assert d["triton_interpret"]["enabled"] is False
    assert set(d["ops"]) == set(REGISTRY.specs)
    assert "cpu" in d["device_types"]
    assert {p["name"] for p in d["plugins"]} >= {"cpu", "cuda", "ascend"}


def test_info_matrix(env, capsys):
    assert main(["info", "--matrix"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    header = [c.strip() for c in out[0].strip("|").split("|")]
    assert header[0] == "op" and "cpu" in header
    rows = [line for line in out[2:] if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(REGISTRY.specs)
    assert all(r.count("|") == len(header) + 1 for r in rows)


def test_python_dash_m_info():
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DSV4RT_")}
    environ["DSV4RT_FOO"] = "bar"
    proc = subprocess.run([sys.executable, "-m", "dsv4rt", "info"], capture_output=True, text=True,
                          env=environ, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cpu" in proc.stdout and "DSV4RT_FOO=bar" in proc.stdout and "UNKNOWN" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [[], ["bogus"], ["info", "--matrix", "--json"], ["conformance"],
                                  ["conformance", "--backend", "cpu", "--seed", "x"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


# ---- conformance: the command's plumbing, with the runner replaced -----------------------------------

class FakeReport:
    def __init__(self, passed):
        self.passed = passed

    def format_table(self):
        return "case  result\nx[1]  " + ("ok" if self.passed else "FAIL")

    def to_dict(self):
        return {"passed": self.passed, "cases": [{"id": "x[1]"}]}


@pytest.fixture
def runner(env):
    import dsv4rt.conformance as conf

    calls = []

    def run_conformance(backend, ops, xfails, seed):
        calls.append((backend, ops, xfails, seed))
        if backend == "nope":
            raise BackendSelectionError("no backend named 'nope'")
        return FakeReport(passed=backend == "good")
    env.setattr(conf, "run_conformance", run_conformance, raising=False)
    env.setattr(conf, "load_xfails", lambda path: {"x[2]": f"from {os.path.basename(path)}"}, raising=False)
    return calls


def test_conformance_pass_writes_report(runner, tmp_path, capsys):
    report, xf = tmp_path / "out.json", tmp_path / "xf.txt"
    assert main(["conformance", "--backend", "good", "--ops", "moe_route, moe_combine", "--report", str(report),
                 "--xfails", str(xf), "--seed", "7"]) == 0
    assert runner == [("good", ["moe_route", "moe_combine"], {"x[2]": "from xf.txt"}, 7)]
    assert "x[1]  ok" in capsys.readouterr().out
    assert json.loads(report.read_text()) == {"passed": True, "cases": [{"id": "x[1]"}]}


def test_conformance_failure_exits_1(runner, capsys):
    assert main(["conformance", "--backend", "bad"]) == 1
    assert runner == [("bad", None, None, 0)]
    assert "FAIL" in capsys.readouterr().out


def test_conformance_errors_exit_2_without_traceback(runner, capsys):
    assert main(["conformance", "--backend", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no backend named 'nope'" in err and "Traceback" not in err
    assert main(["conformance", "--backend", "good", "--ops", "moe_route,fp5_gemm"]) == 2
    assert "fp5_gemm" in capsys.readouterr().err


# ---- what info computes, on fake backends -------------------------------------------------------------

class Fake(Backend):
    device_type = "meta"

    def __init__(self, name, impls, available=True, caps=None):
        self.name, self._impls, self.loads = name, impls, 0
        self._probe = Probe(available, "fake" if available else "no such hardware", caps or {})

    def probe(self):
        return self._probe

    def load(self, registrar):
        self.loads += 1
        for op, variant, prio, req in self._impls:
            registrar.implement(op, variant, lambda *a: None, priority=prio, requires=req)


def test_diagnose_would_be_chosen_and_never_loads_unavailable_backends(env):
    env.setattr(plugins, "BUILTIN", {})
    env.setenv("DSV4RT_PLUGINS", "none")
    dsv4rt.refresh()
    REGISTRY.reset()
    a = Fake("a", [("moe_route", "fast", 9, ("mma",)), ("moe_route", "plain", 1, ()), ("moe_combine", "x", 0, ())])
    b = Fake("b", [("moe_route", "v", 5, ())])
    off = Fake("off", [("moe_route", "v", 99, ())], available=False)
    for f in (a, b, off):
        REGISTRY.add_backend(f)
    d = info.diagnose()
    assert off.loads == 0 and d["not_loaded"] == {"off": "no such hardware"}
    route = d["ops"]["moe_route"]
    assert route["chosen"]["meta"]["impl"] == "b/v"                  # a/fast lacks 'mma'; off is unavailable
    assert {v["name"]: v["priority"] for v in route["variants"]} == {"a/fast": 9, "a/plain": 1, "b/v": 5}
    assert not {v["name"]: v for v in route["variants"]}["a/fast"]["runnable"]
    assert d["ops"]["moe_combine"]["chosen"]["meta"]["impl"] == "a/x"
    assert d["ops"]["fp4_gemm"]["chosen"]["meta"]["impl"] is None
    env.setenv("DSV4RT_OP_BACKEND", "moe_route=a")
    dsv4rt.refresh()
    assert info.diagnose()["ops"]["moe_route"]["chosen"]["meta"]["impl"] == "a/plain"
    text = info.format_info(info.diagnose())
    assert "a/fast" in text and "NOT RUNNABLE" in text and "off: no such hardware" in text
    m = info.matrix().splitlines()
    assert m[0] == "| op | a | b | off |"
    assert "| `moe_route` | fast, plain | v | ? |" in m and "| `fp4_gemm` | — | — | ? |" in m
    assert any(line.startswith("- off: ") and "no such hardware" in line for line in m)
    assert off.loads == 0
    for f in (a, b, off):
        REGISTRY.remove_backend(f.name)
