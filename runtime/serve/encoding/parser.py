"""Streaming parser of a DeepSeek-V4 completion: reasoning, content and DSML tool calls.

Fed the completion's text piece by piece (control tokens decoded as text: ``<think>``, ``</think>``,
``｜DSML｜``), :class:`OutputParser` returns OpenAI ``delta`` objects as soon as they are certain, the way
vLLM's DeepSeek reasoning and tool parsers stream them:

* ``{"reasoning_content": str}`` -- text inside ``<think>`` ... ``</think>`` (a thinking-mode prompt ends
  with ``<think>``, so the completion starts inside it);
* ``{"content": str}`` -- the answer;
* ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}`` once an
  invoke tag is complete, then ``{"tool_calls": [{"index", "function": {"arguments": str}}]}`` pieces that
  concatenate to the call's JSON arguments (see :mod:`.dsml`): a string parameter's value streams as it
  comes, JSON-escaped.

Text that may be the start of a tag (a ``<`` or ``\\n`` at the end of a piece) is held back until the next
piece settles it, so a tag split across pieces is never shown. The ``\\n\\n`` before a tool-call block is
neither content nor reasoning. Leniencies, as vLLM's: a tool-call block that opens while still reasoning
ends the reasoning (V4 sometimes omits ``</think>`` before a call), a stray ``</think>`` in the answer and a
repeated ``<think>`` inside reasoning are dropped, ``<think>`` in the answer starts reasoning again, text
between DSML tags is ignored, and content after a block is content again. Tool calls are parsed only when
the parser was given DSML tags (the request offered tools).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Callable

from .dsml import DsmlTags
from .tokens import THINK_END, THINK_START

__all__ = ["OutputParser", "new_call_id"]

_REASONING, _CONTENT, _TOOLS, _INVOKE, _PARAM = "reasoning", "content", "tools", "invoke", "param"
_NAME = re.compile(r'name="(.*?)"', re.S)
_STRING = re.compile(r'string="(true|false)"')


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _earliest(buf: str, patterns: tuple[str, ...]) -> tuple[int, str | None]:
    found = [(i, p) for p in patterns if (i := buf.find(p)) >= 0]
    return min(found, key=lambda f: f[0]) if found else (-1, None)


def _held(buf: str, patterns: tuple[str, ...]) -> int:
    """Length of the longest end of ``buf`` that could still grow into one of ``patterns``."""
    best = 0
    for p in patterns:
        for k in range(min(len(p) - 1, len(buf)), best, -1):
            if buf.endswith(p[:k]):
                best = k
                break
    return best


class OutputParser:
    """``OutputParser(tags, thinking)``: ``feed(text)`` and ``finish()`` return the new deltas; afterwards
    ``content``, ``reasoning`` (None when the completion never reasoned and the prompt did not ask for
    it) and ``tool_calls`` (OpenAI format, in order) hold the whole message. ``tags`` None: no tool
    parsing (DSML is content). ``new_id`` makes the tool call ids."""

    def __init__(self, tags: DsmlTags | None, thinking: bool, new_id: Callable[[], str] = new_call_id) -> None:
        self.tags, self.new_id = tags, new_id
        self.state = _REASONING if thinking else _CONTENT
        self.content = ""
        self.reasoning: str | None = "" if thinking else None
        self.tool_calls: list[dict[str, Any]] = []
        self._buf = ""
        self._deltas: list[dict[str, Any]] = []
        self._string = False          # the open parameter is a string (its value is JSON-escaped)
        self._params = 0              # parameters of the open invoke
        self._text_stops: tuple[str, ...] = (THINK_START, THINK_END)
        if tags is not None:
            self._text_stops += (tags.block_open, "\n\n" + tags.block_open)

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Take the next piece of the completion; the deltas it settles."""
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[dict[str, Any]]:
        """End of the completion: what was held back (a cut-off tag or parameter is dropped)."""
        self._run(final=True)
        return self._take()

    # ---- the state machine -----------------------------------------------------------------------

    def _run(self, final: bool) -> None:
        step = {_REASONING: self._text, _CONTENT: self._text, _TOOLS: self._tools, _INVOKE: self._invoke,
                _PARAM: self._param}
        while step[self.state](final):
            pass

    def _text(self, final: bool) -> bool:
        tags, buf = self.tags, self._buf
        pos, pat = _earliest(buf, self._text_stops[:3])
        if pat is None:
            keep = 0 if final else _held(buf, self._text_stops)
            self._emit_text(buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        before, self._buf = buf[:pos], buf[pos + len(pat):]
        if tags is not None and pat == tags.block_open:
            self._emit_text(before[:-2] if before.endswith("\n\n") else before)
            self.state = _TOOLS
        else:
            self._emit_text(before)
            if pat == THINK_START and self.state == _CONTENT:
                self.state = _REASONING
                self.reasoning = self.reasoning or ""
            elif pat == THINK_END and self.state == _REASONING:
                self.state = _CONTENT
        return True

    def _tag(self, start: int, final: bool) -> str | None:
        """The attributes of the tag whose name ends at ``start`` (None: its ``>`` has not come yet)."""
        end = self._buf.find(">", start)
        if end < 0:
            if final:
                self._buf = ""
            return None
        attrs, self._buf = self._buf[start:end], self._buf[end + 1:]
        return attrs

    def _skip(self, final: bool, patterns: tuple[str, ...]) -> bool:
        self._buf = "" if final else self._buf[len(self._buf) - _held(self._buf, patterns):]
        return False

    def _tools(self, final: bool) -> bool:
        tags = self.tags
        assert tags is not None
        pos, pat = _earliest(self._buf, (tags.invoke_open, tags.block_close))
        if pat is None:
            return self._skip(final, (tags.invoke_open, tags.block_close))
        if pat == tags.block_close:
            self._buf = self._buf[pos + len(pat):]
            self.state = _CONTENT
            return True
        attrs = self._tag(pos + len(pat), final)
        if attrs is None:
            return False
        m = _NAME.search(attrs)
        self._start_call(m.group(1) if m else attrs.strip())
        self.state = _INVOKE
        return True

    def _invoke(self, final: bool) -> bool:
        tags = self.tags
        assert tags is not None
        stops = (tags.param_open, tags.invoke_close, tags.block_close)
        pos, pat = _earliest(self._buf, stops)
        if pat is None:
            return self._skip(final, stops)
        if pat == tags.param_open:
            attrs = self._tag(pos + len(pat), final)
            if attrs is None:
                return False
            name, string = _NAME.search(attrs), _STRING.search(attrs)
            self._string = string is None or string.group(1) == "true"
            self._emit_args(("{" if self._params == 0 else ", ") + json.dumps(name.group(1) if name else "",
                                                                              ensure_ascii=False)
                            + ": " + ('"' if self._string else ""))
            self._params += 1
            self.state = _PARAM
            return True
        self._buf = self._buf[pos + len(pat):]
        self._emit_args("}" if self._params else "{}")
        self.state = _TOOLS if pat == tags.invoke_close else _CONTENT
        return True

    def _param(self, final: bool) -> bool:
        tags = self.tags
        assert tags is not None
        pos = self._buf.find(tags.param_close)
        if pos < 0:
            keep = _held(self._buf, (tags.param_close,))         # a cut-off closing tag is never value
            self._emit_value(self._buf[:len(self._buf) - keep])
            self._buf = "" if final else self._buf[len(self._buf) - keep:]
            return False
        self._emit_value(self._buf[:pos])
        self._buf = self._buf[pos + len(tags.param_close):]
        if self._string:
            self._emit_args('"')
        self.state = _INVOKE
        return True

    # ---- output ----------------------------------------------------------------------------------

    def _emit_text(self, text: str) -> None:
        if not text:
            return
        key = "reasoning_content" if self.state == _REASONING else "content"
        if key == "content":
            self.content += text
        else:
            self.reasoning = (self.reasoning or "") + text
        last = self._deltas[-1] if self._deltas else None
        if last is not None and key in last:
            last[key] += text
        else:
            self._deltas.append({key: text})

    def _start_call(self, name: str) -> None:
        call = {"id": self.new_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.tool_calls.append(call)
        self._params = 0
        self._deltas.append({"tool_calls": [{"index": len(self.tool_calls) - 1, "id": call["id"],
                                             "type": "function", "function": {"name": name, "arguments": ""}}]})

    def _emit_value(self, text: str) -> None:
        if text:
            self._emit_args(json.dumps(text, ensure_ascii=False)[1:-1] if self._string else text)

    def _emit_args(self, text: str) -> None:
        index = len(self.tool_calls) - 1
        self.tool_calls[index]["function"]["arguments"] += text
        last = self._deltas[-1]["tool_calls"][0] if self._deltas and "tool_calls" in self._deltas[-1] else None
        if last is not None and last["index"] == index and "id" not in last:
            last["function"]["arguments"] += text
        else:
            self._deltas.append({"tool_calls": [{"index": index, "function": {"arguments": text}}]})

    def _take(self) -> list[dict[str, Any]]:
        out, self._deltas = self._deltas, []
        return out
