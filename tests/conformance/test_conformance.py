"""The conformance suite, run for every backend available on this machine, and shown to catch a broken op."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import dsv4rt
from dsv4rt.cli import main
from dsv4rt.conformance import run_conformance
from dsv4rt.registry import REGISTRY


def _available() -> list[str]:
    return [name for name in REGISTRY.backends() if REGISTRY.probe(name).available]


@pytest.mark.parametrize("backend", _available())
def test_every_available_backend_conforms(backend):
    report = run_conformance(backend)
    assert report.passed, "\n".join(f"{r.case} [{r.implementation}]: {r.message}" for r in report.failures())
    assert any(r.status == "pass" for r in report.results)


def test_cpu_backend_implements_all_nine_ops_in_both_variants():
    report = run_conformance("cpu")
    impls = {(r.op, r.implementation) for r in report.results if r.status == "pass"}
    for op in REGISTRY.specs:
        assert (op, "cpu/numpy") in impls and (op, "cpu/torch") in impls, op
        assert any(r.op == op and r.tolerance == "must raise" for r in report.results), f"{op} has no bad-input case"


def test_example_plugin_reports_the_rest_as_not_implemented():
    if "example" not in REGISTRY.backends():
        pytest.fail("the example plug-in (tests/plugins/example_backend) is not installed; "
                    "the README's install command installs it")
    report = run_conformance("example")
    assert report.passed
    missing = {r.op for r in report.results if r.status == "not-implemented"}
    assert missing == set(REGISTRY.specs) - {"moe_route", "moe_dispatch", "moe_combine"}


@pytest.fixture
def broken_fp4_gemm(monkeypatch):
    """The cpu backend with its NumPy fp4_gemm off by a little in one element."""
    from dsv4rt.backends.cpu import gemm

    good = gemm.fp4_gemm

    def broken(x, w, w_scale, *rest):  # the op's every parameter after w_scale (act_quant, act_block_size, ...)
        y = good(x, w, w_scale, *rest)
        if y.shape[0] > 1:
            y[1, 0] += 0.05 * (1 + y[1, 0].abs())
        return y

    monkeypatch.setattr(gemm, "fp4_gemm", broken)
    REGISTRY.reset()
    yield
    monkeypatch.undo()
    REGISTRY.reset()


def test_a_broken_op_fails_and_is_named(broken_fp4_gemm, capsys, tmp_path):
    report_file = tmp_path / "report.json"
    code = main(["conformance", "--backend", "cpu", "--ops", "fp4_gemm", "--report", str(report_file)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL fp4_gemm[M64-N256-K512-bf16] [cpu/numpy]" in out
    assert "conformance cpu on cpu: FAILED" in out
    data = json.loads(report_file.read_text())
    failed = {r["case"] for r in data["results"] if r["status"] == "fail"}
    assert "fp4_gemm[M64-N256-K512-bf16]" in failed and "fp4_gemm[M1-N256-K512-bf16]" not in failed
    assert all(r["implementation"] == "cpu/numpy" for r in data["results"] if r["status"] == "fail")


def test_an_unwritten_output_element_is_caught(monkeypatch):
    """Outputs are poisoned with NaN during conformance: a kernel that skips an element fails."""
    from dsv4rt.backend import new_output
    from dsv4rt.backends.cpu import moe

    good = moe.moe_combine

    def lazy(y_sorted, src, weights, topk=None):
        y = good(y_sorted, src, weights, topk)
        out = new_output(y.shape, y.dtype, y.device)
        if y.shape[0]:
            out[1:] = y[1:]
        return out

    monkeypatch.setattr(moe, "moe_combine", lazy)
    REGISTRY.reset()
    try:
        report = run_conformance("cpu", ops=["moe_combine"])
    finally:
        monkeypatch.undo()
        REGISTRY.reset()
    failed = {r.case for r in report.failures() if r.implementation == "cpu/numpy"}
    assert "moe_combine[T64-H128-top6]" in failed


def test_xfails_turn_a_known_failure_into_xfail(broken_fp4_gemm, tmp_path):
    xf = tmp_path / "xfails.txt"
    xf.write_text("# known\ncpu/numpy:fp4_gemm[M64-N256-K512-bf16] deliberately broken in this test\n")
    report = run_conformance("cpu", ops=["fp4_gemm"], xfails=dsv4rt.conformance.load_xfails(xf))
    statuses = {r.case: r.status for r in report.results if r.implementation == "cpu/numpy"}
    assert statuses["fp4_gemm[M64-N256-K512-bf16]"] == "xfail"
    assert not report.passed  # the other broken cases still fail


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed: the cuda backend cannot run under the Triton interpreter")
def test_cuda_backend_conforms_under_the_triton_interpreter():
    """Every cuda/* implementation, on CPU tensors, through Triton's interpreter (design.md section 4)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    env["DSV4RT_TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "dsv4rt", "conformance", "--backend", "cuda"],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "conformance cuda on cpu: PASSED" in proc.stdout
    assert "Triton interpreter" in proc.stdout
