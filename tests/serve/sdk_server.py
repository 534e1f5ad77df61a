"""The official `openai` SDK against a loopback dsv4rt server whose model a test wraps (scripted or
recording logits): one place that builds the engine, the app and the client, and stops them."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from dsv4rt.serve.app import BackgroundServer, build_app
from dsv4rt.serve.cli import ServeOptions, build_server
from dsv4rt.serve.engine import Engine


@contextlib.contextmanager
def sdk_client(opts: ServeOptions, wrap: Callable[[Any, Any], Any], timeout: float) -> Iterator[tuple]:
    """(openai client, the wrapped model, model name) of a server built from ``opts`` whose model is
    ``wrap(model, tokenizer)``."""
    import openai

    served = build_server(opts)
    model = wrap(served.engine.model, served.engine.tokenizer)
    engine = Engine(model, served.engine.tokenizer, served.engine.pool, backend="cpu").start()
    http = BackgroundServer(build_app(engine, served.model_name, None, served.template))
    client = openai.OpenAI(base_url=http.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
    try:
        yield client, model, served.model_name, served
    finally:
        http.stop()
        engine.stop()
