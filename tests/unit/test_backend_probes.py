"""Probes of the cuda and ascend backends, each in a fresh interpreter (probes must import nothing heavy).

Checks: the ascend probe never imports torch_npu and explains what is missing (torch_npu, CANN, device
nodes); the cuda probe imports no Triton and explains why it is unavailable on a host without a GPU;
``DSV4RT_TRITON_INTERPRET=1`` makes the cuda backend available for CPU tensors, below every cpu variant.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

PROBE = """
import json, sys
import dsv4rt
p = dsv4rt.REGISTRY.probe({name!r})
caps = {{k: str(v) for k, v in p.capabilities.items()}}
print(json.dumps({{"available": p.available, "reason": p.reason, "caps": caps,
                  "torch_npu": "torch_npu" in sys.modules, "triton": "triton" in sys.modules}}))
"""


def run(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter with the DSV4RT_* / ASCEND_* / TRITON_* variables cleared, plus
    ``env``; return the JSON it prints last."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("DSV4RT_", "ASCEND_", "TRITON_"))}
    clean.update(env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=clean, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def fake_torch_npu(tmp_path) -> str:
    """A directory holding a ``torch_npu`` package whose import fails loudly (so a probe that imports it is
    caught even if it swallows the error: the marker file appears)."""
    pkg = tmp_path / "fake" / "torch_npu"
    pkg.mkdir(parents=True)
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                     "raise ImportError('libhccl.so: cannot open shared object file')\n")
    return str(tmp_path / "fake")


# ------------------------------------------------------------------------------------------------ ascend

@pytest.mark.skipif(has_module("torch_npu"), reason="torch_npu is installed on this host")
def test_ascend_probe_without_torch_npu():
    r = run(PROBE.format(name="ascend"))
    assert r["available"] is False
    assert "torch_npu is not installed" in r["reason"]
    assert r["torch_npu"] is False and r["triton"] is False


@pytest.mark.skipif(has_module("torch_npu"), reason="torch_npu is installed on this host")
def test_ascend_probe_with_torch_npu_but_no_cann(tmp_path):
    path = fake_torch_npu(tmp_path)
    if os.path.isdir("/usr/local/Ascend"):
        pytest.skip("a CANN install exists on this host")
    r = run(PROBE.format(name="ascend"), PYTHONPATH=path)
    assert r["available"] is False
    assert "CANN toolkit not found" in r["reason"] and "ASCEND_HOME_PATH" in r["reason"]
    assert r["torch_npu"] is False and not (tmp_path / "imported").exists()


@pytest.mark.skipif(has_module("torch_npu"), reason="torch_npu is installed on this host")
def test_ascend_probe_with_cann_but_no_devices(tmp_path):
    path = fake_torch_npu(tmp_path)
    if any(n.startswith("davinci") for n in os.listdir("/dev")):
        pytest.skip("this host has Ascend device nodes")
    cann = tmp_path / "cann"
    cann.mkdir()
    r = run(PROBE.format(name="ascend"), PYTHONPATH=path, ASCEND_HOME_PATH=str(cann))
    assert r["available"] is False and "/dev/davinci" in r["reason"]
    assert r["caps"]["cann"] == str(cann)
    assert r["torch_npu"] is False and not (tmp_path / "imported").exists()


def test_ascend_load_failure_names_cann(tmp_path):
    """load() imports torch_npu; when that fails, the registry records a reason pointing at set_env.sh."""
    path = fake_torch_npu(tmp_path)
    r = run("""
        import json
        import dsv4rt
        from dsv4rt.errors import PluginLoadError
        try:
            dsv4rt.REGISTRY.load("ascend")
            print(json.dumps({"error": ""}))
        except PluginLoadError as exc:
            print(json.dumps({"error": str(exc)}))
    """, PYTHONPATH=path)
    assert "import torch_npu failed" in r["error"] and "set_env.sh" in r["error"]


def test_soc_family_table():
    from dsv4rt.backends.ascend import soc_family

    assert [soc_family(v) for v in (220, 225, 250, 260, 202, 999)] == ["A2", "A2", "A3", "950", "310P", "unknown"]


# -------------------------------------------------------------------------------------------------- cuda

def test_cuda_probe_is_cheap_and_explains():
    r = run(PROBE.format(name="cuda"))
    assert r["triton"] is False, "the cuda probe imported Triton"
    assert r["caps"]["interpreter"] == "False"
    if torch.cuda.is_available():
        assert r["available"] is True
    else:
        assert r["available"] is False and "CUDA" in r["reason"]


@pytest.mark.skipif(not has_module("triton"), reason="Triton is not installed")
def test_cuda_interpreter_mode_runs_on_cpu_only_when_explicit():
    r = run("""
        import json, os, sys
        import torch
        import dsv4rt
        probe = dsv4rt.REGISTRY.probe("cuda")
        before = os.environ.get("TRITON_INTERPRET")
        impls = dsv4rt.REGISTRY.load("cuda")
        cpu_prios = [i.priority for i in dsv4rt.REGISTRY.load("cpu")]
        logits = torch.randn(4, 8)
        auto = dsv4rt.ops.moe_route.resolve(logits, None, 2, 1.0)
        chosen = dsv4rt.ops.moe_route.resolve(logits, None, 2, 1.0, backend="cuda")
        ids, w = dsv4rt.ops.moe_route(logits, None, 2, 1.0, backend="cuda")
        print(json.dumps({
            "available": probe.available, "reason": probe.reason, "interp": probe.capabilities.get("interpreter"),
            "devices": sorted({i.device_type for i in impls}), "ops": len({i.op for i in impls}),
            "declared": len(dsv4rt.REGISTRY.specs),
            "max_cuda": max(i.priority for i in impls), "min_cpu": min(cpu_prios),
            "auto": auto.name, "explicit": chosen.name, "before": before,
            "after": os.environ.get("TRITON_INTERPRET"), "shape": list(ids.shape)}))
    """, DSV4RT_TRITON_INTERPRET="1")
    assert r["available"] is True and r["interp"] is True and "interpreter" in r["reason"].lower()
    assert r["devices"] == ["cpu"] and r["ops"] == r["declared"]
    assert r["max_cuda"] < r["min_cpu"]
    assert r["auto"].startswith("cpu/") and r["explicit"] == "cuda/triton"  # the Triton kernel, under the interpreter
    assert r["before"] is None and r["after"] == "1"      # set by load(), not by the probe
    assert r["shape"] == [4, 2]


@pytest.mark.skipif(not has_module("triton"), reason="Triton is not installed")
def test_enable_interpreter_refuses_when_kernels_already_imported():
    r = run("""
        import json, sys, types
        from dsv4rt.backends import cuda
        sys.modules[cuda.__name__ + ".kernels.fake"] = types.ModuleType("fake")
        try:
            cuda.enable_interpreter()
            print(json.dumps({"error": ""}))
        except RuntimeError as exc:
            print(json.dumps({"error": str(exc)}))
    """)
    assert "too late" in r["error"]


def test_cuda_interpreter_without_triton_is_unavailable(tmp_path):
    """With Triton hidden, interpreter mode says why it cannot run."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Hide())\n")
    r = run(PROBE.format(name="cuda"), DSV4RT_TRITON_INTERPRET="1", PYTHONPATH=str(hide))
    assert r["available"] is False and "Triton is not installed" in r["reason"]
