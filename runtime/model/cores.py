"""Every core for the native kernels, one thread for the torch glue (CPU runs of the model).

``dsv4rt run`` and ``dsv4rt serve`` keep torch on one thread (:func:`glue_on_one_thread`): the glue's
elementwise loops and reductions then never depend on how torch splits them (the batch-invariant mode needs
that), and torch's OpenMP workers do not spin next to the kernels' threads. But torch and ``dsv4rt._C``
share one OpenMP runtime, and ``torch.set_num_threads(1)`` sets its thread count for both: the native
GEMMs, the attention and the output head ran on one core inside the model. :func:`native` runs one kernel
call with the thread count the process had before (every core, or what OMP_NUM_THREADS / the caller set)
and puts torch back on one thread after it (a pair of ``set_num_threads`` calls costs well under a
microsecond). Outside :func:`glue_on_one_thread` nothing changes.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch

__all__ = ["glue_on_one_thread", "native", "all_cores", "native_threads"]

_LOCK = threading.Lock()
_CORES = [0]     # the kernels' thread count while some caller holds the glue on one thread (0: not set)


def native_threads() -> int:
    """Threads the native kernels get inside :func:`glue_on_one_thread` (0 outside it)."""
    return _CORES[0]


@contextlib.contextmanager
def glue_on_one_thread(device: torch.device) -> Iterator[None]:
    """On the CPU: torch on one thread within the block, the native kernels on the threads torch had
    before (see the module docstring). Nested blocks (a server's engine thread) keep the outer count."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    with _LOCK:
        before = _CORES[0]
        _CORES[0] = max(before, saved)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
        with _LOCK:
            _CORES[0] = before


@contextlib.contextmanager
def all_cores() -> Iterator[None]:
    """Within the block the native kernels (and torch) run on the kernels' thread count; for a block that
    calls only native kernels (e.g. a loop of ``dsv4rt.invariant.linear``)."""
    n = _CORES[0]
    if n <= 1 or torch.get_num_threads() != 1:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def native(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` (a native kernel call) on the kernels' thread count."""
    n = _CORES[0]
    if n <= 1 or torch.get_num_threads() != 1:
        return fn(*args)
    torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(1)
