"""`dsv4rt run` and `dsv4rt kv-cache`."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

from dsv4rt.cli import main

OPS = ("fp8_gemm", "fp4_grouped_gemm", "sparse_attention", "kv_compress", "indexer_topk", "moe_route",
       "moe_dispatch", "moe_combine")


def _env(cache, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    env.update(DSV4RT_CACHE_DIR=str(cache), **extra)
    return env


def _dsv4rt(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "dsv4rt", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_run_without_arguments(tmp_path):
    t0 = time.perf_counter()
    p = _dsv4rt(["run"], _env(tmp_path))          # fresh cache: the tiny checkpoint is generated first
    elapsed = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert re.search(r"^text     .+", out, re.M)
    assert re.search(r"^prefill  \d+ tokens in [\d.]+ s = [\d.]+ tok/s", out, re.M)
    assert re.search(r"^decode   31 tokens in [\d.]+ s = [\d.]+ tok/s", out, re.M)
    for op in OPS:
        assert re.search(rf"^  {op} +\S+/\S+ \(\d+\)", out, re.M), op
    assert "model    tiny" in out and "weights on cpu" in out
    assert elapsed < 120, f"`dsv4rt run` took {elapsed:.1f} s"
    assert os.path.isdir(tmp_path) and any(n.startswith("tiny-") for n in os.listdir(tmp_path))


def _verdict(out):
    """(verdict line, positions checked, the network part's relative difference) of `run --check`."""
    verdict = re.search(r"^verdict  .*$", out, re.M)
    net = re.search(r"^  network .* max \|logit\| (\S+) .* top-1 (\d+)/(\d+)", out, re.M)
    assert verdict and net, out
    assert net.group(2) == net.group(3), out
    return verdict.group(0), int(net.group(3)), float(net.group(1))


def test_run_check_on_cpu(tmp_path, fresh_registry, capsys):
    fresh_registry.setenv("DSV4RT_CACHE_DIR", str(tmp_path))
    import dsv4rt

    dsv4rt.refresh()
    assert main(["run", "--backend", "cpu", "--prompt", "Hello", "--max-new-tokens", "4", "--check",
                 "--temperature", "0.7", "--prefill-chunk", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    verdict, positions, rel = _verdict(out)
    assert verdict.startswith("verdict  PASS") and positions == 6 + 4 and 0 < rel < 1e-4
    assert "prompt   'Hello' (6 tokens)" in out


def test_run_errors(tmp_path, capsys):
    assert main(["run", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope: does not exist" in capsys.readouterr().err
    assert main(["run", "--max-new-tokens", "0"]) == 2


def test_run_cuda_without_a_device_is_an_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    p = _dsv4rt(["run", "--backend", "cuda"], _env(tmp_path))
    assert p.returncode == 2 and "no CUDA device" in p.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_cuda_kernels_in_the_interpreter_agree_with_cpu(tmp_path):
    """The cuda backend (Triton kernels where they exist, cuda/torch elsewhere) under the Triton
    interpreter, checked against the float64 reference on the tiny preset: a few tokens."""
    p = _dsv4rt(["run", "--backend", "cuda", "--check", "--prompt", "Hi", "--max-new-tokens", "2",
                 "--dtype", "fp32", "--quiet"], _env(tmp_path, DSV4RT_TRITON_INTERPRET="1"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Triton interpreter" in p.stdout
    for op in OPS:
        assert re.search(rf"^  {op} +cuda/\S+", p.stdout, re.M), (op, p.stdout)
    verdict, positions, _ = _verdict(p.stdout)
    assert verdict.startswith("verdict  PASS") and positions == 3 + 2, p.stdout
    for op in OPS:   # the audit ran the Triton kernels too
        assert re.search(rf"^ +{op} +cuda/\S+ .* PASS$", p.stdout, re.M), (op, p.stdout)


def test_kv_cache_pro_at_1m_is_9_62_gib(capsys):
    assert main(["kv-cache", "--preset", "pro", "--context", "1048576"]) == 0
    out = capsys.readouterr().out
    assert "KV cache per sequence: 9.62 GiB (10,334,371,840 bytes)" in out
    assert "30 CSA, 31 HCA, 0 SWA" in out


@pytest.mark.parametrize("args,gib", [
    (["--preset", "flash", "--context", "1M"], "6.72"),
    (["--preset", "pro", "--context", "1M", "--format", "fp8", "--indexer", "fp4"], "4.92"),
    (["--preset", "pro", "--context", "1M", "--format", "fp8"], "5.39"),
    (["--preset", "flash", "--context", "1M", "--format", "fp8", "--indexer", "fp4"], "3.43"),
])
def test_kv_cache_other_accountings(capsys, args, gib):
    assert main(["kv-cache", *args]) == 0
    assert f"KV cache per sequence: {gib} GiB" in capsys.readouterr().out


def test_kv_cache_bad_context(capsys):
    assert main(["kv-cache", "--preset", "pro", "--context", "lots"]) == 2
