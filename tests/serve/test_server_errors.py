"""Refusals over HTTP: bad input (4xx with OpenAI error bodies), the API key, a full queue, a stopped
engine, and a request that fails inside the engine (5xx) while the next ones still work."""
import json

import pytest

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install 'dsv4rt[dev]')")
pytest.importorskip("starlette", reason="dsv4rt serve needs starlette (pip install 'dsv4rt[serve]')")
pytest.importorskip("uvicorn", reason="dsv4rt serve needs uvicorn (pip install 'dsv4rt[serve]')")

from dsv4rt.model.kvpool import KVPool  # noqa: E402
from dsv4rt.serve.app import BackgroundServer, build_app  # noqa: E402
from dsv4rt.serve.cli import ServeOptions, build_server  # noqa: E402
from dsv4rt.serve.engine import Engine  # noqa: E402

KEY = "sekret-key"


@pytest.fixture(scope="module")
def env():
    served = build_server(ServeOptions(preset="tiny", backend="cpu", max_seqs=2, max_seq_len=256))
    engine = served.engine.start()
    # a second engine that never starts, queue bound 0: every request is refused as overloaded
    idle = Engine(engine.model, engine.tokenizer, KVPool(engine.model, engine.pool.slot_bytes, 256), max_queue=0)
    servers = {"open": BackgroundServer(build_app(engine, "dsv4-tiny")),
               "key": BackgroundServer(build_app(engine, "dsv4-tiny", api_key=KEY)),
               "idle": BackgroundServer(build_app(idle, "dsv4-tiny"))}
    clients = {k: httpx.Client(base_url=s.url, timeout=60) for k, s in servers.items()}
    try:
        yield clients, engine
    finally:
        for c in clients.values():
            c.close()
        for s in servers.values():
            s.stop()
        engine.stop()


def check_error(r, status, param="-", type_="invalid_request_error"):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    e = body["error"]
    assert e["type"] == type_ and isinstance(e["message"], str) and e["message"] and e["code"] is None
    if param != "-":
        assert e["param"] == param, e
    return e


