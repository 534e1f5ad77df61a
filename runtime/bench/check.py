"""Correct before fast: every timed implementation's output is compared with the composite torch
variant (itself certified against the float64 reference by conformance) on the same inputs."""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["agree"]


def _tensors(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _close(a: torch.Tensor, b: torch.Tensor) -> str:
    low = b.dtype != torch.float64  # the tolerance follows the baseline's own precision
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not bool(torch.isfinite(a).all() or (torch.isnan(a) == torch.isnan(b)).all()):
        return "non-finite values where the baseline has none"
    scale = float(b.abs().max()) if b.numel() else 0.0
    tol = (2.0**-6 if low else 1e-4) * max(scale, 1e-30)
    err = float((a - b).abs().nan_to_num(0.0).max()) if a.numel() else 0.0
    return "" if err <= tol else f"max |diff| {err:.3g} > {tol:.3g} (2^-6 of max |baseline|)"


def agree(op: str, args: dict[str, Any], run: Callable[[dict[str, Any]], Any],
          baseline: Callable[[dict[str, Any]], Any]) -> str:
    """'' when ``run`` agrees with ``baseline`` on ``args``, else the reason. Selection ops (top-k,
    routing) are compared by the sorted selected scores, data movement exactly."""
    if op == "indexer_topk":
        with_scores = dict(args, return_scores=True)
        a = _tensors(run(with_scores))[1].sort(dim=-1).values
        b = _tensors(baseline(with_scores))[1].sort(dim=-1).values
        return _close(a.nan_to_num(neginf=0.0), b.nan_to_num(neginf=0.0))
    if op == "moe_route":
        a, b = run(args)[1].sort(dim=-1).values, baseline(args)[1].sort(dim=-1).values
        return _close(a, b)
    outs_a, outs_b = _tensors(run(args)), _tensors(baseline(args))
    for i, (a, b) in enumerate(zip(outs_a, outs_b)):
        if op == "moe_dispatch":
            if not torch.equal(a, b):
                return f"output {i} differs (dispatch must be exact)"
            continue
        problem = _close(a.float(), b.float())
        if problem:
            return f"output {i}: {problem}"
    return ""
