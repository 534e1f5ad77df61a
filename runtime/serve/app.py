"""The HTTP side of ``dsv4rt serve``: a Starlette app over an :class:`~.engine.Engine`, and its uvicorn launch.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events with
``"stream": true``: ``data: {chunk}\\n\\n`` lines in OpenAI's chunk format, then ``data: [DONE]\\n\\n``;
see :mod:`.respond`), ``GET /v1/models`` and ``/v1/models/{id}``, ``POST /tokenize`` and ``/detokenize``
(vLLM's), ``GET /version``, ``GET /health`` (503 when the engine loop is not alive), ``GET /metrics``
(Prometheus text). Every error is an OpenAI error body; with an API key every ``/v1`` request and
``/tokenize`` / ``/detokenize`` need ``Authorization: Bearer KEY`` (``/health``, ``/metrics`` and
``/version`` stay open). A client that disconnects cancels its request (streaming or not), which frees its
KV slots at the engine's next step.

With a DeepSeek-V4 chat format the completion goes through the format's parser: the message gets
``reasoning_content`` and ``tool_calls`` (finish_reason ``tool_calls`` when it stopped after calling), and
the stream sends ``delta.reasoning_content``, ``delta.content`` and ``delta.tool_calls`` chunks.
"""
from __future__ import annotations

import copy
import hmac
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .chat import ChatTemplate, MessageError
from .engine import Engine
from .logprobs import TokenText
from .metrics import render
from .protocol import ApiError, error_body, parse_chat, parse_completion, parse_json
from .respond import Spec, Sub, respond
from .sampling import SamplingParams
from .tokenizing import parse_detokenize, parse_tokenize

__all__ = ["build_app", "BackgroundServer", "bind_socket", "serve_forever"]

def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Api:
    """The endpoints, bound to one engine and model name."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None, template: ChatTemplate) -> None:
        self.engine, self.model_name, self.api_key, self.template = engine, model_name, api_key, template
        self.created = int(time.time())
        self.tt = TokenText(engine.tokenizer)

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

    async def _json(self, request: Request) -> Any:
        raw = await request.body()
        return self._validate(lambda: parse_json(raw))

    def _validate(self, parse: Callable[[], Any]) -> Any:
        try:
            return parse()
        except ApiError:
            self.engine.counters.request("invalid")
            raise

    def _spec(self, chat: bool, stream: bool, usage: bool, n: int, best_of: int, params: SamplingParams) -> Spec:
        return Spec(chat, self.model_name, self.tt, stream, usage, n, best_of, params.logprobs is not None)

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        body = await self._json(request)
        vocab = self.engine.model.cfg.vocab_size
        req = self._validate(lambda: parse_completion(body, self.model_name, vocab))
        spec = self._spec(False, req.stream, req.include_usage, req.n, req.best_of, req.params)
        params = req.params
        if req.best_of > req.n and params.logprobs is None:      # ranking needs each token's logprob
            params = replace(params, logprobs=0)
        subs = []
        for p, prompt in enumerate(req.prompts):
            ids = prompt if isinstance(prompt, list) else self.engine.tokenizer.encode(prompt)
            echo = "" if not req.echo else prompt if isinstance(prompt, str) else \
                self.engine.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
            subs += [Sub(ids, _seeded(params, j), p, echo) for j in range(req.best_of)]
        return await respond(request, self.engine, subs, spec, "prompt")

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        body = await self._json(request)
        req = self._validate(lambda: parse_chat(body, self.model_name, self.engine.model.cfg.vocab_size))
        prompt = self._prepare(req.messages, req.options)
        params = req.params if prompt.parser is None else replace(req.params, skip_special_tokens=False)
        subs = [Sub(prompt.ids, _seeded(params, j), 0, "", copy.deepcopy(prompt.parser)) for j in range(req.n)]
        spec = self._spec(True, req.stream, req.include_usage, req.n, req.n, req.params)
        return await respond(request, self.engine, subs, spec, "messages")

    def _prepare(self, messages: list[dict[str, Any]], options: Any) -> Any:
        try:
            return self.template.prepare(messages, self.engine.tokenizer, options)
        except MessageError as exc:
            self.engine.counters.request("invalid")
            raise ApiError(400, str(exc), exc.param) from None

    def _model(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dsv4rt",
                "max_model_len": self.engine.pool.max_seq_len}

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``."""
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request) -> Response:
        """``GET /v1/models/{id}`` (404 for another id)."""
        name = request.path_params["model"]
        if name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                           "model", code="model_not_found")
        return JSONResponse(self._model())

    async def tokenize(self, request: Request) -> Response:
        """``POST /tokenize`` (as vLLM's): ``{"prompt"}`` or chat ``{"messages", "tools", ...}`` -> ``{"count",
        "max_model_len", "tokens", "token_strs"}``."""
        body = await self._json(request)
        req = self._validate(lambda: parse_tokenize(body, self.model_name))
        if req.messages is not None:
            ids = self._prepare(req.messages, req.options).ids
        else:
            ids = self.engine.tokenizer.encode(req.prompt)
        if not req.add_special_tokens:
            ids = ids[1:]
        strs = [self.tt.text(t) for t in ids] if req.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": self.engine.pool.max_seq_len, "tokens": ids,
                             "token_strs": strs})

    async def detokenize(self, request: Request) -> Response:
        """``POST /detokenize`` (as vLLM's): ``{"tokens": [ids]}`` -> ``{"prompt": text}``."""
        body = await self._json(request)
        ids = self._validate(lambda: parse_detokenize(body, self.model_name, self.engine.model.cfg.vocab_size))
        return JSONResponse({"prompt": self.engine.tokenizer.decode(ids)})

    async def version(self, request: Request) -> Response:
        """``GET /version``."""
        from .. import __version__

        return JSONResponse({"version": __version__})

    async def health(self, request: Request) -> Response:
        """``GET /health``."""
        if self.engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine not running"}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``."""
        return PlainTextResponse(render(self.engine.snapshot(), self.model_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")


def _seeded(params: SamplingParams, j: int) -> SamplingParams:
    """The parameters of a request's j-th sequence: seed + j (as vLLM seeds its n > 1 children)."""
    return params if j == 0 or params.seed is None else replace(params, seed=params.seed + j)


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
              Route("/v1/models/{model:path}", api.endpoint(api.model), methods=["GET"]),
              Route("/tokenize", api.endpoint(api.tokenize), methods=["POST"]),
              Route("/detokenize", api.endpoint(api.detokenize), methods=["POST"]),
              Route("/version", api.endpoint(api.version, v1=False), methods=["GET"]),
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
