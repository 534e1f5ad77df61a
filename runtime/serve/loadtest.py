"""``dsv4rt loadtest``: concurrent streaming clients (httpx, asyncio) against an OpenAI-compatible server.

Each request is a streaming ``/v1/completions`` of ``max_tokens`` tokens (greedy, ``ignore_eos`` so every
request generates them all, ``stream_options.include_usage`` for the token count) on a seeded random
prompt of ``prompt_len`` characters. Figures: requests/s, output tokens/s, time to first token (first
non-empty text chunk) and inter-token latency (gaps between text chunks) at p50 / p99. In-process
(:func:`run_inprocess`) the same requests run once one at a time and once with ``concurrency`` clients on
the same server, and the report gives the ratio of the two output token rates.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import Dsv4rtError

__all__ = ["LoadtestError", "percentile", "make_prompts", "run_load", "run_remote", "run_inprocess",
           "format_report", "write_json"]


class LoadtestError(Dsv4rtError):
    """The server to test cannot be reached or is not an OpenAI-compatible one."""

_WORDS = ("the", "model", "decodes", "tokens", "in", "one", "batch", "while", "new", "requests", "join",
          "and", "finished", "ones", "leave", "their", "cache", "slots")


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100, linear interpolation); NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_prompts(n: int, length: int, seed: int = 0) -> list[str]:
    """``n`` seeded prompts of ``length`` characters (plain words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = ""
        while len(text) < length:
            text += rng.choice(_WORDS) + " "
        out.append(text[:length])
    return out


@dataclass
class _Result:
    ttft: float = float("nan")
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


async def _one(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> _Result:
    res, t0, last = _Result(), time.perf_counter(), None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message"))
                    return res
                if obj.get("usage"):
                    res.tokens = int(obj["usage"]["completion_tokens"])
                if obj.get("choices") and obj["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
    except Exception as exc:  # a client-side failure counts as an error of that request
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def _model_id(client: Any, url: str, headers: dict[str, str]) -> str | None:
    r = await client.get(url + "/v1/models", headers=headers)
    r.raise_for_status()
    data = r.json().get("data") or []
    return data[0]["id"] if data else None


async def run_load(url: str, concurrency: int, prompts: list[str], max_tokens: int, api_key: str | None = None,
                   model: str | None = None, progress: str | None = None) -> dict[str, Any]:
    """Send one streaming completion per prompt from ``concurrency`` clients; the figures as a dict.
    ``progress``: the label of a progress line on stderr, advanced per finished request (None: silent)."""
    import httpx

    from ..model.progress import Progress

    bar = Progress(progress or "", len(prompts), len(prompts), enabled=progress is not None, quiet_below=0,
                   unit="requests", count_only=True)

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        try:
            served = await _model_id(client, url, headers)
        except httpx.HTTPError as exc:     # no server there, or not an OpenAI one: a usage error, not a run
            raise LoadtestError(f"no usable server at {url} (GET /v1/models: {type(exc).__name__}: {exc})"[:300]) \
                from None
        model = model or served
        queue: asyncio.Queue[str] = asyncio.Queue()
        for p in prompts:
            queue.put_nowait(p)
        results: list[_Result] = []

        async def worker() -> None:
            while not queue.empty():
                p = queue.get_nowait()
                body = {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}, "ignore_eos": True}
                if model:
                    body["model"] = model
                results.append(await _one(client, url, body, headers))
                bar.advance(1)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    bar.close()
    ok = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft == r.ttft]
    itl = [x for r in ok for x in r.itl]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "first_error": next((r.error for r in results if r.error), None), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p99_ms": 1e3 * percentile(itl, 99)}


def run_remote(url: str, concurrency: int, requests: int, max_tokens: int, prompt_len: int,
               api_key: str | None = None, model: str | None = None) -> dict[str, Any]:
    """The load test against a running server at ``url``."""
    run = asyncio.run(run_load(url.rstrip("/"), concurrency, make_prompts(requests, prompt_len), max_tokens,
                               api_key, model, progress=f"{concurrency} clients"))
    return {"url": url, "runs": [run], "errors": run["errors"]}


def run_inprocess(opts: Any, concurrency: int, requests: int, max_tokens: int, prompt_len: int) -> dict[str, Any]:
    """Start a server for ``opts`` (a ``ServeOptions``) on loopback, warm it up, run the requests with
    concurrency 1 and then ``concurrency``; both runs and the throughput ratio."""
    from .app import BackgroundServer, build_app
    from .cli import build_server

    print("loadtest: loading the model and starting the server in-process ...", file=sys.stderr, flush=True)
    served = build_server(opts)
    print(f"loadtest: {served.model_name} ready; a warm-up request, then {requests} requests from 1 client and from "
          f"{concurrency}", file=sys.stderr, flush=True)
    engine = served.engine.start()
    prompts = make_prompts(requests, prompt_len)
    try:
        with BackgroundServer(build_app(engine, served.model_name, None, served.template)) as srv:
            asyncio.run(run_load(srv.url, 1, prompts[:1], 2))                      # warm-up
            seq = asyncio.run(run_load(srv.url, 1, prompts, max_tokens, progress="1 client (sequential)"))
            bat = asyncio.run(run_load(srv.url, concurrency, prompts, max_tokens,
                                       progress=f"{concurrency} clients (batched)"))
    finally:
        engine.stop()
    ratio = bat["output_tokens_per_s"] / seq["output_tokens_per_s"] if seq["output_tokens_per_s"] else float("nan")
    return {"url": srv.url, "server": served.describe(srv.url), "runs": [seq, bat], "batch_speedup": ratio,
            "errors": seq["errors"] + bat["errors"]}


def format_report(report: dict[str, Any]) -> str:
    """A small table of the runs (one column each)."""
    runs = report["runs"]
    rows = [("requests", "requests", "{:.0f}"), ("errors", "errors", "{:.0f}"), ("wall s", "wall_s", "{:.2f}"),
            ("requests/s", "requests_per_s", "{:.2f}"), ("output tokens/s", "output_tokens_per_s", "{:.1f}"),
            ("TTFT p50 ms", "ttft_p50_ms", "{:.1f}"), ("TTFT p99 ms", "ttft_p99_ms", "{:.1f}"),
            ("ITL p50 ms", "itl_p50_ms", "{:.1f}"), ("ITL p99 ms", "itl_p99_ms", "{:.1f}")]
    head = f"{'':<18}" + "".join(f"{'concurrency ' + str(r['concurrency']):>18}" for r in runs)
    lines = [report.get("server") or f"server {report['url']}", head]
    lines += [f"{label:<18}" + "".join(f"{fmt.format(r[key]):>18}" for r in runs) for label, key, fmt in rows]
    if "batch_speedup" in report:
        n = runs[-1]["concurrency"]
        lines.append(f"batch-{n} decode vs {n} sequential runs: {report['batch_speedup']:.2f}x output tokens/s")
    for r in runs:
        if r["first_error"]:
            lines.append(f"first error (concurrency {r['concurrency']}): {r['first_error']}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    """Write the report to ``path`` (NaN as null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(clean(report), indent=2) + "\n")
