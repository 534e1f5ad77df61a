"""The load generator: an in-process tiny server, concurrency 2, 4 requests of 4 tokens; the report has
its fields and finite figures (the figures themselves are benchmarks, never asserted)."""
import json
import math

import pytest

pytest.importorskip("httpx", reason="dsv4rt loadtest needs httpx (pip install 'dsv4rt[dev]')")
pytest.importorskip("starlette", reason="dsv4rt serve needs starlette (pip install 'dsv4rt[serve]')")
pytest.importorskip("uvicorn", reason="dsv4rt serve needs uvicorn (pip install 'dsv4rt[serve]')")

from dsv4rt.cli import main  # noqa: E402
from dsv4rt.serve.loadtest import make_prompts, percentile  # noqa: E402

FIELDS = ("requests_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
          "wall_s")


def test_percentile_and_prompts():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 100) == 2.0
    assert math.isnan(percentile([], 50))
    p = make_prompts(3, 20, seed=1)
    assert p == make_prompts(3, 20, seed=1) and all(len(x) == 20 for x in p)


def test_loadtest_in_process_reports_finite_figures(tmp_path, capsys):
    out = tmp_path / "load.json"
    rc = main(["loadtest", "--preset", "tiny", "--backend", "cpu", "--max-seq-len", "256", "--concurrency", "2",
               "--requests", "4", "--max-tokens", "4", "--prompt-len", "16", "--json", str(out)])
    text, err = capsys.readouterr()
    assert rc == 0, text
    assert "concurrency 1" in text and "concurrency 2" in text and "batch-2 decode" in text
    # progress on stderr: what it is doing, then each run's requests as they finish
    assert "starting the server in-process" in err and "4/4 requests" in err and "2 clients (batched)" in err, err
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and math.isfinite(report["batch_speedup"]) and report["batch_speedup"] > 0
    seq, bat = report["runs"]
    assert (seq["concurrency"], bat["concurrency"]) == (1, 2)
    for run in (seq, bat):
        assert run["requests"] == 4 and run["output_tokens"] == 16
        for f in FIELDS:
            assert isinstance(run[f], (int, float)) and math.isfinite(run[f]) and run[f] >= 0, (f, run)


def test_loadtest_refuses_url_with_a_preset(capsys):
    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--preset", "tiny"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def _closed_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_loadtest_without_a_server_is_one_line_and_exit_2(capsys):
    rc = main(["loadtest", "--url", f"http://127.0.0.1:{_closed_port()}", "--requests", "1", "--model", "m"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("dsv4rt loadtest: error: no usable server at"), err


def test_serve_checks_the_port_before_loading_the_model(capsys, monkeypatch):
    import socket

    from dsv4rt.serve import cli

    def no_model(*a, **k):
        raise AssertionError("the model was built before the port was checked")

    monkeypatch.setattr(cli, "build_server", no_model)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        rc = main(["serve", "--preset", "tiny", "--port", str(busy.getsockname()[1])])
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot listen on 127.0.0.1:" in err, err
