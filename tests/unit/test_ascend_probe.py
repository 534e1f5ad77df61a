"""The Ascend probe: unavailable with a reason on this host, never imports torch_npu itself, and with a
torch_npu (here a recording stand-in) already imported reports the SoC family and the fused ops by name.

The stand-in cases are WIRING tests of the probe: they prove it reads ``get_soc_version()`` and probes the
ops by name, not anything about a real NPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dsv4rt.backend import Registrar
from dsv4rt.backends.ascend import AscendBackend, fake_torch_npu
from dsv4rt.backends.ascend._npu import OPS
from dsv4rt.registry import REGISTRY

NO_TORCH_NPU = importlib.util.find_spec("torch_npu") is None


def run(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "ASCEND_", "TRITON_"))}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not NO_TORCH_NPU, reason="torch_npu is installed on this host")
def test_diagnose_lists_ascend_unavailable_and_imports_no_torch_npu():
    r = run("""
        import json, sys
        import dsv4rt
        d = dsv4rt.diagnose()
        (a,) = [b for b in d["backends"] if b["name"] == "ascend"]
        print(json.dumps({"available": a["available"], "reason": a["reason"], "caps": {k: str(v) for k, v in
                          a["capabilities"].items()}, "torch_npu": "torch_npu" in sys.modules}))
    """)
    assert r["available"] is False and "torch_npu is not installed" in r["reason"]
    assert r["caps"]["features"].startswith("probed at load()")
    assert r["torch_npu"] is False


def test_importing_the_backend_package_is_cheap():
    r = run("""
        import json, sys
        import dsv4rt.backends.ascend as a
        a.AscendBackend().probe()
        print(json.dumps({"torch": "torch" in sys.modules, "torch_npu": "torch_npu" in sys.modules,
                          "families": sorted(m for m in sys.modules if m.startswith("dsv4rt.backends.ascend."))}))
    """)
    assert r["torch_npu"] is False
    assert r["families"] == ["dsv4rt.backends.ascend._npu"] and r["torch"] is False


@pytest.mark.parametrize("soc_version,family", [(223, "A2"), (253, "A3"), (260, "950"), (202, "310P")])
def test_probe_reports_soc_and_features_when_torch_npu_is_imported(monkeypatch, soc_version, family):
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu.make(soc_version))
    p = AscendBackend().probe()
    assert p.available is True and f"SoC {family} ({soc_version})" in p.reason
    caps = p.capabilities
    assert caps["soc"] == family and caps["soc_version"] == soc_version and caps["device_count"] == 1
    assert all(caps[op] is True for op in OPS)
    assert caps["float4_e2m1fn_x2"] is True and "npu_grouped_matmul" in caps["features"]


def test_probe_reports_missing_features(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu.make(223, ops=("npu_grouped_matmul",)))
    caps = AscendBackend().probe().capabilities
    assert caps["npu_grouped_matmul"] is True
    assert caps["npu_lightning_indexer"] is False and caps["npu_fused_infer_attention_score"] is False


def test_probe_without_visible_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu.make(223, device_count=0))
    p = AscendBackend().probe()
    assert p.available is False and "no NPU is visible" in p.reason


def test_features_found_by_load_reach_the_earlier_probe(monkeypatch):
    """The registry probes before load(); the features load() finds are published through the registrar
    and merged into the cached probe, so every fused variant's ``requires=`` is satisfied afterwards."""
    from dsv4rt.registry import Registry

    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setenv("DSV4RT_PLUGINS", "none")
    backend = AscendBackend()
    reg = Registry(REGISTRY.specs.values())
    reg._backends, reg._records = {}, []
    reg.add_backend(backend)
    early = reg.probe("ascend")
    assert "npu_grouped_matmul" not in early.capabilities
    assert early.capabilities["features"].startswith("probed at load()")
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu.make(260))
    impls = reg.load("ascend")
    caps = reg.probe("ascend").capabilities
    assert caps["soc"] == "950" and caps["npu_grouped_matmul"] is True
    fused = [i for i in impls if i.variant == "fused"]
    assert fused and all(all(caps.get(r) for r in i.requires) for i in fused)
