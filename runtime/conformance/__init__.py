"""The conformance suite a backend author runs (design.md section 6).

``run_conformance("cpu")`` checks every implementation of a backend against the float64 reference
on seeded cases with stable ids, including edge cases and bad inputs that must raise;
``dsv4rt conformance --backend NAME`` is the command-line form.
"""
from __future__ import annotations

from .report import CaseResult, Report
from .runner import cases_for, load_xfails, run_conformance

__all__ = ["run_conformance", "load_xfails", "cases_for", "Report", "CaseResult"]
