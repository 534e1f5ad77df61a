"""The HTTP side of ``dsv4rt serve``: a Starlette app over an :class:`~.engine.Engine`, and its uvicorn launch.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events with
``"stream": true``: ``data: {chunk}\\n\\n`` lines in OpenAI's chunk format, then ``data: [DONE]\\n\\n``),
``GET /v1/models``, ``GET /health`` (503 when the engine loop is not alive), ``GET /metrics`` (Prometheus
text). Every error is an OpenAI error body; with an API key every ``/v1`` request needs
``Authorization: Bearer KEY`` (``/health`` and ``/metrics`` stay open). A client that disconnects cancels
its request (streaming or not), which frees its KV slot at the engine's next step.

With a DeepSeek-V4 chat format the completion goes through the format's parser: the message gets
``reasoning_content`` and ``tool_calls`` (finish_reason ``tool_calls`` when it stopped after calling), and
the stream sends ``delta.reasoning_content``, ``delta.content`` and ``delta.tool_calls`` chunks.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .chat import ChatTemplate, MessageError
from .engine import Engine, Event, Handle
from .metrics import render
from .protocol import ApiError, error_body, parse_chat, parse_completion

__all__ = ["build_app", "BackgroundServer", "bind_socket", "serve_forever"]

_POLL_S = 0.5   # how often a waiting handler checks whether its client went away


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Waiter:
    """A handle's events for a handler that is not streaming yet: every ``_POLL_S`` seconds it checks
    whether the client went away, and then cancels the request (``next`` gives None)."""

    def __init__(self, handle: Handle, request: Request) -> None:
        self.handle, self.request, self.checked = handle, request, time.monotonic()

    async def next(self) -> Event | None:
        """The next event, or None once the client has disconnected."""
        while True:
            if time.monotonic() - self.checked >= _POLL_S:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.handle.cancel()
                    return None
            try:
                return await self.handle.next(_POLL_S)
            except asyncio.TimeoutError:
                pass


class _Api:
    """The endpoints, bound to one engine and model name."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None, template: ChatTemplate) -> None:
        self.engine, self.model_name, self.api_key, self.template = engine, model_name, api_key, template
        self.created = int(time.time())

    def endpoint(self, fn: Callable[[Request], Awaitable[Response]], v1: bool = True) -> Callable:
        """``fn`` with the API key check and ApiError -> OpenAI error response."""
        async def handler(request: Request) -> Response:
            try:
                if v1 and self.api_key is not None:
                    auth = request.headers.get("authorization", "")
                    if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                        raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                       None, "authentication_error")
                return await fn(request)
            except ApiError as e:
                return _error(e)
        return handler

    async def _body(self, request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            self.engine.counters.request("invalid")
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    def _validate(self, parse: Callable[[], Any]) -> Any:
        try:
            return parse()
        except ApiError:
            self.engine.counters.request("invalid")
            raise

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        body = await self._body(request)
        req = self._validate(lambda: parse_completion(body, self.model_name, self.engine.model.cfg.vocab_size))
        ids = req.prompt if isinstance(req.prompt, list) else self.engine.tokenizer.encode(req.prompt)
        handle = self.engine.submit_async(ids, req.params, "prompt")
        return await self._respond(request, handle, req.stream, req.include_usage, chat=False)

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        body = await self._body(request)
        req = self._validate(lambda: parse_chat(body, self.model_name))
        try:
            prompt = self.template.prepare(req.messages, self.engine.tokenizer, req.options)
        except MessageError as exc:
            self.engine.counters.request("invalid")
            raise ApiError(400, str(exc), exc.param) from None
        params = req.params if prompt.parser is None else replace(req.params, skip_special_tokens=False)
        handle = self.engine.submit_async(prompt.ids, params, "messages")
        return await self._respond(request, handle, req.stream, req.include_usage, chat=True, parser=prompt.parser)

    def _head(self, rid: str, chat: bool, stream: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name}

    async def _respond(self, request: Request, handle: Handle, stream: bool, include_usage: bool,
                       chat: bool, parser: Any = None) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        waiter = _Waiter(handle, request)
        first = await waiter.next()
        if first is None:
            return Response(status_code=499)                     # the client is gone
        if first.kind == "error":
            raise ApiError(first.status, first.message, None, "server_error")
        if stream:
            return StreamingResponse(self._stream(request, handle, first, rid, chat, include_usage, parser),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts, ev = [], first
        while ev.kind == "token":
            parts.append(ev.text)
            nxt = await waiter.next()
            if nxt is None:
                return Response(status_code=499)
            ev = nxt
        if ev.kind == "error":
            raise ApiError(ev.status, ev.message, None, "server_error")
        text = "".join(parts)
        if parser is not None:
            parser.feed(text)
            parser.finish()
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish(ev.finish_reason, parser)}
        if parser is not None:
            choice["message"] = _message(parser)
        else:
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse({**self._head(rid, chat, False), "choices": [choice], "usage": ev.usage})

    async def _stream(self, request: Request, handle: Handle, first: Event, rid: str, chat: bool,
                      include_usage: bool, parser: Any = None) -> AsyncIterator[str]:
        head = self._head(rid, chat, True)
        extra = {"usage": None} if include_usage else {}

        def chunk(text: str | None, finish: str | None, delta: dict[str, Any] | None = None) -> str:
            if chat:
                delta = delta if delta is not None else {} if text is None else {"content": text}
                c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [c], **extra})

        try:
            if chat:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], **extra})
            ev = first
            while ev.kind == "token":
                if parser is None:
                    yield chunk(ev.text, None)
                else:
                    for delta in parser.feed(ev.text):
                        yield chunk(None, None, delta)
                ev = await handle.next()
            if ev.kind == "error":
                yield _sse(error_body(ev.message, "server_error"))
            else:
                for delta in parser.finish() if parser is not None else ():
                    yield chunk(None, None, delta)
                yield chunk(None, _finish(ev.finish_reason, parser))
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": ev.usage})
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()                                       # no-op when it finished

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``."""
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "created": self.created, "owned_by": "dsv4rt"}]})

    async def health(self, request: Request) -> Response:
        """``GET /health``."""
        if self.engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine not running"}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``."""
        return PlainTextResponse(render(self.engine.snapshot(), self.model_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")


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


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    msg = {404: f"Unknown endpoint {request.url.path}",
           405: f"Method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(msg), status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(f"internal server error: {type(exc).__name__}: {exc}", "server_error"),
                        status_code=500)


def build_app(engine: Engine, model_name: str, api_key: str | None = None,
              template: ChatTemplate | None = None) -> Starlette:
    """The Starlette app serving ``engine`` as ``model_name`` (the engine must be started separately)."""
    api = _Api(engine, model_name, api_key, template or ChatTemplate())
    routes = [Route("/v1/completions", api.endpoint(api.completions), methods=["POST"]),
              Route("/v1/chat/completions", api.endpoint(api.chat), methods=["POST"]),
              Route("/v1/models", api.endpoint(api.models), methods=["GET"]),
              Route("/health", api.endpoint(api.health, v1=False), methods=["GET"]),
              Route("/metrics", api.endpoint(api.metrics, v1=False), methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error})


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _server(app: Starlette, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False,
                                         timeout_graceful_shutdown=2))


def serve_forever(app: Starlette, sock: socket.socket, log_level: str = "warning") -> None:
    """Run uvicorn on ``sock`` in this thread until interrupted (Ctrl-C / SIGTERM)."""
    _server(app, log_level).run(sockets=[sock])


class BackgroundServer:
    """uvicorn serving ``app`` on a free loopback port in a background thread (tests, ``loadtest``):
    ``url`` is its base URL; ``stop()`` (or leaving the ``with`` block) shuts it down."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> None:
        self._sock = bind_socket(host, port)
        self.url = _url(self._sock)
        self._server = _server(app, "warning")
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="dsv4rt-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
