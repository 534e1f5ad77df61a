"""Chat messages, request options and the chat format of a served model.

Messages are a non-empty list of ``{"role": system|user|assistant|tool, "content": ...}``; content is a
string, or a list of ``{"type": "text", "text": str}`` parts; an assistant or tool message may have null
content (treated as empty). Assistant messages may carry ``tool_calls`` (OpenAI format) and
``reasoning_content`` (earlier reasoning, as DeepSeek's API returns it), tool messages ``tool_call_id``.

The format, chosen once per server by :meth:`ChatTemplate.from_checkpoint`:

1. ``jinja`` -- the ``chat_template`` of ``tokenizer_config.json`` (in ``--tokenizer``'s folder, else in
   the checkpoint), rendered in jinja2's sandbox with ``messages``, ``add_generation_prompt=True``,
   ``bos_token`` / ``eos_token``, ``raise_exception``, ``tools`` and the request's
   ``chat_template_kwargs``; a checkpoint's own template always wins;
2. ``deepseek_v4`` / ``deepseek_v41`` -- dsv4rt's encoder of the release's format (:mod:`.encoding`), for a
   checkpoint of that ``model_type`` (the synthetic presets are V4) whose tokenizer holds the format's
   control tokens (``<｜User｜>``, ``<think>``, ``｜DSML｜``, ...) as single tokens;
3. ``fallback`` -- with neither (the byte tokenizer of the presets spells control tokens out as bytes): for
   each message ``"<|{role}|>\\n{content}\\n"`` (array content joined with newlines), then
   ``"<|assistant|>\\n"``.

With a DeepSeek ``model_type`` and such a tokenizer, completions are split by
:class:`~.encoding.OutputParser` into ``reasoning_content``, ``content`` and ``tool_calls`` (whichever
template made the prompt); it starts in reasoning when the prompt ends with ``<think>``.

The rendered text is tokenised with the tokenizer's ``encode`` (which prepends BOS, so a BOS the template
writes itself is dropped first).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ROLES", "MessageError", "validate_messages", "ChatOptions", "Prompt", "ChatTemplate",
           "fallback_render"]

ROLES = ("system", "user", "assistant", "tool")


class MessageError(ValueError):
    """Malformed chat messages (or a template that refuses them); ``param`` names the offending field."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def _parts(i: int, m: dict[str, Any]) -> list[str] | str:
    """The content as a string, or the texts of its parts."""
    c = m.get("content")
    if c is None and m["role"] in ("assistant", "tool"):
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise MessageError(f"messages[{i}].content[{j}]: only text parts "
                                   f"{{\"type\": \"text\", \"text\": str}} are supported", f"messages[{i}].content")
            texts.append(part["text"])
        return texts
    raise MessageError(f"messages[{i}].content must be a string or an array of text parts", f"messages[{i}].content")


