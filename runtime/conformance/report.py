"""Conformance results: one row per (case, variant), a plain-text table and a JSON form."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CaseResult", "Report"]

FAILING = ("fail", "error", "xpass")


@dataclass
class CaseResult:
    """status: pass, fail, error (raised unexpectedly), xfail, xpass, not-implemented, unsupported (the
    variant's supports() refused the case: outside its documented range, selection falls through)."""

    case: str
    op: str
    implementation: str
    status: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    budget: float = 0.0
    tolerance: str = ""
    message: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    backend: str
    device: str
    seed: int
    results: list[CaseResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(r.status in FAILING for r in self.results)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status in FAILING]

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {"backend": self.backend, "device": self.device, "seed": self.seed, "passed": self.passed,
                "counts": self.counts(), "notes": self.notes,
                "results": [{k: clean(v) for k, v in asdict(r).items()} for r in self.results]}

    def format_table(self) -> str:
        head = ("case", "implementation", "status", "max abs err", "max rel err", "err/tol", "time ms")
        rows = [head]
        for r in self.results:
            nums = ("", "", "") if r.status in ("not-implemented", "unsupported") else (
                f"{r.max_abs:.3g}", f"{r.max_rel:.3g}", f"{r.budget:.3g}")
            rows.append((r.case, r.implementation, r.status, *nums, f"{r.seconds * 1e3:.1f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for r in self.failures():
            lines.append(f"{r.status.upper()} {r.case} [{r.implementation}]: {r.message}")
        for r in self.results:
            if r.status == "unsupported":
                lines.append(f"unsupported {r.case} [{r.implementation}]: {r.message}")
        tolerances: dict[str, list[str]] = {}
        for r in self.results:
            if r.tolerance and r.tolerance != "must raise" and r.tolerance not in tolerances.setdefault(r.op, []):
                tolerances[r.op].append(r.tolerance)
        for op, tols in tolerances.items():
            lines.append(f"tolerance {op}: " + " | ".join(tols))
        lines.extend(self.notes)
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"conformance {self.backend} on {self.device}: {verdict} ({counts})")
        return "\n".join(lines)
