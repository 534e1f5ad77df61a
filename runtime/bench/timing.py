"""Timers: CUDA events with an L2 flush before every call on GPUs; wall clock with a cache flush on CPUs.

docs/performance.md section 5: warm up first, flush caches before each timed call (a 13 MB expert fits in the
H100's 50 MB L2), allocate outside the timed region, report the median.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["time_call", "Timing"]

_FLUSH: dict[str, torch.Tensor] = {}
FLUSH_BYTES = 256 * 2**20  # larger than any L2/L3 we run on


class Timing(dict):
    """median_us, min_us, reps; a dict so it serialises to JSON as is."""


def _flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":  # pragma: no cover - needs torch_npu
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def time_call(fn: Callable[[], Any], device: torch.device, reps: int = 30, warmup: int = 3,
              max_seconds: float = 10.0) -> Timing:
    """Median time of ``fn()`` with caches flushed before each call (flush not timed)."""
    flush = _flush_buffer(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            flush.add_(1)  # stream the buffer through every cache level
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples.append((time.perf_counter() - t0) * 1e6)
            if time.perf_counter() > budget_end and len(samples) >= 3:
                break
    return Timing(median_us=statistics.median(samples), min_us=min(samples), reps=len(samples))
