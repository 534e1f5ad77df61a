"""``dsv4rt serve``: an OpenAI-compatible HTTP server with continuous batching.

* :mod:`.engine` -- the engine thread: admission into KV pool slots, one ``forward_ragged`` per step;
* :mod:`.sampling` -- per-request sampling parameters, batched top-k / top-p sampling, incremental
  detokenisation with stop strings;
* :mod:`.protocol` -- request validation into typed parameters, OpenAI-style error bodies;
* :mod:`.chat` -- chat messages and the chat template;
* :mod:`.app` -- the Starlette app and the uvicorn launch; :mod:`.metrics` -- Prometheus text;
* :mod:`.loadtest` -- a load generator; :mod:`.cli` -- the ``serve`` and ``loadtest`` subcommands.

Starlette and uvicorn are imported only by :mod:`.app` (the ``dsv4rt[serve]`` extra), httpx only by
:mod:`.loadtest`.
"""
from __future__ import annotations

__all__: list[str] = []
