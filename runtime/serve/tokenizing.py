"""Bodies of ``POST /tokenize`` and ``POST /detokenize``, vLLM's tokenizer endpoints.

``/tokenize`` takes ``{"prompt": str}`` or a chat ``{"messages", "tools", "tool_choice", "reasoning_effort",
"chat_template_kwargs"}`` (the prompt the chat endpoint would build), with ``add_special_tokens`` (default
true: the BOS the tokenizer prepends) and ``return_token_strs``; ``add_generation_prompt`` can only be true
(the chat formats always end with the assistant's turn). ``/detokenize`` takes ``{"tokens": [ids]}``. Both
take ``model`` (404 for another) and refuse other fields (400 naming them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .chat import ChatOptions, MessageError, validate_messages
from .fields import bad, get, get_bool, get_str, type_name
from .protocol import _chat_options, check_model

__all__ = ["TokenizeRequest", "parse_tokenize", "parse_detokenize"]

_CHAT = ("messages", "tools", "tool_choice", "reasoning_effort", "chat_template_kwargs", "add_generation_prompt")
_TOKENIZE = ("model", "prompt", "add_special_tokens", "return_token_strs") + _CHAT


@dataclass
class TokenizeRequest:
    """A validated ``/tokenize`` body: ``prompt`` text, or ``messages`` with their chat ``options``."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    options: ChatOptions
    add_special_tokens: bool = True
    return_token_strs: bool = False


def _fields(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type_name(body)}")
    for name in body:
        if name not in allowed:
            raise bad(name, f"Unrecognized request argument supplied: {name}"[:200])
    return body


def parse_tokenize(body: Any, model_name: str) -> TokenizeRequest:
    """Validate a ``/tokenize`` body (raises :class:`~.fields.ApiError`)."""
    body = _fields(body, _TOKENIZE)
    check_model(body, model_name)
    prompt = get_str(body, "prompt")
    has_chat = body.get("messages") is not None
    if (prompt is None) == (not has_chat):
        raise bad("prompt", "give exactly one of 'prompt' (text) and 'messages' (a chat)")
    if not has_chat and any(body.get(k) is not None for k in _CHAT):
        raise bad(next(k for k in _CHAT if body.get(k) is not None), "chat fields need 'messages'")
    if get_bool(body, "add_generation_prompt") is False:
        raise bad("add_generation_prompt", "'add_generation_prompt' false is not supported: the chat formats "
                  "always end with the assistant's turn")
    messages, options = None, ChatOptions()
    if has_chat:
        try:
            messages = validate_messages(body["messages"])
        except MessageError as exc:
            raise bad(exc.param, str(exc)) from None
        options = _chat_options(body)
    return TokenizeRequest(prompt, messages, options, get_bool(body, "add_special_tokens") is not False,
                           bool(get_bool(body, "return_token_strs")))


def parse_detokenize(body: Any, model_name: str, vocab_size: int) -> list[int]:
    """The token ids of a ``/detokenize`` body (raises :class:`~.fields.ApiError`)."""
    body = _fields(body, ("model", "tokens"))
    check_model(body, model_name)
    ids = get(body, "tokens", (list,), "an array of token ids")
    if ids is None:
        raise bad("tokens", "'tokens' is required")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad("tokens", "'tokens' must be an array of integers")
    out = [t for t in ids if not 0 <= t < vocab_size]
    if out:
        raise bad("tokens", f"token id {out[0]} is outside the vocabulary [0, {vocab_size})")
    return list(ids)
