"""A benchmark case: inputs at a real V4 shape, the minimum bytes and useful FLOPs, and the target."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["BenchCase", "Pipeline"]

# A pipeline runs several registry ops as one timed unit (e.g. a routed-MoE layer); it receives the
# case arguments and the backend name and returns a zero-argument callable.
Pipeline = Callable[[dict[str, Any], str], Callable[[], Any]]


@dataclass
class BenchCase:
    """One timed case.

    ``make(device, gen)`` returns the op's keyword arguments on ``device``. ``bytes`` counts every input
    read once and every output written once; ``flops`` the useful FLOPs (docs/performance.md section 1).
    ``pipeline`` (optional) replaces the single op call; ``baselines`` adds named reference timings built
    from the same arguments (e.g. cuBLAS BF16 on pre-dequantised weights). ``target_us`` is the
    docs/performance.md target, reported, never asserted; ``meets(fraction_of_roofline, ratios)`` judges a
    target stated as a roofline fraction and a speed-up over baselines instead (the CPU GEMV target).
    """

    name: str
    op: str
    make: Callable[[torch.device, torch.Generator], dict[str, Any]]
    bytes: float
    flops: float
    devices: tuple[str, ...] = ("cuda",)
    target: str = ""
    target_us: float | None = None
    pipeline: Pipeline | None = None
    baselines: dict[str, Callable[[dict[str, Any]], Callable[[], Any]]] = field(default_factory=dict)
    note: str = ""
    meets: Callable[[float, dict[str, float]], bool] | None = None
