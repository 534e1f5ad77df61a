"""The OpenAI request protocol: validation of ``/v1/completions`` and ``/v1/chat/completions`` bodies into
typed parameters, and OpenAI-style error bodies ``{"error": {"message", "type", "param", "code"}}``.

Unknown fields are ignored (clients send many); known fields of the wrong type or out of range are refused
with 400 and the field's name as ``param``. ``null`` stands for "not given". Beyond OpenAI, ``top_k``
(0 and -1 disable it), ``ignore_eos`` and ``skip_special_tokens`` (vLLM's extensions) are read.

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
from .sampling import SamplingParams

__all__ = ["ApiError", "error_body", "CompletionRequest", "ChatRequest", "parse_completion", "parse_chat"]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body to send."""
        return error_body(self.message, self.type, self.param, self.code)


@dataclass
class CompletionRequest:
    """A validated ``/v1/completions`` body: the prompt as text or token ids."""

    prompt: str | list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body; ``messages`` as :func:`~.chat.validate_messages` gives them."""

    messages: list[dict[str, Any]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    options: ChatOptions = ChatOptions()


def _bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param)


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    """body[name] when given and not null, checked against ``kinds`` (bool is never a number)."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise _bad(name, f"'{name}' must be {what}, got {_type_name(v)} {v!r}"[:300])
    return v


def _int(body: dict[str, Any], name: str) -> int | None:
    return _get(body, name, (int,), "an integer")


def _number(body: dict[str, Any], name: str) -> float | None:
    v = _get(body, name, (int, float), "a number")
    return None if v is None else float(v)


def _bool(body: dict[str, Any], name: str) -> bool | None:
    return _get(body, name, (bool,), "a boolean")


def check_model(body: dict[str, Any], model_name: str) -> None:
    """Refuse a ``model`` other than the served one (404, as OpenAI answers an unknown model)."""
    model = _get(body, "model", (str,), "a string")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_name}'", "model")


def _sampling(body: dict[str, Any], max_tokens_names: tuple[str, ...]) -> SamplingParams:
    max_tokens, name = 16, max_tokens_names[0]
    for n in max_tokens_names:
        v = _int(body, n)
        if v is not None:
            max_tokens, name = v, n
            break
    if max_tokens < 1:
        raise _bad(name, f"'{name}' must be >= 1, got {max_tokens}")
    temperature = _number(body, "temperature")
    temperature = 1.0 if temperature is None else temperature
    if not 0 <= temperature <= 2:
        raise _bad("temperature", f"'temperature' must be in [0, 2], got {temperature:g}")
    top_p = _number(body, "top_p")
    top_p = 1.0 if top_p is None else top_p
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"'top_p' must be in (0, 1], got {top_p:g}")
    top_k = _int(body, "top_k")
    top_k = -1 if top_k is None else top_k
    if top_k < -1:
        raise _bad("top_k", f"'top_k' must be >= 1, or 0 / -1 to disable it; got {top_k}")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise _bad("n", f"'n' must be 1 (one choice per request), got {n}")
    seed = _int(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _bad("stop", f"'stop' must be a string or an array of strings, got {_type_name(stop)}")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          stop=tuple(s for s in stops if s), ignore_eos=bool(_bool(body, "ignore_eos")),
                          skip_special_tokens=_bool(body, "skip_special_tokens") is not False)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(_bool(body, "stream"))
    opts = _get(body, "stream_options", (dict,), "an object")
    usage = bool(_bool(opts, "include_usage")) if opts else False
    return stream, usage


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad(None, f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def _prompt(body: dict[str, Any], vocab_size: int) -> str | list[int]:
    p = body.get("prompt")
    if p is None:
        raise _bad("prompt", "'prompt' is required")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                   # a batch of one prompt
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise _bad("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        return list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(t, (str, list)) for t in p):
        raise _bad("prompt", "batched prompts are not supported: send one prompt per request")
    raise _bad("prompt", "'prompt' must be a string or a non-empty array of token ids")


def parse_completion(body: Any, model_name: str, vocab_size: int) -> CompletionRequest:
    """Validate a ``/v1/completions`` body (raises :class:`ApiError`)."""
    body = _object(body)
    check_model(body, model_name)
    prompt = _prompt(body, vocab_size)
    echo = _bool(body, "echo")
    if echo:
        raise _bad("echo", "'echo' is not supported (only false)")
    params = _sampling(body, ("max_tokens",))
    return CompletionRequest(prompt, params, *_stream(body))


def parse_chat(body: Any, model_name: str) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body (raises :class:`ApiError`)."""
    body = _object(body)
    check_model(body, model_name)
    if body.get("messages") is None:
        raise _bad("messages", "'messages' is required")
    try:
        messages = validate_messages(body["messages"])
    except MessageError as exc:
        raise _bad(exc.param, str(exc)) from None
    params = _sampling(body, ("max_completion_tokens", "max_tokens"))
    return ChatRequest(messages, params, *_stream(body), options=_chat_options(body))


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
