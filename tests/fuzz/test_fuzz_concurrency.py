"""Ops called from 8 threads at once (cpu/native kernels, automatic selection, explicit choices) while
another thread flips the environment and calls dsv4rt.refresh(): no crash, no error, every result
right."""
from __future__ import annotations

import os
import threading

import torch

import dsv4rt
from dsv4rt import reference as ref
from dsv4rt.formats import quant_mxfp4


def test_eight_threads_and_refresh(fuzz_full, monkeypatch):
    calls = 600 if fuzz_full else 150                  # per worker thread and op kind
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, generator=g)
    w, s = quant_mxfp4(torch.randn(64, 128, generator=g))
    want_gemm = ref.fp4_gemm(x, w, s).float()
    q, kv = torch.randn(1, 2, 8, 64, generator=g), torch.randn(1, 40, 64, generator=g)
    idx = torch.randint(0, 40, (1, 2, 16), generator=g, dtype=torch.int32)
    want_attn = ref.sparse_attention(q, kv, idx, None, 0.125, p_dtype=torch.float32).float()
    y, src = torch.randn(8, 32, generator=g), torch.randperm(8, generator=g).to(torch.int32)
    want_comb = ref.moe_combine(y, src, None, 2).float()
    errors: list[str] = []
    stop = threading.Event()

    def worker(i: int) -> None:
        backend = (None, "cpu", "cpu/native", "cpu/numpy")[i % 4]
        try:
            for _ in range(calls):
                got = dsv4rt.ops.fp4_gemm(x, w, s, backend=backend)
                assert torch.allclose(got, want_gemm, rtol=1e-4, atol=1e-3), "fp4_gemm"
                got = dsv4rt.ops.sparse_attention(q, kv, idx, None, 0.125, False, torch.float32, backend=backend)
                assert torch.allclose(got, want_attn, rtol=1e-4, atol=1e-4), "sparse_attention"
                got = dsv4rt.ops.moe_combine(y, src, None, 2, backend=backend)
                assert torch.allclose(got, want_comb, rtol=1e-5, atol=1e-5), "moe_combine"
        except Exception as exc:  # collected, asserted below
            errors.append(f"thread {i} ({backend}): {type(exc).__name__}: {exc}")

    def flipper() -> None:
        n = 0
        while not stop.is_set():
            os.environ["DSV4RT_CHECK_VALUES"] = ("auto", "always", "never")[n % 3]
            os.environ["DSV4RT_BACKEND"] = ("cpu", "")[n % 2]
            dsv4rt.refresh()
            n += 1

    monkeypatch.setenv("DSV4RT_CHECK_VALUES", "auto")
    monkeypatch.setenv("DSV4RT_BACKEND", "")
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    flip = threading.Thread(target=flipper)
    flip.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    flip.join()
    monkeypatch.undo()
    dsv4rt.refresh()
    assert not errors, "\n".join(errors[:10])
