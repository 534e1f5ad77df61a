"""The readable form of ``op.explain(...)``: every candidate implementation of the call and why each one
won or lost (the rule that decided, its priority, ``supports()`` refusals, missing capabilities, probes)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .select import Choice

__all__ = ["format_choice", "candidate_lines"]


def candidate_lines(choice: "Choice") -> list[tuple[str, str, str]]:
    """(implementation or backend, verdict, why) for every candidate: the chosen one first, then the
    runnable ones that lost on priority, then every rejected candidate with its reason."""
    best = choice.impl
    where = f" on {choice.fallback_device} (DSV4RT_FALLBACK copy)" if choice.fallback_device else ""
    rows = [(best.name, "chosen", f"{choice.rule}: priority {best.priority}, the highest runnable{where}")]
    for impl in sorted(choice.runnable, key=lambda i: -i.priority):
        if impl.name != best.name:
            rows.append((impl.name, "lost", f"could run this call, but priority {impl.priority} < "
                                            f"{best.priority} of {best.name}"))
    seen = {r[0] for r in rows}
    for name, reason in choice.rejected:
        if name not in seen:
            rows.append((name, "rejected", reason))
            seen.add(name)
    if choice.rule != "automatic" and not choice.rule.startswith("DSV4RT_BACKEND"):
        rows += _not_considered(choice, seen)
    return rows


def _not_considered(choice: "Choice", seen: set[str]) -> list[tuple[str, str, str]]:
    """Candidates an explicit rule (backend=, use_backend, DSV4RT_OP_BACKEND) excluded before screening."""
    from .errors import PluginLoadError
    from .registry import REGISTRY

    best, rows = choice.impl, []
    for name in REGISTRY.backends():
        if name == best.backend:
            try:
                impls = REGISTRY.implementations(best.op, name)
            except PluginLoadError:
                continue
            rows += [(i.name, "not considered", f"{choice.rule} names the variant {best.name}")
                     for i in impls if i.name not in seen]
        elif name not in seen:
            rows.append((name, "not considered", f"{choice.rule} restricts the choice to {best.backend}"))
    return rows


def format_choice(choice: "Choice") -> str:
    """A small table: one line per candidate, chosen first."""
    rows = candidate_lines(choice)
    width = max(len(r[0]) for r in rows)
    head = f"{choice.impl.op}: {choice.impl.name} (decided by {choice.rule})"
    return "\n".join([head] + [f"  {name:<{width}}  {verdict:<14}  {why}" for name, verdict, why in rows])
