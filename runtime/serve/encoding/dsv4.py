"""DeepSeek-V4 (``model_type`` ``deepseek_v4``): the dialect of the released ``encoding/encoding_dsv4.py``.

* DSML tags ``<｜DSML｜tool_calls>``, ``<｜DSML｜invoke name=…>``, ``<｜DSML｜parameter name=… string=…>``;
* the first system message is written as is (no role token); a later one is written as is too and does
  not ask for an answer;
* reasoning effort: the release knows ``high`` (the default, no text) and ``max``, which puts a fixed
  instruction before everything in thinking mode. Requests may send any of OpenAI's levels (``none``,
  ``minimal``, ``low``, ``medium``, ``high``, ``xhigh``) or ``max``; only ``max`` changes the prompt
  (``none`` selects chat mode before the encoder is reached). A number is refused: numeric effort is V4.1's.
"""
from __future__ import annotations

from typing import Any

from ..chat import MessageError
from .dsml import V4_TAGS
from .render import Dialect
from .tokens import V4_CONTROL

__all__ = ["DSV4", "LEVELS", "MAX_EFFORT"]

LEVELS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")

MAX_EFFORT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
"""The release's prefix for ``reasoning_effort="max"`` (thinking mode only)."""


def _effort_prefix(effort: Any) -> str:
    if effort is None or (isinstance(effort, str) and effort in LEVELS):
        return MAX_EFFORT if effort == "max" else ""
    raise MessageError(f"'reasoning_effort' for deepseek_v4 must be one of {', '.join(LEVELS)}, got {effort!r}"[:300],
                       "reasoning_effort")


DSV4 = Dialect("deepseek_v4", V4_TAGS, V4_CONTROL, _effort_prefix, system_token=False)
