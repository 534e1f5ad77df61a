"""Plain-torch implementation of every v1 op, device-agnostic (design.md section 3).

The same code is the ``torch`` variant on every device (``cpu/torch``, ``cuda/torch``, ``ascend/torch``),
the same-device fallback when a fast kernel is missing, and the baseline in benchmarks. It uses only torch
operations that exist on every device: no NumPy, no float8 casts (formats are decoded by table look-up
through :mod:`dsv4rt.formats`), and no host synchronisation except ``fp4_grouped_gemm``'s segment
bounds (documented there). Everything is computed in float32; output dtypes follow each op's contract.

A backend registers these in its ``load()``::

    from dsv4rt.backends import composite
    composite.register(registrar, priority=0)

Importing this package is cheap; the op modules are imported by :func:`register`.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["OPS", "VARIANT", "register", "implementations"]

VARIANT = "torch"

OPS: dict[str, str] = {
    "fp4_gemm": "gemm",
    "fp4_grouped_gemm": "gemm",
    "fp8_gemm": "gemm",
    "indexer_topk": "indexer",
    "indexer_scores": "indexer",
    "select_candidate_blocks": "indexer",
    "kv_compress": "attention",
    "sparse_attention": "attention",
    "moe_route": "moe",
    "moe_dispatch": "moe",
    "moe_combine": "moe",
    "engram_hash": "engram",
    "engram_lookup": "engram",
}
"""Op name -> module of this package that implements it (under the same name)."""


def implementations() -> dict[str, Callable[..., Any]]:
    """Every composite implementation by op name (imports the op modules)."""
    return {op: getattr(importlib.import_module(f"{__name__}.{mod}"), op) for op, mod in OPS.items()}


def register(registrar: Any, priority: int = 0, device_type: str | None = None) -> None:
    """Register variant ``torch`` of all nine ops with ``registrar``.

    ``device_type`` defaults to the registering backend's device type; the CUDA backend passes "cpu"
    in Triton-interpreter mode.
    """
    dt = device_type or registrar.backend.device_type
    for op, fn in implementations().items():
        registrar.implement(op, VARIANT, fn, priority=priority, device_type=dt)
