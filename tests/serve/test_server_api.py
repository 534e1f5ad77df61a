"""The real server on a loopback port (tiny preset, CPU, 4 KV slots of 256 tokens), talked to with httpx:
completions and chat, streaming and not, determinism, seeds, stop strings, concurrency, cancellation,
/health, /metrics and /v1/models.

fp32 activations: the batched step sums in another order than a sequence alone, and in bf16 the random
tiny model's near-ties could flip a greedy token.
"""
import asyncio
import json
import time

import pytest

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install 'dsv4rt[dev]')")
pytest.importorskip("starlette", reason="dsv4rt serve needs starlette (pip install 'dsv4rt[serve]')")
pytest.importorskip("uvicorn", reason="dsv4rt serve needs uvicorn (pip install 'dsv4rt[serve]')")

from dsv4rt.serve.app import BackgroundServer, build_app  # noqa: E402
from dsv4rt.serve.cli import ServeOptions, build_server  # noqa: E402


@pytest.fixture(scope="module")
def srv():
    served = build_server(ServeOptions(preset="tiny", backend="cpu", dtype="fp32", max_seqs=4, max_seq_len=256))
    engine = served.engine.start()
    server = BackgroundServer(build_app(engine, served.model_name, None, served.template))
    client = httpx.Client(base_url=server.url, timeout=60)
    try:
        yield client
    finally:
        client.close()
        server.stop()
        engine.stop()


