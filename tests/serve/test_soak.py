"""A bounded soak test of the server on loopback: mixed requests (completions and chat, JSON and streamed,
logprobs, n = 2, penalties, echo, and refused ones) in rounds after a warm-up, checking that nothing
accumulates: no request state outlives its request, and the Python heap and the process's resident
memory stay flat from round to round.

The warm-up fills what is meant to fill: the per-shape selection caches of the ops (keyed by the shapes of
an engine step, bounded at 4096 entries per op) and the allocators' pools; prompts have one length, so the
step shapes after it repeat. Checks: no ``Sequence``, ``Event``, ``Group``, ``_State`` or ``TextStream``
left once a round is answered; from the first measured round to the last (96 requests) the Python heap
(``sys.getallocatedblocks``) grows by fewer than 5,000 blocks (a request body or a request's state kept
per request is far more) and the resident set by less than 24 MiB (measured: within +-3 MiB).
"""
import asyncio
import gc
import sys

import pytest

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install 'dsv4rt[dev]')")
pytest.importorskip("starlette", reason="dsv4rt serve needs starlette (pip install 'dsv4rt[serve]')")
pytest.importorskip("uvicorn", reason="dsv4rt serve needs uvicorn (pip install 'dsv4rt[serve]')")

from dsv4rt.serve import engine as engine_mod, respond, sampling  # noqa: E402
from dsv4rt.serve.app import BackgroundServer, build_app  # noqa: E402
from dsv4rt.serve.cli import ServeOptions, build_server  # noqa: E402

ROUND, ROUNDS, CLIENTS = 48, 3, 3
TRACKED = (engine_mod.Sequence, engine_mod.Event, respond.Group, respond._State, sampling.TextStream)


def _rss_mib() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        pytest.skip("no /proc/self/status to read the resident set from")


def _request(i: int) -> tuple[str, dict, int]:
    """The i-th request of the mix: (path, body, expected status); prompts all hold 8 tokens."""
    ids = [0] + [35 + (5 * i + j) % 90 for j in range(7)]
    chat = [{"role": "user", "content": "".join(chr(97 + (i + j) % 26) for j in range(3))}]
    return [("/v1/completions", dict(prompt=ids, max_tokens=3, temperature=0), 200),
            ("/v1/completions", dict(prompt=ids, max_tokens=3, stream=True, seed=i, logprobs=2,
                                     presence_penalty=0.5), 200),
            ("/v1/chat/completions", dict(messages=chat, max_tokens=3, n=2, seed=i, frequency_penalty=0.3), 200),
            ("/v1/chat/completions", dict(messages=chat, max_tokens=3, stream=True, logprobs=True, top_logprobs=2,
                                          stream_options={"include_usage": True}), 200),
            ("/v1/completions", dict(prompt=ids, max_tokens=3, temperature=1, top_k=2 ** 63), 400),
            ("/v1/completions", dict(prompt=ids, max_tokens=3, repetition_penalty=1.3, logit_bias={"70": 2},
                                     echo=True), 200)][i % 6]


async def _round(url: str, start: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        todo = iter(range(start, start + ROUND))

        async def client() -> None:
            for i in todo:
                path, body, status = _request(i)
                r = await c.post(path, json=body)
                assert r.status_code == status, r.text
                if body.get("stream"):
                    assert r.text.endswith("data: [DONE]\n\n")

        await asyncio.gather(*(client() for _ in range(CLIENTS)))


def _live() -> dict[str, int]:
    gc.collect()
    counts = {t.__name__: 0 for t in TRACKED}
    for o in gc.get_objects():
        if type(o) in TRACKED:
            counts[type(o).__name__] += 1
    return counts


def test_memory_stays_flat_under_mixed_load():
    served = build_server(ServeOptions(preset="tiny", backend="cpu", max_seqs=2, max_seq_len=128))
    engine = served.engine.start()
    server = BackgroundServer(build_app(engine, served.model_name, None, served.template))
    try:
        asyncio.run(_round(server.url, 0))                                   # warm-up
        marks = []
        for r in range(ROUNDS):
            asyncio.run(_round(server.url, (r + 1) * ROUND))
            assert _live() == {t.__name__: 0 for t in TRACKED}             # every request let go of
            marks.append((sys.getallocatedblocks(), _rss_mib()))
        snap = engine.snapshot()
        assert snap["kv_slots_used"] == 0 and snap["requests_running"] == 0 and snap["requests_waiting"] == 0
        (blocks0, rss0), (blocks1, rss1) = marks[0], marks[-1]
        print("soak marks (pymalloc blocks, RSS MiB):", marks)
        assert blocks1 - blocks0 < 5000, marks
        assert rss1 - rss0 < 24, marks
    finally:
        server.stop()
        engine.stop()
