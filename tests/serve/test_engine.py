"""The engine without HTTP: admission, queue bound, chunked prefill, cancellation, failures."""
import queue
import time

import pytest

from dsv4rt.model.kvpool import KVPool, slot_bytes
from dsv4rt.serve.cli import ServeOptions, build_server
from dsv4rt.serve.engine import Engine
from dsv4rt.serve.protocol import ApiError
from dsv4rt.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def built():
    served = build_server(ServeOptions(preset="tiny", backend="cpu", dtype="fp32", max_seqs=2, max_seq_len=256))
    return served.engine.model, served.engine.tokenizer


def _engine(built, slots=2, **kw):
    model, tok = built
    return Engine(model, tok, KVPool(model, slots * slot_bytes(model, 256), 256), backend="cpu", **kw)


class _Sink:
    def __init__(self):
        self.q = queue.Queue()

    def __call__(self, ev):
        self.q.put(ev)

    def result(self, timeout=30):
        text = []
        while True:
            ev = self.q.get(timeout=timeout)
            if ev.kind == "token":
                text.append(ev.text)
            else:
                return "".join(text), ev


def _run(engine, prompt, params=GREEDY):
    sink = _Sink()
    engine.submit(prompt, params, sink)
    return sink.result()


def _wait_idle(engine, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.snapshot()
        if s["requests_running"] == 0 and s["kv_slots_used"] == 0 and s["requests_waiting"] == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.snapshot()}")


def test_queue_bound_and_context_length_are_refused_at_submit(built):
    e = _engine(built, max_queue=2)                          # not started: requests stay queued
    for _ in range(2):
        e.submit([0, 5, 6], GREEDY, _Sink())
    with pytest.raises(ApiError) as ei:
        e.submit([0, 5, 6], GREEDY, _Sink())
    assert ei.value.status == 503 and ei.value.type == "server_error" and ei.value.headers.get("Retry-After")
    with pytest.raises(ApiError) as ei:
        e.submit([0] * 250, SamplingParams(max_tokens=7), _Sink())
    assert ei.value.status == 400 and "maximum context length is 256" in ei.value.message
    assert e.snapshot()["requests_waiting"] == 2 and e.counters.requests["rejected"] == 2
    e.stop()                                                  # the queued ones get a 503 error
    assert not e.alive


def test_chunked_prefill_and_queueing_give_each_request_its_alone_result(built):
    ref = _engine(built, slots=1, prefill_chunk=512).start()
    prompts = [[0] + [3 + (7 * i + j) % 200 for j in range(n)] for i, n in enumerate((40, 3, 25, 9))]
    try:
        alone = [_run(ref, p) for p in prompts]
    finally:
        ref.stop()
    e = _engine(built, slots=2, prefill_chunk=16).start()     # 4 requests in 2 slots, prompts over 3 steps
    try:
        sinks = [_Sink() for _ in prompts]
        for p, s in zip(prompts, sinks):
            e.submit(p, GREEDY, s)
        got = [s.result() for s in sinks]
        for (ta, ea), (tb, eb) in zip(alone, got):
            assert ta == tb and ea.finish_reason == eb.finish_reason == "length"
            assert eb.usage == ea.usage
        snap = _wait_idle(e)
        assert snap["requests"]["ok"] == 4 and snap["prompt_tokens"] == sum(map(len, prompts))
        assert snap["generation_tokens"] == 4 * GREEDY.max_tokens
    finally:
        e.stop()


def test_cancel_frees_the_slot_at_the_next_step(built):
    e = _engine(built, slots=1).start()
    try:
        sink = _Sink()
        seq = e.submit([0, 10, 11], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), sink)
        waiting = e.submit([0, 12], GREEDY, _Sink())
        sink.q.get(timeout=30)                                  # generation has started
        e.cancel(waiting)                                       # cancelled while queued
        e.cancel(seq)
        snap = _wait_idle(e)
        assert snap["requests"]["cancelled"] == 2
        assert _run(e, [0, 5])[1].kind == "done"                # the slot is usable again
    finally:
        e.stop()


def test_a_failing_step_fails_its_requests_and_the_engine_carries_on(built, monkeypatch):
    e = _engine(built, slots=2).start()
    model = e.model
    real, calls = model.forward_ragged, []

    def flaky(tokens, caches):
        calls.append(1)
        if any(t.numel() == 4 and int(t[1]) == 250 for t in tokens) and len(calls) < 50:
            raise RuntimeError("injected")
        return real(tokens, caches)

    monkeypatch.setattr(model, "forward_ragged", flaky)
    try:
        text, ev = _run(e, [0, 250, 251, 252])
        assert ev.kind == "error" and ev.status == 500 and "injected" in ev.message
        assert _wait_idle(e)["requests"]["error"] == 1 and e.alive
        text, ev = _run(e, [0, 5, 6])
        assert ev.kind == "done" and ev.usage["completion_tokens"] == GREEDY.max_tokens
    finally:
        e.stop()


def test_a_sequence_whose_sampling_raises_fails_alone(built):
    """Parameters that make sampling raise (a logit_bias id beyond the vocabulary, which the API refuses but
    the engine must survive) fail that sequence only; a seeded bystander sampling in the same steps gets
    exactly what it gets alone, and the engine goes on."""
    bystander = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=11, ignore_eos=True)
    prompt = [0, 40, 41, 42]
    e = _engine(built, slots=2).start()
    try:
        alone = _run(e, prompt, bystander)
        bad = SamplingParams(max_tokens=12, temperature=0, logit_bias=((10 ** 6, 1.0),))
        huge_k = SamplingParams(max_tokens=12, temperature=1.0, top_k=2 ** 63, seed=3, ignore_eos=True)
        sinks = [_Sink(), _Sink(), _Sink()]
        e.submit(prompt, bystander, sinks[0])
        e.submit([0, 50, 51], bad, sinks[1])
        text, ev = sinks[1].result()
        assert ev.kind == "error" and ev.status == 500 and text == ""
        e.submit([0, 60], huge_k, sinks[2])                  # top_k past int64: clamped to the vocabulary
        assert sinks[0].result() == alone and alone[1].kind == "done"
        assert sinks[2].result()[1].usage["completion_tokens"] == 12
        snap = _wait_idle(e)
        assert snap["requests"]["error"] == 1 and snap["requests"]["ok"] == 3 and e.alive
    finally:
        e.stop()


def test_max_tokens_none_runs_to_the_context_limit(built):
    e = _engine(built, slots=1).start()
    try:
        text, ev = _run(e, [0, 5, 6, 7], SamplingParams(temperature=0, ignore_eos=True))
        assert ev.finish_reason == "length" and ev.usage["completion_tokens"] == 256 - 4
        with pytest.raises(ApiError) as ei:
            e.submit([0] * 256, SamplingParams(), _Sink())       # no room for one token
        assert ei.value.status == 400
    finally:
        e.stop()
