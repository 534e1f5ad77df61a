"""Whether a bench run's ceilings can be trusted to judge its cases, as a pure function of the measured
numbers (no timing happens here, so tests inject the numbers).

A "% of roofline" or "met" verdict divides a case's time by the ceilings measured in the same run. On a
shared machine another process can take the cores or the memory bus while a probe runs: the ceiling then
collapses (a read ceiling of 4.37 GB/s instead of ~66) and every case looks fast against it (826% of the
roofline). The run gives no verdict when any of these holds for a ceiling it judges by (the two the
roofline uses, and every one with a documented figure for this machine class):

* its passes disagree: the median pass is more than ``SPREAD`` below the best pass;
* it is more than ``1 - FLOOR`` below the figure documented for this machine class (reference.py);
* re-measured after the cases, its best pass moved by more than ``DRIFT`` from the one before them;
* a case ran above ``SLACK`` times the roofline: faster than the machine can be, so a ceiling is wrong.
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable, Mapping, Sequence

from .ceilings import CEILING_NAMES, fmt_ceiling, roofline_keys
from .reference import Reference

__all__ = ["SPREAD", "FLOOR", "DRIFT", "SLACK", "judge_run", "no_verdict_text"]

# The native probes report the best of seven runs each; on a quiet 2-core machine their passes agree
# within ~5% (read) and ~1% (instruction peaks). 15% admits that jitter and rejects a pass taken while
# another process held one of the two cores (which halves a peak).
SPREAD = 0.15
# Documented figures are the low end of their range; the shared CI machine's read bandwidth was seen
# between 38 and 72 GB/s within an hour. Below 70% of the figure the roofline would overstate every
# memory-bound case by more than 1.4x, which is the difference between most targets' "yes" and "no".
FLOOR = 0.70
# The ceilings before and after the cases: the same bound as the passes' spread.
DRIFT = SPREAD
# A case may come this close above the roofline (the ceilings are best passes, a case its median time,
# and a kernel's access pattern can beat the probe's by a few percent); beyond it a ceiling is too low.
SLACK = 1.10


def _name(key: str) -> str:
    return CEILING_NAMES.get(key, key)


def _judged(ceilings: Mapping[str, Any], reference: Reference | None) -> list[str]:
    """The ceiling keys a run is judged by: the roofline's two, plus those with a documented figure."""
    keys = list(roofline_keys(dict(ceilings)))
    if reference is not None:
        keys += [k for k in reference.figures if k not in keys and ceilings.get(k)]
    return keys


def _passes(ceilings: Mapping[str, Any], key: str) -> Sequence[float]:
    return ceilings.get("passes", {}).get(key) or [float(ceilings[key])]


def _spread(key: str, passes: Sequence[float], when: str) -> list[str]:
    best, median = max(passes), statistics.median(passes)
    if best > 0 and median < (1 - SPREAD) * best:
        shown = " / ".join(fmt_ceiling(key, p) for p in passes)
        return [f"{_name(key)} passes {when}disagree: {shown}, median {1 - median / best:.0%} below the best "
                f"(bound {SPREAD:.0%})"]
    return []


def _floor(key: str, before: float, after: float | None, reference: Reference) -> list[str]:
    """One message for the lower of the ceiling before and after the cases, where it is below the floor."""
    figure = reference.figures.get(key)
    value, when = (after, " after the cases") if after is not None and after < before else (before, "")
    if figure and value < FLOOR * figure:
        return [f"{_name(key)} {fmt_ceiling(key, value)}{when} is {value / figure:.0%} of the documented "
                f"{fmt_ceiling(key, figure)} (needs >= {FLOOR:.0%})"]
    return []


def _drift(key: str, before: float, after: float) -> list[str]:
    if before > 0 and abs(after / before - 1) > DRIFT:
        return [f"{_name(key)} {fmt_ceiling(key, before)} before the cases, {fmt_ceiling(key, after)} after "
                f"({after / before - 1:+.0%}, bound {DRIFT:.0%})"]
    return []


def _over_roofline(fractions: Iterable[tuple[str, float]]) -> list[str]:
    over = [(name, f) for name, f in fractions if f is not None and f > SLACK]
    if not over:
        return []
    name, worst = max(over, key=lambda nf: nf[1])
    more = f" and {len(over) - 1} more" if len(over) > 1 else ""
    return [f"{name} ran at {worst:.0%} of the roofline{more} (above {SLACK:.0%}: a ceiling is too low)"]


def judge_run(ceilings: Mapping[str, Any], fractions: Iterable[tuple[str, float]] = (),
              reference: Reference | None = None, after: Mapping[str, Any] | None = None) -> list[str]:
    """Why the run can give no verdict ([] when it can): ``ceilings`` as measured before the cases (with
    their ``passes``), ``fractions`` (row name, fraction of the roofline) of every timed row, the documented
    ``reference`` for this machine class (None: unknown machine, or probes unlike the documented ones),
    and ``after``, the ceilings re-measured after the cases (None: not re-measured)."""
    problems: list[str] = []
    for key in _judged(ceilings, reference):
        before = float(ceilings[key])
        again = float(after[key]) if after is not None and after.get(key) else None
        problems += _spread(key, _passes(ceilings, key), "")
        if again is not None:
            problems += _spread(key, _passes(after or {}, key), "after the cases ")
            problems += _drift(key, before, again)
        if reference is not None:
            problems += _floor(key, before, again, reference)
    return problems + _over_roofline(fractions)


def no_verdict_text(problems: Sequence[str]) -> str:
    """The line a report prints in place of its verdicts."""
    return "no verdict: machine too noisy (" + "; ".join(problems) + ")"
