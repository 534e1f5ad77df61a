"""tools/ascend_lower.py runs in a triton-ascend environment; its table and merge logic need no Triton."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool():
    spec = importlib.util.spec_from_file_location("ascend_lower", ROOT / "tools" / "ascend_lower.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_markdown_counts_launches_per_chip_and_names_the_first_failure():
    ok = {"stage": "ttadapter", "dialects": "hivm:2 linalg:5"}
    bad = {"stage": "ttir", "error": "CompilationError: AssertionError: input_precision | tf32"}
    results = {"gemm.k": {"a2a3": [ok, bad], "950": [ok, ok]}, "moe.m": {"a2a3": [ok], "950": [ok]}}
    md = tool().markdown(results, ["a2a3", "950"], "3.2.0").splitlines()
    assert "**1 of 2 kernels lower for every launch**" in md[0] and "3 distinct launches" in md[0]
    assert md[2] == "| kernel | A2/A3 | 950 | result |"
    assert md[4] == "| `gemm.k` | 1/2 | 2/2 | fails at `ttir`: AssertionError: input_precision / tf32 |"
    assert md[5] == "| `moe.m` | 1/1 | 1/1 | lowers (hivm 2 linalg 5 ops) |"
