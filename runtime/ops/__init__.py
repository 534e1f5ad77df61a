"""The v1 ops (design.md section 2). Each name is an :class:`~dsv4rt.dispatch.Op`, built on first access.

``dsv4rt.ops.fp4_gemm(x, w, w_scale)`` checks the contract, picks an implementation for the inputs'
device and runs it. The declarations (contracts, checks) live in ``gemm``, ``indexer``, ``attention``,
``moe`` and ``engram``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["fp4_gemm", "fp4_grouped_gemm", "fp8_gemm", "indexer_topk", "indexer_scores", "select_candidate_blocks",
           "kv_compress", "sparse_attention", "moe_route", "moe_dispatch", "moe_combine",
           "engram_hash", "engram_lookup", "all_ops"]


def all_ops() -> dict[str, Any]:
    """Every declared op by name."""
    return {name: __getattr__(name) for name in __all__[:-1]}


def __getattr__(name: str) -> Any:
    if name not in __all__ or name == "all_ops":
        raise AttributeError(f"module 'dsv4rt.ops' has no attribute {name!r}")
    from ..dispatch import Op
    from ..registry import REGISTRY

    op = Op(REGISTRY.specs[name], REGISTRY)
    globals()[name] = op
    return op


def __dir__() -> list[str]:
    return sorted(__all__)
