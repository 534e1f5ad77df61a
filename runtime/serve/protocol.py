"""The OpenAI request protocol: a request body (JSON, checked by :func:`parse_json`) validated into a typed
:class:`CompletionRequest` or :class:`ChatRequest`; errors are OpenAI error bodies ``{"error": {"message",
"type", "param", "code"}}`` (:mod:`.fields`).

Which fields each endpoint takes, and the bounds of the sampling ones, are :mod:`.params`'s: a field it does
not implement is refused with 400 naming it, never accepted and ignored. Here: the prompt (a string, token
ids, or an array of either: one completion each), ``n`` and ``best_of`` (1..128 sequences per request in
all), ``echo``, ``stream`` / ``stream_options``.

Chat requests also take ``tools`` (``[{"type": "function", "function": {"name", "description",
"parameters"}}]``), ``tool_choice`` ("none", "auto", "required" or ``{"type": "function", "function":
{"name"}}`` naming one of ``tools``), ``reasoning_effort`` (a string, or an integer for V4.1) and
``chat_template_kwargs`` (an object; its ``thinking`` or ``enable_thinking`` boolean selects thinking
mode, as vLLM reads them). Thinking mode is off unless asked for there, or implied by a
``reasoning_effort`` other than "none"; "none" turns it off.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .chat import ChatOptions, MessageError, validate_messages
from .fields import ApiError, bad, error_body, get, get_bool, get_int, in_range, type_name
from .params import MAX_SEQUENCES, check_fields, sampling
from .sampling import SamplingParams

__all__ = ["ApiError", "error_body", "CompletionRequest", "ChatRequest", "parse_json", "check_json",
           "parse_completion", "parse_chat", "MAX_DEPTH"]

MAX_DEPTH = 64
"""Nesting depth a request body may have (a JSON schema of tool parameters is far shallower)."""

_bad, _type_name, _get = bad, type_name, get


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body, checked by :func:`check_json` (400 when it is not JSON, holds NaN
    or Infinity, nests deeper than ``MAX_DEPTH`` or holds a lone UTF-16 surrogate)."""
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}"[:300]) from None
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from None
    check_json(obj)
    return obj


