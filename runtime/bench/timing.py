"""Timers: CUDA events with an L2 flush before every call on GPUs; wall clock with a cache flush on CPUs.

docs/performance.md section 5: warm up first, flush caches before each timed call (a 13 MB expert fits in the
H100's 50 MB L2), allocate outside the timed region, report the median.

On a CPU the flush is of the data: with ``cold=`` tensors (the op's inputs) and the native extension, each
tensor's memory is evicted from every cache level (``dsv4rt._C.evict``, clflush) before each call, so the
op reads cold data while the interpreter, torch and the registry stay warm, as they do between the ops of
a model step, and as a GPU's L2 flush leaves the host warm. Without them a 256 MB buffer is streamed
through the caches, which also evicts the Python / torch state and adds ~0.1-0.3 ms of cold-code cost
to every call on a small CPU.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from ..backends.cpu import native_isa

__all__ = ["time_call", "Timing", "cold_data_flush"]

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


def _evictor(cold: Any) -> Callable[[], None] | None:
    """A function evicting the CPU tensors ``cold`` from the caches, or None where dsv4rt._C is not usable."""
    if cold is None or native_isa() is None:
        return None
    from dsv4rt import _C
    ranges = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in cold
              if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel()]

    def evict() -> None:
        for addr, n in ranges:
            _C.evict(addr, n)
    return evict


def cold_data_flush(device: torch.device) -> bool:
    """Whether CPU timings with ``cold=`` evict only the data (see the module docstring)."""
    return device.type == "cpu" and _evictor([torch.zeros(1)]) is not None


def time_call(fn: Callable[[], Any], device: torch.device, reps: int = 30, warmup: int = 3,
              max_seconds: float = 10.0, cold: Any = None) -> Timing:
    """Median time of ``fn()`` with caches flushed before each call (flush not timed); on a CPU with
    ``cold`` tensors, only their data is evicted (module docstring)."""
    flush = _flush_buffer(device)
    evict = _evictor(cold) if device.type == "cpu" else None
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
            if evict is not None:
                evict()
            else:
                flush.add_(1)  # stream the buffer through every cache level
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples.append((time.perf_counter() - t0) * 1e6)
            if time.perf_counter() > budget_end and len(samples) >= 3:
                break
    return Timing(median_us=statistics.median(samples), min_us=min(samples), reps=len(samples))
