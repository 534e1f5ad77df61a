"""`dsv4rt bench` command-line behaviour: bad --ops, --plot without matplotlib, units, targets."""
import builtins

import pytest

from dsv4rt.bench import cli as bench_cli
from dsv4rt.bench import runner
from dsv4rt.bench.report import format_report
from dsv4rt.bench.runner import BenchReport, BenchRow
from dsv4rt.cli import main


def _no_run(*a, **k):
    raise AssertionError("the bench must not start")


def test_unknown_op_is_an_error_listing_the_valid_ones(monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_bench", _no_run)
    assert main(["bench", "--ops", "nope,fp4_gemm"]) == 2
    err = capsys.readouterr().err
    assert "unknown op(s) nope" in err and "fp4_gemm" in err and "moe_combine" in err


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, capsys):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(runner, "run_bench", _no_run)
    assert main(["bench", "--plot", "x.png", "--ops", "fp4_gemm"]) == 2
    assert "matplotlib" in capsys.readouterr().err


def _row(case, impl, met, target="—"):
    return BenchRow(case, impl, 100.0, 0.0123, 0.5, 50.0, 0.5, {"cpu/numpy": 12.0}, target, met)


def test_report_uses_one_unit_per_column_and_fills_met():
    rep = BenchReport("cpu", {"torch": "x"}, {"device": "cpu", "read_tbs": 0.02, "copy_tbs": 0.019,
                                               "fp32_tflops": 0.3}, quick=True)
    rep.rows = [_row("a (quick)", "cpu/native", True, ">= 50%"), _row("b (quick)", "cpu/numpy", None)]
    text = format_report(rep)
    assert "TB/s" not in text and "TFLOP/s" not in text
    assert "read 20 GB/s" in text and "FP32 300 GFLOP/s" in text and "not comparable" in text
    assert "| 12.3 | 500 |" in text and "| >= 50% | yes |" in text


@pytest.mark.parametrize("fraction,speedup,expected", [(0.6, 12.0, True), (0.4, 12.0, False), (0.6, 5.0, False)])
def test_cpu_gemv_target_is_judged(fraction, speedup, expected):
    case = next(c for c in runner.cpu_cases(False) if c.meets is not None)
    assert runner._met(case, 1.0, fraction, {"cpu/numpy": speedup}) is expected


def test_valid_ops_cover_every_cpu_case():
    assert set(runner.bench_op_names("cpu")) == {c.op for c in runner.cpu_cases(True)}
    assert "moe_layer" in runner.bench_op_names("cuda")
    assert bench_cli.add_bench is not None


def test_model_bench_compares_the_configurations(tmp_path, capsys):
    """`dsv4rt bench --model tiny`: every configuration runs and the automatic one uses the native variants
    where they exist (timings and whether the greedy tokens agree are reported, never asserted: bf16
    kernels that sum in another order may flip a near-tie of the random weights' logits)."""
    import json

    out = tmp_path / "model.json"
    assert main(["bench", "--model", "tiny", "--quick", "--prompt-len", "16", "--new-tokens", "4",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    from dsv4rt.bench import model as model_bench
    assert [r["config"] for r in rows] == list(model_bench._configs())
    assert all(isinstance(r["same_tokens"], bool) and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)
    assert set(rows[0]["ops"]["fp8_gemm"]) == {"cpu/numpy"}
    if "cpu/native" in rows[-1]["ops"].get("fp4_grouped_gemm", {}):
        assert "cpu/native" in rows[-1]["ops"]["fp8_gemm"]
    if model_bench.NO_BF16 in model_bench._configs():                # the cap is lifted after its row
        assert __import__("dsv4rt._C", fromlist=["x"]).compiled_with()["active_isa"] == "avx512_bf16"
    assert "| tiny | automatic |" in capsys.readouterr().out


def test_model_bench_is_cpu_only(capsys):
    assert main(["bench", "--model", "tiny", "--backend", "cuda"]) == 2
    assert "CPU backend only" in capsys.readouterr().err
