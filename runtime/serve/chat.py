"""Chat messages and the chat template.

Messages are a non-empty list of ``{"role": system|user|assistant|tool, "content": ...}``; content is a
string, or a list of ``{"type": "text", "text": str}`` parts (joined with newlines); an assistant or tool
message may have null content (treated as empty).

The template is the checkpoint's ``tokenizer_config.json`` ``chat_template`` (Jinja, rendered in jinja2's
sandbox with ``messages``, ``add_generation_prompt=True``, ``bos_token`` / ``eos_token`` from that file and
``raise_exception``) when the file has one and jinja2 is importable. Otherwise the plain fallback: for
each message ``"<|{role}|>\\n{content}\\n"``, then ``"<|assistant|>\\n"``; e.g.::

    <|system|>
    Be brief.
    <|user|>
    Hi
    <|assistant|>

The rendered text is tokenised with the tokenizer's ``encode`` (which prepends BOS, so a BOS the template
writes itself is dropped first).
"""
from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["ROLES", "MessageError", "validate_messages", "ChatTemplate", "fallback_render"]

ROLES = ("system", "user", "assistant", "tool")


class MessageError(ValueError):
    """Malformed chat messages (or a template that refuses them); ``param`` names the offending field."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def _content(i: int, m: dict[str, Any]) -> str:
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
        return "\n".join(texts)
    raise MessageError(f"messages[{i}].content must be a string or an array of text parts", f"messages[{i}].content")


def validate_messages(obj: Any) -> list[dict[str, str]]:
    """``[{"role", "content": str}]`` from a request's ``messages`` (raises :class:`MessageError`)."""
    if not isinstance(obj, list) or not obj:
        raise MessageError("'messages' must be a non-empty array of messages")
    out = []
    for i, m in enumerate(obj):
        if not isinstance(m, dict):
            raise MessageError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise MessageError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}"[:300],
                               f"messages[{i}].role")
        out.append({"role": m["role"], "content": _content(i, m)})
    return out


def fallback_render(messages: list[dict[str, str]]) -> str:
    """The plain template of the module docstring."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def _token_text(v: Any) -> str:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


class ChatTemplate:
    """``ChatTemplate(source, bos_token, eos_token)``: a Jinja chat template, or the fallback with None."""

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = "") -> None:
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
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
    def from_checkpoint(cls, path: str | None) -> "ChatTemplate":
        """The template of ``path/tokenizer_config.json`` when it has one, else the fallback."""
        cfg_path = os.path.join(path, "tokenizer_config.json") if path else None
        if not cfg_path or not os.path.isfile(cfg_path):
            return cls()
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: take "default"
            tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
        return cls(tpl if isinstance(tpl, str) else None, _token_text(cfg.get("bos_token")),
                   _token_text(cfg.get("eos_token")))

    @property
    def kind(self) -> str:
        """"jinja" or "fallback" (for the startup line)."""
        return "jinja" if self._tpl is not None else "fallback"

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of ``messages`` followed by the assistant's turn."""
        if self._tpl is None:
            return fallback_render(messages)

        def raise_exception(msg: str) -> None:
            raise MessageError(f"chat template: {msg}")

        try:
            return self._tpl.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                    eos_token=self.eos_token, raise_exception=raise_exception)
        except MessageError:
            raise
        except Exception as exc:  # a template error is the request's messages not fitting the template
            raise MessageError(f"chat template failed on these messages: {exc}") from None

    def encode(self, messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
        """Token ids of the rendered prompt (one BOS, from the tokenizer)."""
        text = self.render(messages)
        if self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return tokenizer.encode(text)
