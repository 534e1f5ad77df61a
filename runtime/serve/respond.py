"""The responses of ``/v1/completions`` and ``/v1/chat/completions``: the engine sequences of one request
(one per prompt and choice) as a :class:`Group`, answered as one JSON body or as server-sent events.

Choices are numbered prompt by prompt: choice ``p * n + j`` is the j-th of prompt p. With ``best_of`` > n
(completions, JSON only) each prompt generates ``best_of`` sequences and the n with the highest mean
log-probability per token (raw model distribution) come back; usage counts every generated token. A
stream sends each choice's chunks as its tokens come (chunks of different choices interleave), each
choice's ``finish_reason`` chunk when it ends, then the usage chunk (``stream_options.include_usage``)
and ``data: [DONE]``. Log-probabilities of tokens whose text is still held back (a possible stop string,
half a character, a tag the chat parser has not settled) ride on the choice's next chunk.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .engine import Engine, Event
from .fields import ApiError, error_body
from .logits import Sampled
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .sampling import SamplingParams

__all__ = ["Sub", "Spec", "Group", "respond"]

_POLL_S = 0.5   # how often a waiting handler checks whether its client went away


@dataclass
class Sub:
    """One engine sequence of a request: its prompt ids and parameters, the index of its prompt, the text
    its completion starts with (``echo``) and, for chat, its completion parser."""

    ids: list[int]
    params: SamplingParams
    prompt: int = 0
    echo: str = ""
    parser: Any = None


@dataclass
class Spec:
    """The response's shape: chat or completions, streamed or not, choices per prompt ``n`` of
    ``best_of`` generated, whether logprobs are reported, usage in the stream."""

    chat: bool
    model: str
    tt: TokenText
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    best_of: int = 1
    logprobs: bool = False


class Group:
    """The submitted sequences of one request; their events arrive on one asyncio queue as (index, Event).
    Raises :class:`ApiError` as ``Engine.submit`` does, cancelling the ones already queued."""

    def __init__(self, engine: Engine, subs: list[Sub], param: str) -> None:
        loop = asyncio.get_running_loop()
        self.engine, self.queue = engine, asyncio.Queue()
        self.seqs: list[Any] = []
        try:
            for i, sub in enumerate(subs):
                self.seqs.append(engine.submit(sub.ids, sub.params, self._sink(loop, i), param))
        except ApiError:
            self.cancel()
            raise

    def _sink(self, loop: asyncio.AbstractEventLoop, i: int) -> Any:
        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
            except RuntimeError:          # the loop closed: nobody listens any more
                pass
        return sink

    async def next(self, timeout: float | None = None) -> tuple[int, Event]:
        """The next (index, event) (``asyncio.TimeoutError`` after ``timeout`` seconds)."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    def cancel(self) -> None:
        """Cancel every sequence (no-op for those finished)."""
        for s in self.seqs:
            self.engine.cancel(s)


class _Waiter:
    """A group's events for a handler that is not streaming yet: every ``_POLL_S`` seconds it checks
    whether the client went away, and then cancels the request (``next`` gives None)."""

    def __init__(self, group: Group, request: Request) -> None:
        self.group, self.request, self.checked = group, request, time.monotonic()

    async def next(self) -> tuple[int, Event] | None:
        while True:
            if time.monotonic() - self.checked >= _POLL_S:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.group.cancel()
                    return None
            try:
                return await self.group.next(_POLL_S)
            except asyncio.TimeoutError:
                pass


@dataclass
class _State:
    sub: Sub
    parts: list[str] = field(default_factory=list)
    sampled: list[Sampled] = field(default_factory=list)
    pending: list[Sampled] = field(default_factory=list)
    finish: str | None = None
    usage: dict[str, int] | None = None
    offset: int = 0

    def mean_logprob(self) -> float:
        lps = [s.logprob for s in self.sampled if s.logprob is not None]
        return sum(lps) / len(lps) if lps else float("-inf")


def _finish(reason: str | None, parser: Any) -> str | None:
    """OpenAI's finish_reason: ``tool_calls`` when a parsed completion stopped after calling tools."""
    return "tool_calls" if reason == "stop" and parser is not None and parser.tool_calls else reason


def _message(parser: Any) -> dict[str, Any]:
    """The assistant message of a parsed completion (content null when it only called tools)."""
    msg: dict[str, Any] = {"role": "assistant", "content": parser.content or (None if parser.tool_calls else ""),
                           "reasoning_content": parser.reasoning}
    if parser.tool_calls:
        msg["tool_calls"] = parser.tool_calls
    return msg


def _usage(states: list[_State]) -> dict[str, int]:
    prompt = {st.sub.prompt: st.usage["prompt_tokens"] for st in states if st.usage}
    gen = sum(st.usage["completion_tokens"] for st in states if st.usage)
    return {"prompt_tokens": sum(prompt.values()), "completion_tokens": gen, "total_tokens": sum(prompt.values()) + gen}