def _tool_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise MessageError(f"{where} must be an array of tool calls", where)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise MessageError(f"{where}[{j}] must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\": str, "
                               f"\"arguments\": str}}}}, got {json.dumps(c)[:200]}", f"{where}[{j}]")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise MessageError(f"{where}[{j}].function.arguments must be a JSON string, got {type(args).__name__}",
                               f"{where}[{j}].function.arguments")
        cid = c.get("id")
        out.append({"id": cid if isinstance(cid, str) else "", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def _optional_str(i: int, m: dict[str, Any], key: str) -> str | None:
    v = m.get(key)
    if v is not None and not isinstance(v, str):
        raise MessageError(f"messages[{i}].{key} must be a string, got {type(v).__name__}", f"messages[{i}].{key}")
    return v


def validate_messages(obj: Any) -> list[dict[str, Any]]:
    """``[{"role", "content": str, ...}]`` from a request's ``messages`` (raises :class:`MessageError`):
    array content is joined with newlines in ``content`` and kept as ``parts``; assistant messages keep
    ``tool_calls`` and ``reasoning_content`` (or vLLM's ``reasoning``), tool messages ``tool_call_id``."""
    if not isinstance(obj, list) or not obj:
        raise MessageError("'messages' must be a non-empty array of messages")
    out = []
    for i, m in enumerate(obj):
        if not isinstance(m, dict):
            raise MessageError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise MessageError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}"[:300],
                               f"messages[{i}].role")
        parts = _parts(i, m)
        msg: dict[str, Any] = {"role": m["role"], "content": parts if isinstance(parts, str) else "\n".join(parts)}
        if isinstance(parts, list):
            msg["parts"] = parts
        if m["role"] == "assistant":
            if m.get("tool_calls") is not None:
                msg["tool_calls"] = _tool_calls(i, m["tool_calls"])
            reasoning = _optional_str(i, m, "reasoning_content")
            reasoning = reasoning if reasoning is not None else _optional_str(i, m, "reasoning")
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
        if m["role"] == "tool" and _optional_str(i, m, "tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


@dataclass(frozen=True)
class ChatOptions:
    """A request's chat options beyond the messages. ``tools``: OpenAI tool objects offered to the model;
    ``tool_choice`` "none" (not offered), "auto", "required" or ``{"type": "function", "function": {"name"}}``
    (only that tool is offered; neither is enforced by constrained decoding); ``thinking``: thinking mode;
    ``reasoning_effort``: as the format takes it; ``template_kwargs``: ``chat_template_kwargs``."""

    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = "auto"
    thinking: bool = False
    reasoning_effort: str | int | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt shows (None: none)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [t for t in self.tools if t["function"]["name"] == name]
        return list(self.tools)


@dataclass
class Prompt:
    """An encoded chat prompt: token ids, and the parser of the completion (None: plain content)."""

    ids: list[int]
    parser: Any = None


def fallback_render(messages: list[dict[str, Any]]) -> str:
    """The plain template of the module docstring."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def _token_text(v: Any) -> str:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


class ChatTemplate:
    """``ChatTemplate(source, bos_token, eos_token, dialect)``: a Jinja chat template (``source``), else the
    DeepSeek encoder of ``dialect``, else the fallback. ``dialect`` also selects the completion parser."""

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = "",
                 dialect: Any = None) -> None:
        self.source, self.bos_token, self.eos_token, self.dialect = source, bos_token, eos_token, dialect
        self._tpl = None
        if source is not None:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                self.source = None
            else:
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                self._tpl = env.from_string(source)

    @classmethod
    def from_checkpoint(cls, path: str | None, tokenizer: Any = None,
                        tokenizer_path: str | None = None, model_type: str = "deepseek_v4") -> "ChatTemplate":
        """The format of the module docstring for a checkpoint directory (None: a synthetic preset of
        ``model_type``)
        served with ``tokenizer``; the folder of ``tokenizer_path`` (``--tokenizer``) is searched first for
        ``tokenizer_config.json``. Raises :class:`~dsv4rt.errors.CheckpointError` for a tokenizer that
        holds some of the format's control tokens but not all."""
        from .encoding import dialect_for, read_model_type

        dialect = dialect_for(read_model_type(path) if path else model_type)
        if dialect is not None:
            dialect = _usable(dialect, tokenizer, tokenizer_path or path or "the preset's tokenizer")
        tok_dir = (tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)) \
            if tokenizer_path else None
        folders = [p for p in (tok_dir, path) if p]
        cfg_path = next((f for f in (os.path.join(p, "tokenizer_config.json") for p in folders) if os.path.isfile(f)),
                        None)
        if cfg_path is None:
            return cls(dialect=dialect)
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: take "default"
            tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
        return cls(tpl if isinstance(tpl, str) else None, _token_text(cfg.get("bos_token")),
                   _token_text(cfg.get("eos_token")), dialect)

    @property
    def kind(self) -> str:
        """"jinja", the DeepSeek dialect's name, or "fallback" (for the startup line)."""
        return "jinja" if self._tpl is not None else self.dialect.name if self.dialect is not None else "fallback"

    def render(self, messages: list[dict[str, Any]], options: ChatOptions | None = None) -> str:
        """The prompt text of ``messages`` followed by the assistant's turn."""
        o = options or ChatOptions()
        tools = o.offered_tools()
        if self._tpl is None and self.dialect is not None:
            from .encoding import render

            return render(self.dialect, messages, o.thinking, o.reasoning_effort, tools)
        if self._tpl is None:
            if tools:
                raise MessageError("'tools' need a chat format that shows them to the model: this model has neither "
                                   "a chat template nor a DeepSeek-V4 tokenizer (the plain fallback format is in "
                                   "use)", "tools")
            return fallback_render(messages)

        def raise_exception(msg: str) -> None:
            raise MessageError(f"chat template: {msg}")

        extra = {"tools": tools} if tools else {}
        try:
            return self._tpl.render(**{**o.template_kwargs, **extra}, messages=messages, add_generation_prompt=True,
                                    bos_token=self.bos_token, eos_token=self.eos_token,
                                    raise_exception=raise_exception)
        except MessageError:
            raise
        except Exception as exc:  # a template error is the request's messages not fitting the template
            raise MessageError(f"chat template failed on these messages: {exc}") from None

    def encode(self, messages: list[dict[str, Any]], tokenizer: Any, options: ChatOptions | None = None) -> list[int]:
        """Token ids of the rendered prompt (one BOS, from the tokenizer)."""
        return self.prepare(messages, tokenizer, options).ids

    def prepare(self, messages: list[dict[str, Any]], tokenizer: Any, options: ChatOptions | None = None) -> Prompt:
        """The prompt's ids and, for a DeepSeek model, a fresh parser of its completion."""
        from .encoding import OutputParser
        from .encoding.tokens import BOS, THINK_START

        text = self.render(messages, options)
        parser = None
        if self.dialect is not None:
            tags = self.dialect.tags if (options or ChatOptions()).offered_tools() else None
            parser = OutputParser(tags, thinking=text.rstrip().endswith(THINK_START))
        bos = self.bos_token if self._tpl is not None else BOS if self.dialect is not None else ""
        if bos and text.startswith(bos):
            text = text[len(bos):]
        return Prompt(tokenizer.encode(text), parser)


def _usable(dialect: Any, tokenizer: Any, where: str) -> Any:
    """``dialect`` when ``tokenizer`` holds all its control tokens, None when it holds none of them."""
    token_id = getattr(tokenizer, "token_id", None)
    missing = [t for t in dialect.control if token_id is None or token_id(t) is None]
    if len(missing) == len(dialect.control):
        return None
    if missing:
        from ..errors import CheckpointError

        raise CheckpointError(f"{where}: the tokenizer has no single token for {', '.join(missing)}, which the "
                              f"{dialect.name} chat format needs (a {dialect.name} tokenizer.json has them all)")
    return dialect
