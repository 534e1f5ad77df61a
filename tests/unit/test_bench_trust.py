"""`dsv4rt bench` gives no verdict on a noisy machine: the judging (dsv4rt.bench.trust) is a pure function
of the measured ceilings, so these tests inject the numbers; nothing here asserts a timing."""
import json

import pytest

from dsv4rt.bench import runner, trust
from dsv4rt.bench.reference import REFERENCES, machine_identity, reference_for
from dsv4rt.bench.report import format_report
from dsv4rt.bench.runner import BenchReport, BenchRow
from dsv4rt.cli import main

CI_CPU = REFERENCES[0]   # the 2-core AMD EPYC machine README.md documents: read ~66 GB/s, BF16 836 GFLOP/s


def _ceilings(read=(0.066, 0.065, 0.064), bf16=(0.86, 0.85, 0.85), fp32=(0.46, 0.46, 0.45)):
    """Ceilings as measure_ceilings returns them (TB/s, TFLOP/s), with every pass."""
    passes = {"read_tbs": list(read), "bf16_tflops": list(bf16), "fp32_tflops": list(fp32),
              "copy_tbs": [0.055] * 3, "sgemm_tflops": [0.16] * 3}
    return {"device": "x86_64", "machine": dict(CI_CPU.match), **{k: max(v) for k, v in passes.items()},
            "passes": passes}


def _report(ceilings, fraction=0.53, met=True):
    rep = BenchReport("cpu", {"torch": "x"}, ceilings)
    rep.rows = [BenchRow("fp4_gemm[M1-N4096-K4096]", "cpu/native", 254.0, 0.0351, 0.132, 135.0, fraction,
                         {"cpu/numpy": 120.0}, ">= 50% of read bandwidth and >= 10x cpu/numpy", met),
                BenchRow("fp4_gemm[M1-N4096-K4096]", "cpu/numpy", 30480.0, 0.0003, 0.001, 135.0, 0.004,
                         {}, "baseline", None)]
    return rep


def _judge(rep, reference=CI_CPU, after=None):
    fractions = [(f"{r.case} [{r.implementation}]", r.fraction) for r in rep.rows]
    rep.withhold(trust.judge_run(rep.ceilings, fractions, reference, after))
    return rep


def test_quiet_machine_gives_verdicts_as_before():
    rep = _judge(_report(_ceilings()), after=_ceilings(read=(0.063, 0.064, 0.062)))
    assert rep.noisy == [] and rep.rows[0].met is True and rep.rows[0].fraction == 0.53
    text = format_report(rep)
    assert "no verdict" not in text and "| 53% |" in text and "| yes |" in text
    assert rep.to_dict()["verdict"] == "given" and rep.to_dict()["noisy"] is None


def test_collapsed_read_ceiling_gives_no_verdict():
    rep = _judge(_report(_ceilings(read=(0.00437, 0.00437, 0.00430)), fraction=8.26))
    reasons = " ".join(rep.noisy)
    assert "read 4.37 GB/s is 7% of the documented 66 GB/s" in reasons
    assert "826% of the roofline" in reasons
    row = rep.rows[0]
    assert row.met is None and row.fraction is None and row.roofline_us is None and row.us == 254.0
    lines = format_report(rep).splitlines()
    assert lines[0].startswith("no verdict: machine too noisy (read 4.37 GB/s")
    assert "| 254 | 35.1 | 132 | — | no verdict |" in lines[-2] and lines[-2].endswith("| no verdict |")
    assert lines[-1].endswith("| baseline | — |")      # baselines had no verdict to withhold
    d = rep.to_dict()
    assert d["verdict"] is None and "4.37 GB/s" in d["noisy"] and d["rows"][0]["met"] is None
    json.dumps(d)


def test_disagreeing_passes_give_no_verdict_even_on_an_unknown_machine():
    rep = _judge(_report(_ceilings(bf16=(0.85, 0.52, 0.47))), reference=None)
    assert rep.noisy == ["BF16 passes disagree: 850 GFLOP/s / 520 GFLOP/s / 470 GFLOP/s, median 39% below "
                         "the best (bound 15%)"]
    assert "no verdict" in format_report(rep)