def check_json(obj: Any) -> None:
    """Refuse (400) a value nested deeper than ``MAX_DEPTH`` or holding a string (or key) that is not valid
    Unicode text (a lone surrogate, which JSON's ``\\ud800`` escapes can write); ``param`` names where."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels", path.split("[")[0] or None)
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{path or 'the body'} holds a lone UTF-16 surrogate, which is not text",
                               path or None) from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, path, depth + 1))
                stack.append((x, f"{path}.{k}" if path else str(k), depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


@dataclass
class CompletionRequest:
    """A validated ``/v1/completions`` body: one or more prompts (text or token ids), each generating
    ``best_of`` sequences of which the ``n`` best come back (best_of = n: all)."""

    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    best_of: int = 1
    echo: bool = False


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body; ``messages`` as :func:`~.chat.validate_messages` gives them."""

    messages: list[dict[str, Any]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    options: ChatOptions = ChatOptions()
    n: int = 1


def check_model(body: dict[str, Any], model_name: str) -> None:
    """Refuse a ``model`` other than the served one (404, as OpenAI answers an unknown model)."""
    model = _get(body, "model", (str,), "a string")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_name}'", "model")


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(get_bool(body, "stream"))
    opts = _get(body, "stream_options", (dict,), "an object")
    if opts is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    for key in opts:
        if key not in ("include_usage", "include_obfuscation"):
            raise _bad("stream_options", f"'stream_options.{key}' is not a stream option (include_usage, "
                       f"include_obfuscation)"[:200])
    if get_bool(opts, "include_obfuscation"):
        raise _bad("stream_options", "'stream_options.include_obfuscation' true is not supported: chunks carry "
                   "no obfuscation padding; send false or leave it out")
    return stream, bool(get_bool(opts, "include_usage"))


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad(None, f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def _one_prompt(p: Any, vocab_size: int) -> str | list[int] | None:
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad_ids = [t for t in p if not 0 <= t < vocab_size]
        if bad_ids:
            raise _bad("prompt", f"token id {bad_ids[0]} is outside the vocabulary [0, {vocab_size})"[:200])
        return list(p)
    return None


def _prompts(body: dict[str, Any], vocab_size: int) -> list[str | list[int]]:
    p = body.get("prompt")
    if p is None:
        raise _bad("prompt", "'prompt' is required")
    one = _one_prompt(p, vocab_size)
    if one is not None:
        return [one]
    if isinstance(p, list) and p:
        many = [_one_prompt(x, vocab_size) for x in p]
        if all(x is not None for x in many):
            return many  # type: ignore[return-value]
    raise _bad("prompt", "'prompt' must be a string, a non-empty array of token ids, or a non-empty array of "
               "either")


def _choices(body: dict[str, Any], prompts: int, stream: bool, completions: bool) -> tuple[int, int]:
    n = get_int(body, "n")
    n = 1 if n is None else n
    in_range("n", n, 1, MAX_SEQUENCES)
    best_of = get_int(body, "best_of") if completions else None
    if best_of is not None:
        in_range("best_of", best_of, 1, MAX_SEQUENCES)
        if best_of < n:
            raise _bad("best_of", f"'best_of' ({best_of}) must be >= 'n' ({n})")
        if stream and best_of > n:
            raise _bad("best_of", "'best_of' > 'n' cannot be streamed: the best are known only at the end")
    best_of = n if best_of is None else best_of
    if prompts * best_of > MAX_SEQUENCES:
        raise _bad("best_of" if best_of > n else "n", f"this request asks for {prompts * best_of} sequences "
                   f"({prompts} prompt(s) x {best_of}); at most {MAX_SEQUENCES}")
    return n, best_of


def parse_completion(body: Any, model_name: str, vocab_size: int) -> CompletionRequest:
    """Validate a ``/v1/completions`` body (raises :class:`ApiError`)."""
    body = _object(body)
    check_fields(body, "completions")
    check_model(body, model_name)
    prompts = _prompts(body, vocab_size)
    params = sampling(body, "completions", vocab_size)
    echo = bool(get_bool(body, "echo"))
    if echo and params.logprobs is not None:
        raise _bad("echo", "'echo' with 'logprobs' is not supported: it needs the prompt tokens' logprobs, which "
                   "dsv4rt does not compute; drop one of them")
    stream, usage = _stream(body)
    n, best_of = _choices(body, len(prompts), stream, completions=True)
    return CompletionRequest(prompts, params, stream, usage, n, best_of, echo)


def parse_chat(body: Any, model_name: str, vocab_size: int | None = None) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body (raises :class:`ApiError`); ``vocab_size`` bounds the ids
    of ``logit_bias``."""
    body = _object(body)
    check_fields(body, "chat")
    check_model(body, model_name)
    if body.get("messages") is None:
        raise _bad("messages", "'messages' is required")
    try:
        messages = validate_messages(body["messages"])
    except MessageError as exc:
        raise _bad(exc.param, str(exc)) from None
    params = sampling(body, "chat", vocab_size)
    stream, usage = _stream(body)
    n, _ = _choices(body, 1, stream, completions=False)
    return ChatRequest(messages, params, stream, usage, options=_chat_options(body), n=n)


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = _get(body, "tools", (list,), "an array of tools")
    if tools is None:
        return None
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str) and fn["name"]):
            raise _bad(f"tools[{i}]", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": str, "
                       f"\"description\": str, \"parameters\": object}}}}")
        if not isinstance(fn.get("parameters", {}), dict) or not isinstance(fn.get("description", ""), str):
            raise _bad(f"tools[{i}].function", f"tools[{i}].function: 'parameters' must be an object and "
                       f"'description' a string")
    return tools


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> Any:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise _bad("tool_choice", "'tool_choice' \"required\" needs 'tools'")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _bad("tool_choice", f"'tool_choice' must be \"none\", \"auto\", \"required\" or "
                   f"{{\"type\": \"function\", \"function\": {{\"name\": str}}}}, got {json.dumps(choice)[:100]}")
    known = [t["function"]["name"] for t in tools or []]
    if name not in known:
        raise _bad("tool_choice", f"'tool_choice' names the function {name!r}, which is not among 'tools' "
                   f"({', '.join(known) or 'none given'})"[:300])
    return {"type": "function", "function": {"name": name}}


def _chat_options(body: dict[str, Any]) -> ChatOptions:
    tools = _tools(body)
    choice = _tool_choice(body, tools)
    effort = _get(body, "reasoning_effort", (str, int), "a string or an integer")
    kwargs = _get(body, "chat_template_kwargs", (dict,), "an object") or {}
    thinking = None
    for key in ("thinking", "enable_thinking"):
        if kwargs.get(key) is not None:
            if not isinstance(kwargs[key], bool):
                raise _bad("chat_template_kwargs", f"'chat_template_kwargs.{key}' must be a boolean, got "
                           f"{_type_name(kwargs[key])}")
            thinking = kwargs[key] if thinking is None else thinking
    if thinking is None:
        thinking = effort is not None
    if effort == "none":
        thinking = False
    return ChatOptions(tools, choice, thinking, effort, dict(kwargs))