def sse(text):
    """The JSON chunks of an SSE body (asserting the framing and the final [DONE])."""
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def complete(c, **body):
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_json_usage_and_length(srv):
    out = complete(srv, model="dsv4-tiny", prompt="Hello", max_tokens=5, temperature=0, ignore_eos=True)
    assert out["object"] == "text_completion" and out["model"] == "dsv4-tiny" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int)
    ch = out["choices"][0]
    assert ch["index"] == 0 and ch["finish_reason"] == "length" and isinstance(ch["text"], str)
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}
    ids = complete(srv, prompt=[0] + [b + 3 for b in b"Hello"], max_tokens=5, temperature=0, ignore_eos=True)
    assert ids["choices"][0]["text"] == ch["text"]
    plain = complete(srv, prompt="Hello", max_tokens=5, temperature=0)        # may stop early at EOS
    assert plain["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= plain["usage"]["completion_tokens"] <= 5


def test_streaming_completion_equals_the_json_text(srv):
    body = dict(prompt="Stream me", max_tokens=8, temperature=0, ignore_eos=True)
    whole = complete(srv, **body)
    r = srv.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    *body_chunks, final, usage = chunks
    assert final["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks)
    assert "".join(c["choices"][0]["text"] for c in body_chunks + [final]) == whole["choices"][0]["text"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    r = srv.post("/v1/completions", json={**body, "stream": True})
    assert "usage" not in sse(r.text)[-1]


def test_chat_completion_both_ways(srv):
    body = dict(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                max_completion_tokens=6, temperature=0, ignore_eos=True)
    r = srv.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and out["choices"][0]["finish_reason"] == "length"
    prompt = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert out["usage"]["prompt_tokens"] == len(prompt.encode()) + 1 and out["usage"]["completion_tokens"] == 6
    chunks = sse(srv.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]


def test_greedy_is_deterministic_and_seeds_reproduce(srv):
    g = [complete(srv, prompt="Same", max_tokens=8, temperature=0)["choices"][0]["text"] for _ in range(2)]
    assert g[0] == g[1]
    body = dict(prompt="Seeded", max_tokens=8, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    a = [complete(srv, **body, seed=42)["choices"][0]["text"] for _ in range(2)]
    assert a[0] == a[1]
    others = {complete(srv, **body, seed=s)["choices"][0]["text"] for s in (1, 2, 3)}
    assert others != {a[0]}


def test_stop_strings_truncate(srv):
    body = dict(prompt="Stop here", max_tokens=16, temperature=0, ignore_eos=True)
    full = complete(srv, **body)["choices"][0]["text"]
    i = next(i for i in range(2, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    stop = full[i:i + 2]
    out = complete(srv, **body, stop=[stop, "\x00never"])
    assert out["choices"][0]["text"] == full[:full.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks = sse(srv.post("/v1/completions", json={**body, "stop": stop, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_requests_beyond_the_slots_match_each_alone(srv):
    bodies = [dict(prompt=f"request number {i} " * (1 + i % 3), max_tokens=6 + i % 3, temperature=0)
              for i in range(8)]
    alone = [complete(srv, **b)["choices"][0]["text"] for b in bodies]

    async def together():
        async with httpx.AsyncClient(base_url=str(srv.base_url), timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(together()) == alone


def metrics(c):
    """{series: value} of /metrics, checking the text format."""
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out, helped, typed = {}, set(), set()
    for line in r.text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
            assert name.split("{")[0] in helped & typed
    return out


def _series(m, name, **labels):
    return sum(v for k, v in m.items() if k.split("{")[0] == name and all(f'{a}="{b}"' in k for a, b in labels.items()))


def test_a_disconnected_stream_frees_its_slot(srv):
    before = _series(metrics(srv), "dsv4rt_requests_total", status="cancelled")
    body = dict(prompt="cancel me", max_tokens=200, temperature=0, ignore_eos=True, stream=True)
    with srv.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: ")
        assert _series(metrics(srv), "dsv4rt_kv_slots_used") >= 1
    deadline = time.monotonic() + 20
    while True:
        m = metrics(srv)
        if (_series(m, "dsv4rt_requests_running") == 0 and _series(m, "dsv4rt_kv_slots_used") == 0
                and _series(m, "dsv4rt_requests_total", status="cancelled") == before + 1):
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert _series(m, "dsv4rt_generation_tokens_total") < 1000


def test_a_client_gone_before_its_json_answer_cancels_the_request(srv):
    before = _series(metrics(srv), "dsv4rt_requests_total", status="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        srv.post("/v1/completions", json=dict(prompt="gone", max_tokens=200, temperature=0, ignore_eos=True),
                 timeout=0.3)
    deadline = time.monotonic() + 20
    while _series(m := metrics(srv), "dsv4rt_requests_total", status="cancelled") != before + 1:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert _series(m, "dsv4rt_kv_slots_used") == 0


def test_health_metrics_models(srv):
    r = srv.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    m = metrics(srv)
    for name in ("dsv4rt_prompt_tokens_total", "dsv4rt_generation_tokens_total", "dsv4rt_requests_running",
                 "dsv4rt_requests_waiting", "dsv4rt_kv_slots_used", "dsv4rt_kv_slots_total",
                 "dsv4rt_kv_cache_bytes", "dsv4rt_generation_tokens_per_second"):
        assert any(k.startswith(name + "{") for k in m), name
    assert _series(m, "dsv4rt_kv_slots_total") == 4 and _series(m, "dsv4rt_kv_cache_bytes") > 0
    assert _series(m, "dsv4rt_requests_total", status="ok") >= 1
    assert _series(m, "dsv4rt_generation_tokens_total") > 0
    r = srv.get("/v1/models")
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "list" and [d["id"] for d in data["data"]] == ["dsv4-tiny"]


def test_model_by_id_version_tokenize_detokenize(srv):
    r = srv.get("/v1/models/dsv4-tiny")
    assert r.status_code == 200 and r.json()["id"] == "dsv4-tiny" and r.json()["object"] == "model"
    assert r.json()["max_model_len"] == 256
    r = srv.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    from dsv4rt import __version__

    assert srv.get("/version").json() == {"version": __version__}
    r = srv.post("/tokenize", json={"prompt": "Hé", "return_token_strs": True})
    assert r.json() == {"count": 4, "max_model_len": 256, "tokens": [0, 75, 198, 172],
                        "token_strs": ["", "H", "bytes:\\xc3", "bytes:\\xa9"]}
    assert srv.post("/tokenize", json={"prompt": "Hi", "add_special_tokens": False}).json()["tokens"] == [75, 108]
    msgs = [{"role": "user", "content": "Hi"}]
    chat = srv.post("/tokenize", json={"model": "dsv4-tiny", "messages": msgs}).json()
    r = srv.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1})
    assert chat["count"] == r.json()["usage"]["prompt_tokens"] == len(chat["tokens"])
    assert srv.post("/detokenize", json={"tokens": [0, 75, 198, 172]}).json() == {"prompt": "Hé"}
    for path, body, param in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "a", "messages": msgs}, "prompt"),
                              ("/tokenize", {"prompt": "a", "tools": []}, "tools"),
                              ("/tokenize", {"prompt": 3}, "prompt"), ("/tokenize", {"prompt": "a", "x": 1}, "x"),
                              ("/tokenize", {"messages": msgs, "add_generation_prompt": False}, "add_generation_prompt"),
                              ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
                              ("/detokenize", {"tokens": [0, 259]}, "tokens"), ("/detokenize", {}, "tokens"),
                              ("/detokenize", {"tokens": ["a"]}, "tokens")]:
        r = srv.post(path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (path, body, r.text)


def test_max_tokens_left_out_runs_to_the_context_limit(srv):
    out = complete(srv, prompt="Long", temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 256 - 5 and out["choices"][0]["finish_reason"] == "length"
    r = srv.post("/v1/completions", json={"prompt": "x" * 255})                # no room for one token
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