def test_case_above_the_roofline_gives_no_verdict():
    rep = _judge(_report(_ceilings(), fraction=8.26), reference=None)
    assert rep.noisy == ["fp4_gemm[M1-N4096-K4096] [cpu/native] ran at 826% of the roofline (above 110%: "
                         "a ceiling is too low)"]


def test_ceilings_that_moved_during_the_run_give_no_verdict():
    rep = _judge(_report(_ceilings()), after=_ceilings(read=(0.050, 0.049, 0.049)))
    assert rep.noisy == ["read 66 GB/s before the cases, 50 GB/s after (-24%, bound 15%)"]


def test_a_ceiling_that_collapsed_during_the_cases_is_reported_once():
    rep = _judge(_report(_ceilings()), after=_ceilings(read=(0.00437, 0.00437, 0.00430)))
    assert rep.noisy == ["read 66 GB/s before the cases, 4.37 GB/s after (-93%, bound 15%)",
                         "read 4.37 GB/s after the cases is 7% of the documented 66 GB/s (needs >= 70%)"]


def test_a_peak_far_below_its_documented_figure_gives_no_verdict():
    """One of the two cores taken by another process: the passes agree, at half the documented peak."""
    rep = _judge(_report(_ceilings(bf16=(0.465, 0.464, 0.461), fp32=(0.233, 0.232, 0.231))))
    assert [p.split(" is ")[0] for p in rep.noisy] == ["BF16 465 GFLOP/s", "FP32 233 GFLOP/s"]


def test_unknown_machine_is_judged_by_agreement_only():
    """Low but steady ceilings of a machine with no documented figures are its real ceilings."""
    assert trust.judge_run(_ceilings(read=(0.00437, 0.00436, 0.00430)), [], reference=None) == []


@pytest.mark.parametrize("slack,expected", [(1.05, []), (trust.SLACK + 0.01, ["x ran at"])])
def test_measurement_slack_above_the_roofline(slack, expected):
    problems = trust.judge_run(_ceilings(), [("x", slack)], reference=None)
    assert [p[:8] for p in problems] == expected


def test_reference_figures_are_looked_up_by_machine_class():
    assert reference_for(dict(CI_CPU.match)) is CI_CPU
    assert reference_for({**CI_CPU.match, "threads": 64}) is None     # another host of the same CPU model
    assert reference_for({"device": "NVIDIA H100 80GB HBM3"}).figures["read_tbs"] == 3.03
    assert reference_for(None) is None and reference_for({"device": "cpu", "cpu": "other"}) is None
    ident = machine_identity(__import__("torch").device("cpu"))
    assert ident["device"] == "cpu" and "threads" in ident and "isa" in ident


def test_cli_keeps_its_exit_code_and_writes_no_verdict_to_json(monkeypatch, tmp_path, capsys):
    """The whole command with disagreeing ceiling passes injected: the cases still run and print their
    timings, the report and JSON say why no verdict is given, and the exit code is that of a good run."""
    calls = []

    def fake_ceilings(device, quick=False, passes=3):
        calls.append(quick)
        return _ceilings(read=(0.066, 0.030, 0.020))
    monkeypatch.setattr(runner, "measure_ceilings", fake_ceilings)
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--ops", "moe_route", "--json", str(out)]) == 0
    assert calls == [True, True]                      # before and after the cases
    text = capsys.readouterr().out
    assert text.startswith("no verdict: machine too noisy (read passes disagree")
    assert "re-measured after the cases: read 66 GB/s, BF16 860 GFLOP/s" in text
    d = json.loads(out.read_text())
    assert d["verdict"] is None and d["noisy"].startswith("no verdict: machine too noisy")
    assert d["rows"] and all(r["fraction"] is None and r["us"] > 0 for r in d["rows"])
