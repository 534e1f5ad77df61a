"""Importing dsv4rt and running `info` must stay cheap: no torch_npu, no triton, no CUDA initialisation.

Each check runs in a fresh interpreter so that nothing imported by other tests hides a regression.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, os, sys
before = dict(os.environ)
import dsv4rt
lazy = {"torch_imported_by_import": "torch" in sys.modules,
        "registry_imported_by_import": "dsv4rt.registry" in sys.modules,
        "environ_changed_by_import": dict(os.environ) != before}
dsv4rt.ops.fp4_gemm
lazy["backends_discovered_by_op_access"] = any(m.startswith("dsv4rt.backends.") for m in sys.modules)
lazy["heavy_after_import"] = sorted(m for m in ("torch_npu", "triton") if m in sys.modules)
d = dsv4rt.diagnose()
import torch
print(json.dumps({**lazy,
                  "heavy": sorted(m for m in ("torch_npu", "triton") if m in sys.modules),
                  "cuda_available": any(b["name"] == "cuda" and b["available"] for b in d["backends"]),
                  "cuda_initialized": torch.cuda.is_initialized()}))
"""


def run_probe() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_and_diagnose_stay_cheap():
    r = run_probe()
    assert r["heavy_after_import"] == [], f"`import dsv4rt` imported {r['heavy_after_import']}"
    # diagnose() loads every available backend; only a usable CUDA backend may bring Triton in
    allowed = ["triton"] if r["cuda_available"] else []
    assert r["heavy"] in ([], allowed), f"diagnose() imported {r['heavy']}"
    assert r["cuda_initialized"] is False
    assert r["torch_imported_by_import"] is False, "`import dsv4rt` must not import torch"
    assert r["registry_imported_by_import"] is False, "`import dsv4rt` must not build the registry"
    assert r["environ_changed_by_import"] is False, "`import dsv4rt` must not change os.environ"
    assert r["backends_discovered_by_op_access"] is False, "accessing dsv4rt.ops.X must not discover backends"
