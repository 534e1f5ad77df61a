"""DeepSeek-V4.1 (``model_type`` ``deepseek_v41``): the dialect of the released ``encoding/encoding.py``.

Against V4 (:mod:`.dsv4`):

* DSML tag names with a leading space: ``<｜DSML｜ calls>``, ``<｜DSML｜ invoke name=…>``,
  ``<｜DSML｜ parameter name=… string=…>``;
* ``<｜System｜>`` opens the first system message (and the prompt, when thinking mode puts the effort
  there without one), and marks a system message later in the conversation, which asks for an answer
  like a user message;
* numeric reasoning effort, thinking mode only, first in the prompt:
  ``Reasoning Effort: {n} (range 1-100, the higher the value, the more thorough the reasoning)\\n\\n``.
  ``n`` is an integer 1-100 or a level: ``low`` 25, ``high`` 50 (the default, also when none is sent),
  ``xhigh`` 75, ``max`` 100; OpenAI's ``minimal`` is taken as ``low`` and ``medium`` as ``high``
  (``none`` selects chat mode before the encoder is reached).
"""
from __future__ import annotations

from typing import Any

from ..chat import MessageError
from .dsml import V41_TAGS
from .render import Dialect
from .tokens import V41_CONTROL

__all__ = ["DSV41", "BUDGETS", "DEFAULT_BUDGET", "budget"]

BUDGETS = {"minimal": 25, "low": 25, "medium": 50, "high": 50, "xhigh": 75, "max": 100}
DEFAULT_BUDGET = 50


def budget(effort: Any) -> int:
    """The 1-100 budget of a request's ``reasoning_effort`` (None: the default); raises MessageError."""
    if effort is None or effort == "none":
        return DEFAULT_BUDGET
    if isinstance(effort, int) and not isinstance(effort, bool) and 1 <= effort <= 100:
        return effort
    if isinstance(effort, str) and effort in BUDGETS:
        return BUDGETS[effort]
    raise MessageError(f"'reasoning_effort' for deepseek_v41 must be an integer in [1, 100] or one of "
                       f"none, {', '.join(BUDGETS)}; got {effort!r}"[:300], "reasoning_effort")


def _effort_prefix(effort: Any) -> str:
    return (f"Reasoning Effort: {budget(effort)} "
            "(range 1-100, the higher the value, the more thorough the reasoning)\n\n")


DSV41 = Dialect("deepseek_v41", V41_TAGS, V41_CONTROL, _effort_prefix, system_token=True)
