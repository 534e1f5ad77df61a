"""The serving engine on the V4.1 model (tiny-v41): chunked prefill and queueing over KV pool slots give each
request what it gets alone, and the V4.1 chat format is the one the model's arch selects."""
import queue

import pytest

from dsv4rt.model.kvpool import KVPool, slot_bytes
from dsv4rt.serve.cli import ServeOptions, build_server
from dsv4rt.serve.engine import Engine
from dsv4rt.serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=5, temperature=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("DSV4RT_CACHE_DIR", str(tmp_path_factory.mktemp("v41-serve")))
    return build_server(ServeOptions(preset="tiny-v41", backend="cpu", dtype="fp32", max_seqs=2, max_seq_len=256))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


class _Sink:
    def __init__(self):
        self.q = queue.Queue()

    def __call__(self, ev):
        self.q.put(ev)

    def result(self, timeout=120):
        toks = []
        while True:
            ev = self.q.get(timeout=timeout)
            if ev.kind == "token":
                toks.append(ev.text)
            else:
                return "".join(toks), ev


def _engine(served, slots, **kw):
    model, tok = served.engine.model, served.engine.tokenizer
    return Engine(model, tok, KVPool(model, slots * slot_bytes(model, 256), 256), backend="cpu", **kw)


def test_v41_requests_in_shared_slots_match_alone(served):
    assert served.engine.model.cfg.is_v41
    prompts = [[0] + [3 + (11 * i + j) % 200 for j in range(n)] for i, n in enumerate((150, 4, 70))]
    ref = _engine(served, 1, prefill_chunk=512).start()
    try:
        alone = []
        for p in prompts:
            s = _Sink()
            ref.submit(p, GREEDY, s)
            alone.append(s.result())
    finally:
        ref.stop()
    e = _engine(served, 2, prefill_chunk=32).start()     # 3 requests in 2 slots, prompts over several steps
    try:
        sinks = [_Sink() for _ in prompts]
        for p, s in zip(prompts, sinks):
            e.submit(p, GREEDY, s)
        for (ta, ea), (tb, eb) in zip(alone, [s.result() for s in sinks]):
            assert ta == tb and ea.finish_reason == eb.finish_reason
    finally:
        e.stop()


def test_v41_chat_format_follows_the_model_arch():
    from dsv4rt.serve.chat import ChatTemplate

    class AllTokens:   # a tokenizer holding every control token of both formats
        def token_id(self, text):
            return 7

    for arch in ("deepseek_v4", "deepseek_v41"):
        assert ChatTemplate.from_checkpoint(None, AllTokens(), model_type=arch).dialect.name == arch
