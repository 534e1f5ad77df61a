"""The parameters of ``/v1/completions`` and ``/v1/chat/completions``: what dsv4rt does with each top-level
field, and the sampling ones read (bounded) into :class:`~.sampling.SamplingParams`.

Every field of a body is one of (a ``null`` value stands for "not given" and is always accepted):

* implemented: :data:`COMPLETION` / :data:`CHAT` (OpenAI's, and vLLM's ``top_k``,
  ``repetition_penalty``, ``ignore_eos``, ``skip_special_tokens``, ``chat_template_kwargs``);
* :data:`LABELS` (``user``, ``safety_identifier``, ``metadata``, ``prompt_cache_key``): they name the
  caller or the request and change no output by OpenAI's definition; type-checked, kept nowhere;
* :data:`DEFAULT_ONLY`: accepted when the value asks for what dsv4rt does anyway
  (``response_format`` text, ``parallel_tool_calls`` true, ...), else 400 naming the field;
* :data:`UNSUPPORTED`: 400 naming the field and why;
* anything else: 400 "Unrecognized request argument supplied" naming it, as OpenAI answers.

Bounds (400 naming the field outside them): ``temperature`` [0, 2] (below 1e-5: greedy), ``top_p`` (0, 1],
``top_k`` -1, 0 (both: off) or 1..2^31-1, ``seed`` a signed 64-bit integer, ``presence_penalty`` and
``frequency_penalty`` [-2, 2], ``repetition_penalty`` (0, 2], ``logit_bias`` token ids of the vocabulary
to [-100, 100], ``logprobs`` / ``top_logprobs`` 0..20, ``stop`` at most 16 strings, ``max_tokens`` >= 1.
"""
from __future__ import annotations

import json
from typing import Any

from .fields import bad, get, get_bool, get_int, get_number, in_range, type_name
from .sampling import SamplingParams

__all__ = ["COMPLETION", "CHAT", "LABELS", "DEFAULT_ONLY", "UNSUPPORTED", "MAX_LOGPROBS", "MAX_SEQUENCES",
           "check_fields", "sampling"]

MAX_LOGPROBS = 20
MAX_SEQUENCES = 128
"""Sequences one request may generate: prompts x max(n, best_of)."""
MAX_STOP = 16
INT64 = 2 ** 63

_COMMON = ("model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "seed", "stop",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
           "top_k", "repetition_penalty", "ignore_eos", "skip_special_tokens")