C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,status,param", [
    (C, b"{not json", 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b'"text"', 400, None),
    (C, {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    (C, {"max_tokens": 3}, 400, "prompt"),
    (CH, {"max_tokens": 3}, 400, "messages"),
    (C, {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    (C, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (C, {"prompt": "x", "stop": 5}, 400, "stop"),
    (C, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": -4}, 400, "max_tokens"),
    (C, {"prompt": "x", "temperature": -1}, 400, "temperature"),
    (C, {"prompt": "x", "temperature": 2.01}, 400, "temperature"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "x", "top_p": 1.2}, 400, "top_p"),
    (C, {"prompt": "x", "top_k": -2}, 400, "top_k"),
    (C, {"prompt": "x", "top_k": 9223372036854775808, "temperature": 1}, 400, "top_k"),
    (C, {"prompt": "x", "seed": 2 ** 63}, 400, "seed"),
    (C, {"prompt": "x", "presence_penalty": 5.0}, 400, "presence_penalty"),
    (C, {"prompt": "x", "frequency_penalty": 5.0}, 400, "frequency_penalty"),
    (C, {"prompt": "x", "n": 200}, 400, "n"),
    (C, {"prompt": "x", "echo": True, "logprobs": 2}, 400, "echo"),
    (C, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (C, {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    (C, b'{"prompt": "lone \\ud800 surrogate"}', 400, "prompt"),
    (C, b'{"prompt": "x", "temperature": NaN}', 400, None),
    (C, b"[" * 100_000 + b"]" * 100_000, 400, None),
    (C, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    (C, {"prompt": "x" * 300}, 400, "prompt"),
    (C, {"prompt": "x" * 200, "max_tokens": 100}, 400, "prompt"),
    (C, {"prompt": [0, 5, 259]}, 400, "prompt"),
    (CH, {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),
    (CH, {"messages": MSG, "max_completion_tokens": "many"}, 400, "max_completion_tokens"),
    (CH, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    (CH, {"messages": [{"role": "user", "content": 1}]}, 400, "messages[0].content"),
    (CH, {"messages": MSG, "n": 0}, 400, "n"),
    (CH, b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, "messages[0].content"),
    (CH, {"messages": MSG, "seed": 2 ** 63}, 400, "seed"),
    (CH, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    (CH, {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format"),
    # the tiny preset's byte tokenizer cannot carry the DeepSeek format: the plain fallback shows no tools
    (CH, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CH, {"messages": MSG, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice"),
    (CH, {"messages": MSG, "reasoning_effort": [1]}, 400, "reasoning_effort"),
])
def test_bad_input_gets_4xx_with_an_openai_error(env, path, body, status, param):
    c = env[0]["open"]
    r = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
    check_error(r, status, param)


def test_unknown_fields_are_refused_and_nulls_are_not_given(env):
    c = env[0]["open"]
    check_error(c.post(C, json={"prompt": "x", "max_tokens": 2, "user": "u", "besto_of": 1}), 400, "besto_of")
    r = c.post(C, json={"prompt": "x", "max_tokens": 2, "presence_penalty": 0.5, "user": "u",
                        "logit_bias": {"5": 1}, "suffix": None, "best_of": 1, "n": 1})
    assert r.status_code == 200, r.text


def test_unknown_endpoint_and_wrong_method(env):
    c = env[0]["open"]
    check_error(c.get("/v1/nothing"), 404)
    check_error(c.post("/nowhere", json={}), 404)
    check_error(c.get(C), 405)
    check_error(c.post("/v1/models"), 405)
    check_error(c.post("/health"), 405)


def test_api_key(env):
    c = env[0]["key"]
    check_error(c.get("/v1/models"), 401, type_="authentication_error")
    check_error(c.post(C, json={"prompt": "x"}), 401, type_="authentication_error")
    check_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, type_="authentication_error")
    check_error(c.post(CH, json={"messages": MSG}, headers={"Authorization": KEY}), 401,
                type_="authentication_error")
    auth = {"Authorization": f"Bearer {KEY}"}
    assert c.get("/v1/models", headers=auth).status_code == 200
    r = c.post(C, json={"prompt": "x", "max_tokens": 2}, headers=auth)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


def test_full_queue_and_dead_engine(env):
    c = env[0]["idle"]
    e = check_error(c.post(C, json={"prompt": "x"}), 503, type_="server_error")
    assert "overloaded" in e["message"]
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] != "ok"


def test_a_request_failing_in_the_engine_gets_500_and_the_next_work(env, monkeypatch):
    c, engine = env[0]["open"], env[1]
    real = engine.model.forward_ragged
    failed = []

    def flaky(tokens, caches):
        if not failed and any(t.numel() > 1 and int(t[1]) == 250 for t in tokens):
            failed.append(1)
            raise RuntimeError("injected failure")
        return real(tokens, caches)

    monkeypatch.setattr(engine.model, "forward_ragged", flaky)
    e = check_error(c.post(C, json={"prompt": [0, 250, 251], "max_tokens": 3}), 500, type_="server_error")
    assert "injected failure" in e["message"]
    failed.clear()
    r = c.post(C, json={"prompt": [0, 250, 251], "max_tokens": 3, "stream": True})
    check_error(r, 500, type_="server_error")
    assert engine.alive and c.get("/health").status_code == 200
    for _ in range(2):
        r = c.post(C, json={"prompt": [0, 250, 251], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    r = c.post(CH, json={"messages": MSG, "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


def test_an_overflowing_top_k_is_refused_while_a_concurrent_stream_completes(env):
    """top_k 2^63 used to fail the whole engine step ("Overflow when unpacking long long") and end every
    other stream of it: now a 400 naming top_k, and the stream running meanwhile completes unchanged."""
    c, engine = env
    c = c["open"]
    body = dict(prompt="bystander", max_tokens=24, temperature=1.0, seed=5, ignore_eos=True)
    alone = c.post(C, json=body).json()["choices"][0]["text"]
    with c.stream("POST", C, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        events = [next(lines)]
        for stream in (False, True):
            check_error(c.post(C, json={"prompt": "x", "max_tokens": 4, "temperature": 1, "stream": stream,
                                        "top_k": 9223372036854775808}), 400, "top_k")
        events += [e for e in lines if e]
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert events[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == alone
    assert engine.alive
