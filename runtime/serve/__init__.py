"""``dsv4rt serve``: an OpenAI-compatible HTTP server with continuous batching.

* :mod:`.engine` -- the engine thread: admission into KV pool slots, one ``forward_ragged`` per step;
* :mod:`.sampling` -- per-request sampling parameters, batched top-k / top-p sampling with per-row failure
  isolation, incremental detokenisation with stop strings; :mod:`.logits` -- logit_bias, penalties and
  raw log-probabilities;
* :mod:`.protocol` -- request bodies into typed requests; :mod:`.params` -- what each OpenAI field does
  (implemented, default only, label, refused) and the sampling bounds; :mod:`.fields` -- typed field
  readers and OpenAI-style error bodies; :mod:`.tokenizing` -- ``/tokenize`` and ``/detokenize`` bodies;
* :mod:`.chat` -- chat messages and the chat template;
* :mod:`.app` -- the Starlette app and the uvicorn launch; :mod:`.respond` -- a request's sequences (n,
  best_of, prompts) answered as JSON or a stream; :mod:`.logprobs` -- OpenAI's logprobs formats;
  :mod:`.metrics` -- Prometheus text;
* :mod:`.loadtest` -- a load generator; :mod:`.cli` -- the ``serve`` and ``loadtest`` subcommands.

Starlette and uvicorn are imported only by :mod:`.app` (the ``dsv4rt[serve]`` extra), httpx only by
:mod:`.loadtest`.
"""
from __future__ import annotations

__all__: list[str] = []