COMPLETION = frozenset(_COMMON + ("prompt", "echo", "best_of"))
CHAT = frozenset(_COMMON + ("messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                            "reasoning_effort", "chat_template_kwargs"))
LABELS: dict[str, dict[str, type]] = {
    "completions": {"user": str},
    "chat": {"user": str, "safety_identifier": str, "prompt_cache_key": str, "metadata": dict}}
DEFAULT_ONLY: dict[str, dict[str, tuple[Any, str]]] = {"completions": {}, "chat": {
    "response_format": ({"type": "text"}, "structured output needs constrained decoding, which dsv4rt does not do"),
    "parallel_tool_calls": (True, "the model may write several calls in one turn; nothing limits it to one"),
    "store": (False, "dsv4rt stores no completions"),
    "service_tier": (("auto", "default"), "there is one tier"),
    "modalities": (["text"], "the model reads and writes text only"),
    "verbosity": ("medium", "the model has no verbosity control"),
}}
UNSUPPORTED: dict[str, dict[str, str]] = {
    "completions": {"suffix": "fill-in-the-middle is not implemented"},
    "chat": {"audio": "the model writes text only",
             "function_call": "deprecated by OpenAI: use 'tool_choice'",
             "functions": "deprecated by OpenAI: use 'tools'",
             "moderation": "dsv4rt runs no moderation model",
             "prediction": "predicted outputs (speculative decoding) are not implemented",
             "prompt_cache_options": "dsv4rt keeps no prompt cache",
             "prompt_cache_retention": "dsv4rt keeps no prompt cache",
             "web_search_options": "dsv4rt has no web search"}}


def _show(v: Any) -> str:
    try:
        return json.dumps(v)[:100]
    except (TypeError, ValueError):
        return repr(v)[:100]


def check_fields(body: dict[str, Any], endpoint: str) -> None:
    """Refuse (400, naming it) a field of ``body`` that ``endpoint`` ("completions" or "chat") does not
    implement, as the module docstring sorts them."""
    implemented = COMPLETION if endpoint == "completions" else CHAT
    labels, defaults, refused = LABELS[endpoint], DEFAULT_ONLY[endpoint], UNSUPPORTED[endpoint]
    for name, v in body.items():
        if name in implemented:
            continue
        if name in labels:
            get(body, name, (labels[name],), "a string" if labels[name] is str else "an object")
        elif name in defaults:
            want, why = defaults[name]
            ok = v in want if isinstance(want, tuple) else type(v) is type(want) and v == want
            if v is not None and not ok:
                shown = " or ".join(_show(w) for w in want) if isinstance(want, tuple) else _show(want)
                raise bad(name, f"'{name}' {_show(v)} is not supported ({why}); only {shown} or null")
        elif name in refused:
            if v is not None:
                raise bad(name, f"'{name}' is not supported: {refused[name]}")
        else:
            raise bad(name, f"Unrecognized request argument supplied: {name}"[:200])


def _max_tokens(body: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        v = get_int(body, name)
        if v is not None:
            if v < 1:
                raise bad(name, f"'{name}' must be >= 1, got {v}")
            return v
    return None


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise bad("stop", f"'stop' must be a string or an array of strings, got {type_name(stop)}")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"'stop' holds {len(stops)} strings; at most {MAX_STOP}")
    return tuple(s for s in stops if s)


def _logit_bias(body: dict[str, Any], vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    lb = get(body, "logit_bias", (dict,), "an object of token ids to biases")
    out = []
    for key, v in (lb or {}).items():
        tid = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() and len(key) < 20 else None
        if tid is None or tid < 0 or vocab_size is not None and tid >= vocab_size:
            span = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise bad("logit_bias", f"'logit_bias' keys must be token ids {span} written as strings, got {key!r}"[:200])
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad("logit_bias", f"'logit_bias' values must be numbers, got {type_name(v)} for token {tid}")
        in_range("logit_bias", float(v), -100.0, 100.0)
        out.append((tid, float(v)))
    return tuple(out)


def _logprobs(body: dict[str, Any], endpoint: str) -> int | None:
    if endpoint == "completions":
        k = get_int(body, "logprobs")
        if k is not None:
            in_range("logprobs", k, 0, MAX_LOGPROBS)
        return k
    want, k = get_bool(body, "logprobs"), get_int(body, "top_logprobs")
    if k is not None:
        in_range("top_logprobs", k, 0, MAX_LOGPROBS)
        if not want:
            raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return (k or 0) if want else None


def sampling(body: dict[str, Any], endpoint: str, vocab_size: int | None = None) -> SamplingParams:
    """The bounded sampling parameters of ``body`` (``endpoint`` "completions" or "chat"); ``vocab_size``
    bounds ``logit_bias`` ids (None: any id >= 0)."""
    names = ("max_tokens",) if endpoint == "completions" else ("max_completion_tokens", "max_tokens")
    temperature = get_number(body, "temperature")
    temperature = 1.0 if temperature is None else temperature
    in_range("temperature", temperature, 0.0, 2.0)
    top_p = get_number(body, "top_p")
    top_p = 1.0 if top_p is None else top_p
    in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    top_k = get_int(body, "top_k")
    top_k = -1 if top_k is None else top_k
    if top_k < -1:
        raise bad("top_k", f"'top_k' must be >= 1, or 0 / -1 to disable it; got {top_k}")
    in_range("top_k", top_k, -1, 2 ** 31 - 1)
    seed = get_int(body, "seed")
    if seed is not None:
        in_range("seed", seed, -INT64, INT64 - 1)
    pens = {}
    for name, lo, hi, default, lo_open in (("presence_penalty", -2.0, 2.0, 0.0, False),
                                           ("frequency_penalty", -2.0, 2.0, 0.0, False),
                                           ("repetition_penalty", 0.0, 2.0, 1.0, True)):
        v = get_number(body, name)
        if v is not None:
            in_range(name, v, lo, hi, lo_open)
        pens[name] = default if v is None else v
    return SamplingParams(max_tokens=_max_tokens(body, names), temperature=temperature, top_p=top_p, top_k=top_k,
                          seed=seed, stop=_stop(body), ignore_eos=bool(get_bool(body, "ignore_eos")),
                          skip_special_tokens=get_bool(body, "skip_special_tokens") is not False,
                          logit_bias=_logit_bias(body, vocab_size), logprobs=_logprobs(body, endpoint), **pens)
