"""The DeepSeek-V4 prompt encoder, one implementation for every dialect (V4, V4.1; see :mod:`.dsv4`,
:mod:`.dsv41`): OpenAI-style chat messages -> the prompt text, whose control tokens the tokenizer maps to
single ids.

Messages are chat.py's validated dicts: ``role`` system | user | assistant | tool, ``content`` (str),
optionally ``parts`` (the text parts of an array content, joined here with a blank line), ``tool_calls``
(OpenAI format) and ``reasoning_content`` on assistant turns, ``tool_call_id`` on tool turns.

The format (the released ``encode_messages``, default ``drop_thinking=True``)::

    BOS [effort prefix] [system content ["\\n\\n" tools section]]
    <｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>       (chat mode)
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{answer}[\\n\\n{DSML block}]<｜end▁of▁sentence｜>
    <｜User｜><tool_result>{result}</tool_result><｜Assistant｜><think>           (the turn to generate)

* Tool messages have no role of their own: each becomes a ``<tool_result>`` block of a user turn, and a run
  of user / tool messages is one user turn (blocks joined by a blank line); the results of one turn are put
  in the order of the calls of the assistant turn before it (by ``tool_call_id``).
* Request-level ``tools`` go into the first message when it is a system message, else into an empty system
  message put first (as vLLM does); the section follows the system content after a blank line.
* Thinking mode: the generation header is ``<｜Assistant｜><think>``. Assistant turns before the last user
  turn lose their reasoning (header ``</think>``, no ``</think>`` of their own); with tools in the
  conversation every turn keeps it (header ``<think>``, ``{reasoning}</think>``). Chat mode: ``</think>``
  headers and no reasoning anywhere.
* The conversation must end with a turn that asks for an answer (user or tool; V4.1: also a system message
  after the first), else :class:`~..chat.MessageError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..chat import MessageError
from .dsml import DsmlTags, render_tool_calls, render_tools
from .tokens import ASSISTANT, BOS, EOS, SYSTEM, THINK_END, THINK_START, USER

__all__ = ["Dialect", "render"]


@dataclass(frozen=True)
class Dialect:
    """What differs between the releases. ``effort_prefix(effort)`` is the text put at the very start of a
    thinking-mode prompt for a request's ``reasoning_effort`` (None: not given); it raises
    :class:`MessageError` (param ``reasoning_effort``) for a value the release does not take.
    ``system_token``: V4.1 marks system messages with ``<｜System｜>`` (the first one also when only the
    effort prefix is there) and a system message after the first asks for an answer, as a user turn does."""

    name: str
    tags: DsmlTags
    control: tuple[str, ...]
    effort_prefix: Callable[[Any], str]
    system_token: bool


@dataclass
class _Turn:
    role: str
    text: str = ""                                     # system / assistant content
    blocks: list[tuple[str, str, str]] = field(default_factory=list)  # user: (kind, text, tool_call_id)
    tools: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning: str | None = None


def _text(m: dict[str, Any]) -> str:
    parts = m.get("parts")
    return "\n\n".join(parts) if parts is not None else (m.get("content") or "")


def _turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[_Turn]:
    """Messages -> turns: user and tool messages merged into user turns, tools attached to a system turn."""
    turns: list[_Turn] = []
    for m in messages:
        role = m["role"]
        if role in ("user", "tool"):
            block = ("text", _text(m), "") if role == "user" else ("tool", _text(m), m.get("tool_call_id") or "")
            if turns and turns[-1].role == "user":
                turns[-1].blocks.append(block)
            else:
                turns.append(_Turn("user", blocks=[block]))
        elif role == "assistant":
            turns.append(_Turn("assistant", _text(m), tool_calls=m.get("tool_calls") or None,
                               reasoning=m.get("reasoning_content")))
        else:
            turns.append(_Turn("system", _text(m)))
    if tools:
        if turns and turns[0].role == "system":
            turns[0] = replace(turns[0], tools=tools)
        else:
            turns.insert(0, _Turn("system", "", tools=tools))
    _order_tool_results(turns)
    return turns


def _order_tool_results(turns: list[_Turn]) -> None:
    """Put the tool results of each user turn in the order of the preceding assistant turn's calls
    (results whose id is unknown sort as the first call; ties keep their order)."""
    order: dict[str, int] = {}
    for t in turns:
        if t.role == "assistant" and t.tool_calls:
            order = {c["id"]: i for i, c in enumerate(t.tool_calls) if c.get("id")}
        elif t.role == "user" and order:
            results = [b for b in t.blocks if b[0] == "tool"]
            if len(results) > 1:
                ranked = iter(sorted(results, key=lambda b: order.get(b[2], 0)))
                t.blocks = [next(ranked) if b[0] == "tool" else b for b in t.blocks]


def _asks(d: Dialect, turns: list[_Turn], i: int) -> bool:
    """Whether turn ``i`` is one the assistant answers (it gets the generation header)."""
    return turns[i].role == "user" or (d.system_token and turns[i].role == "system" and i > 0)


def _user(t: _Turn) -> str:
    return USER + "\n\n".join(text if kind == "text" else f"<tool_result>{text}</tool_result>"
                              for kind, text, _ in t.blocks)


def render(d: Dialect, messages: list[dict[str, Any]], thinking: bool, effort: Any = None,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text (starting with BOS) of ``messages`` in dialect ``d``, ready for the assistant turn."""
    prefix = d.effort_prefix(effort)                   # validates the effort in chat mode too
    turns = _turns(messages, tools)
    if not _asks(d, turns, len(turns) - 1):
        also = " (or a system message after the first)" if d.system_token else ""
        raise MessageError(f"the last message must be a user or tool message{also}, which {d.name} answers; "
                           f"got a {turns[-1].role} message last")
    last_user = max(i for i in range(len(turns)) if _asks(d, turns, i))
    keep = any(t.tools for t in turns)                 # conversations with tools keep every turn's reasoning
    out = [BOS]
    for i, t in enumerate(turns):
        head = prefix if i == 0 and thinking else ""
        if d.system_token and i == 0 and (head or t.role == "system"):
            head = SYSTEM + head
        out.append(head)
        if t.role == "system":
            out.append((SYSTEM if d.system_token and i > 0 else "") + t.text)
            if t.tools:
                out.append("\n\n" + render_tools(d.tags, t.tools))
        elif t.role == "user":
            out.append(_user(t))
        else:
            think = (t.reasoning or "") + THINK_END if thinking and (keep or i > last_user) else ""
            calls = "\n\n" + render_tool_calls(d.tags, t.tool_calls) if t.tool_calls else ""
            out.append(think + t.text + calls + EOS)
        if (i + 1 == len(turns) or turns[i + 1].role == "assistant") and _asks(d, turns, i):
            out.append(ASSISTANT + (THINK_START if thinking and (keep or i >= last_user) else THINK_END))
    return "".join(out)
