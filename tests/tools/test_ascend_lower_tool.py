"""tools/ascend_lower.py runs in a triton-ascend environment; its table and merge logic need no Triton."""
from __future__ import annotations

import ascend_lower  # tools/ascend_lower.py (tests/tools/conftest.py puts tools/ on sys.path)


def test_markdown_counts_launches_per_chip_and_names_the_first_failure():
    ok = {"stage": "ttadapter", "dialects": "hivm:2 linalg:5"}
    bad = {"stage": "ttir", "error": "CompilationError: AssertionError: input_precision | tf32"}
    results = {"gemm.k": {"a2a3": [ok, bad], "950": [ok, ok]}, "moe.m": {"a2a3": [ok], "950": [ok]}}
    md = ascend_lower.markdown(results, ["a2a3", "950"], "3.2.0").splitlines()
    assert "**1 of 2 kernels lower for every launch**" in md[0] and "3 distinct launches" in md[0]
    assert md[2] == "| kernel | A2/A3 | 950 | result |"
    assert md[4] == "| `gemm.k` | 1/2 | 2/2 | fails at `ttir`: AssertionError: input_precision / tf32 |"
    assert md[5] == "| `moe.m` | 1/1 | 1/1 | lowers (hivm 2 linalg 5 ops) |"


def test_launches_are_lowered_with_the_constexprs_an_npu_launch_sets():
    class OnNpu:   # what dot_precision / on_interpreter read of a tensor
        device = type("Device", (), {"type": "npu"})()

    from dsv4rt.backends.cuda import _launch

    mod = ascend_lower
    assert mod.NPU_BUILD == {"INTERP": _launch.on_interpreter(OnNpu()), "DOT_PREC": _launch.dot_precision(OnNpu()),
                             "MASKED_GATHER": _launch.on_ascend(OnNpu())}
    recorded = {"DOT": {"tl.dtype": "fp32"}, "DOT_PREC": "tf32", "INTERP": True, "BLOCK_K": 64}
    assert mod.npu_build(recorded) == dict(recorded, DOT_PREC="hf32", INTERP=False)
    assert mod.npu_build({"KV41": True, "MASKED_GATHER": False})["MASKED_GATHER"] is True
    assert mod.npu_build({"BLOCK": 8}) == {"BLOCK": 8}   # kernels without them get none added