def _head(spec: Spec, rid: str) -> dict[str, Any]:
    obj = ("chat.completion.chunk" if spec.stream else "chat.completion") if spec.chat else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": spec.model}


def _logprobs(spec: Spec, st: _State, sampled: list[Sampled]) -> dict[str, Any] | None:
    if not spec.logprobs:
        return None
    if spec.chat:
        return chat_logprobs(spec.tt, sampled)
    lp, st.offset = completion_logprobs(spec.tt, sampled, st.offset)
    return lp


def _choice(spec: Spec, index: int, st: _State) -> dict[str, Any]:
    text, parser = st.sub.echo + "".join(st.parts), st.sub.parser
    if parser is not None:
        parser.feed(text)
        parser.finish()
    c: dict[str, Any] = {"index": index, "logprobs": _logprobs(spec, st, st.sampled),
                         "finish_reason": _finish(st.finish, parser)}
    if parser is not None:
        c["message"] = _message(parser)
    elif spec.chat:
        c["message"] = {"role": "assistant", "content": text}
    else:
        c["text"] = text
    return c


def _chosen(spec: Spec, states: list[_State]) -> list[_State]:
    """Each prompt's n best of best_of states (all of them, in order, when best_of == n)."""
    if spec.best_of == spec.n:
        return states
    out = []
    for p in range(0, len(states), spec.best_of):
        group = states[p:p + spec.best_of]
        out += sorted(group, key=lambda st: -st.mean_logprob())[:spec.n]
    return out


async def respond(request: Request, engine: Engine, subs: list[Sub], spec: Spec, param: str) -> Response:
    """Submit ``subs`` and answer the request (JSON or a stream, as ``spec`` says)."""
    group = Group(engine, subs, param)
    waiter = _Waiter(group, request)
    rid = f"{'chatcmpl' if spec.chat else 'cmpl'}-{uuid.uuid4().hex}"
    first = await waiter.next()
    if first is None:
        return Response(status_code=499)                     # the client is gone
    if first[1].kind == "error":
        group.cancel()
        raise ApiError(first[1].status, first[1].message, None, "server_error")
    states = [_State(s) for s in subs]
    if spec.stream:
        return StreamingResponse(_stream(group, spec, states, first, rid), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    item: tuple[int, Event] | None = first
    left = len(states)
    while True:
        if item is None:
            return Response(status_code=499)
        i, ev = item
        if ev.kind == "error":
            group.cancel()
            raise ApiError(ev.status, ev.message, None, "server_error")
        st = states[i]
        if ev.kind == "token":
            st.parts.append(ev.text)
            if ev.sampled is not None and ev.sampled.logprob is not None:
                st.sampled.append(ev.sampled)
        else:
            st.finish, st.usage, left = ev.finish_reason, ev.usage, left - 1
            if left == 0:
                break
        item = await waiter.next()
    choices = [_choice(spec, k, st) for k, st in enumerate(_chosen(spec, states))]
    return JSONResponse({**_head(spec, rid), "choices": choices, "usage": _usage(states)})


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream(group: Group, spec: Spec, states: list[_State], first: tuple[int, Event],
                  rid: str) -> AsyncIterator[str]:
    head = _head(spec, rid)
    extra = {"usage": None} if spec.include_usage else {}

    def chunk(i: int, delta: dict[str, Any] | str, finish: str | None = None) -> str:
        st = states[i]
        lp = _logprobs(spec, st, st.pending) if st.pending else None
        st.pending = []
        key = "delta" if spec.chat else "text"
        return _sse({**head, "choices": [{"index": i, key: delta, "logprobs": lp, "finish_reason": finish}],
                     **extra})

    try:
        for i, st in enumerate(states):
            if spec.chat:
                yield chunk(i, {"role": "assistant", "content": ""})
            elif st.sub.echo:
                yield chunk(i, st.sub.echo)
        item, left = first, len(states)
        while True:
            i, ev = item
            st = states[i]
            if ev.kind == "error":
                yield _sse(error_body(ev.message, "server_error"))
                break
            parser = st.sub.parser
            if ev.kind == "token":
                if ev.sampled is not None and ev.sampled.logprob is not None:
                    st.pending.append(ev.sampled)
                if parser is not None:
                    for delta in parser.feed(ev.text):
                        yield chunk(i, delta)
                elif ev.text:
                    yield chunk(i, {"content": ev.text} if spec.chat else ev.text)
            else:
                for delta in parser.finish() if parser is not None else ():
                    yield chunk(i, delta)
                st.usage = ev.usage
                yield chunk(i, {} if spec.chat else "", _finish(ev.finish_reason, parser))
                left -= 1
                if left == 0:
                    if spec.include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(states)})
                    break
            item = await group.next()
        yield "data: [DONE]\n\n"
    finally:
        group.cancel()                                        # no-op for the finished ones
