"""Cost of going through the registry: a cached ``dsv4rt.ops.<op>(...)`` call versus calling the chosen
implementation directly, on CPU tensors, with and without value checks."""
from __future__ import annotations

import statistics
import timeit
from typing import Any

import torch

from .. import env

__all__ = ["measure_dispatch_overhead"]


def _per_call_us(fn: Any, number: int, repeat: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def measure_dispatch_overhead(number: int = 20000, repeat: int = 7, progress: bool = True) -> list[dict[str, Any]]:
    """Median per-call microseconds for two small ops (dispatch dominates their run time).

    Returns rows with: op, direct (the implementation's function called with positional args),
    dispatch (``dsv4rt.ops`` call, value checks off), dispatch_checked (default on CPU: value checks on),
    and the two overheads. ``progress``: a progress line on stderr, one step per timed series.
    """
    from .. import ops
    from ..model.progress import Progress

    gen = torch.Generator().manual_seed(0)
    cases = {
        "moe_combine": ((torch.randn(4, 8, generator=gen), torch.tensor([3, 0, 2, 1], dtype=torch.int32),
                         torch.rand(2, 2, generator=gen), None), {}),
        "sparse_attention": ((torch.randn(1, 1, 2, 16, generator=gen), torch.randn(1, 8, 16, generator=gen),
                              torch.tensor([[[0, 5, -1]]], dtype=torch.int32), torch.zeros(2), 0.25, False), {}),
    }
    steps = 3 * len(cases)
    bar = Progress(f"dispatch overhead ({repeat} x {number:,} calls per series)", steps, steps, enabled=progress,
                   quiet_below=0, unit="series", count_only=True)
    rows = []
    for name, (args, _) in cases.items():
        op = getattr(ops, name)
        impl = op.resolve(*args)
        direct = _per_call_us(lambda: impl.fn(*args), number, repeat)
        bar.advance(1)
        with env.override("DSV4RT_CHECK_VALUES", "never"):
            op(*args)
            dispatched = _per_call_us(lambda: op(*args), number, repeat)
        bar.advance(1)
        with env.override("DSV4RT_CHECK_VALUES", "always"):
            op(*args)
            checked = _per_call_us(lambda: op(*args), number, repeat)
        bar.advance(1)
        rows.append({"op": name, "implementation": impl.name, "direct_us": direct, "dispatch_us": dispatched,
                     "dispatch_checked_us": checked, "overhead_us": dispatched - direct,
                     "overhead_checked_us": checked - direct})
    bar.close()
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = "| op | implementation | direct call (us) | dsv4rt.ops call (us) | overhead (us) | with value checks (us) | overhead with checks (us) |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['implementation']} | {r['direct_us']:.2f} | {r['dispatch_us']:.2f} | "
                     f"{r['overhead_us']:.2f} | {r['dispatch_checked_us']:.2f} | {r['overhead_checked_us']:.2f} |")
    return "\n".join(lines)
