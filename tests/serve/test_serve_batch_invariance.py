"""Temperature 0 under load: nine prompts sent alone and then together, in another order and in another
mix, give the same greedy tokens at bf16 (the batch-invariant mode, dsv4rt.invariant).

Without the mode the same experiment differs from the first few tokens (the native GEMMs take a GEMV for a
few rows and a blocked GEMM for more, torch's glue kernels are chosen by the number of rows).
"""
from __future__ import annotations

import queue

import pytest
import torch

from dsv4rt.model.kvpool import KVPool, slot_bytes
from dsv4rt.serve.cli import ServeOptions, build_server
from dsv4rt.serve.engine import Engine
from dsv4rt.serve.sampling import SamplingParams

PROMPTS = ["The capital of France is", "def fib(n):", "Once upon a time", "2 + 2 =", "Hello, my name is",
           "In 1969, the first", "Translate to German: cat", "The quick brown fox", "SELECT * FROM users WHERE"]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
SEQ_LEN = 256


@pytest.fixture(scope="module")
def served():
    return build_server(ServeOptions(preset="tiny", dtype="bf16", max_seqs=len(PROMPTS), max_seq_len=SEQ_LEN))


class _Sink:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def __call__(self, ev) -> None:
        self.q.put(ev)

    def wait(self, timeout: float = 120) -> None:
        while True:
            ev = self.q.get(timeout=timeout)
            assert ev.kind != "error", ev.message
            if ev.kind == "done":
                return


def _generate(served, prompts: list[list[int]], batch_invariant: bool | None = True,
              staggered: bool = False) -> list[list[int]]:
    """Greedy tokens of ``prompts`` on a fresh engine: all admitted at the first step, or (``staggered``)
    half of them submitted only once the first half is decoding."""
    model, tok = served.engine.model, served.engine.tokenizer
    engine = Engine(model, tok, KVPool(model, len(prompts) * slot_bytes(model, SEQ_LEN), SEQ_LEN),
                    backend=served.engine.backend, batch_invariant=batch_invariant)
    sinks = [_Sink() for _ in prompts]
    first = len(prompts) // 2 if staggered else len(prompts)
    seqs = [engine.submit(p, GREEDY, s) for p, s in zip(prompts[:first], sinks)]
    engine.start()
    try:
        if staggered:
            sinks[0].q.get(timeout=120)          # the first half has started decoding
            seqs += [engine.submit(p, GREEDY, s) for p, s in zip(prompts[first:], sinks[first:])]
        for s in sinks:
            s.wait()
    finally:
        engine.stop()
    return [list(q.generated) for q in seqs]


def test_nine_prompts_alone_and_together_give_the_same_greedy_tokens_at_bf16(served):
    assert served.engine.model.dtype == torch.bfloat16
    ids = [served.engine.tokenizer.encode(p) for p in PROMPTS]
    alone = [_generate(served, [p])[0] for p in ids]
    together = _generate(served, ids)
    reverse = _generate(served, ids[::-1])[::-1]
    assert sum(a == b for a, b in zip(alone, together)) == len(PROMPTS)
    assert sum(a == b for a, b in zip(alone, reverse)) == len(PROMPTS)
    assert all(len(a) == GREEDY.max_tokens for a in alone)


def test_other_mixes_and_arrival_times_give_the_same_greedy_tokens(served):
    ids = [served.engine.tokenizer.encode(p) for p in PROMPTS]
    alone = {i: _generate(served, [ids[i]])[0] for i in (0, 3, 5, 8)}
    pairs = _generate(served, [ids[5], ids[0]])                       # a batch of two
    assert pairs == [alone[5], alone[0]]
    mixed = _generate(served, [ids[i] for i in (8, 1, 3, 6, 0, 2)], staggered=True)   # prefill next to decode
    assert [mixed[0], mixed[2], mixed[4]] == [alone[8], alone[3], alone[0]]


def test_the_mode_can_be_turned_off(served):
    ids = [served.engine.tokenizer.encode(p) for p in PROMPTS[:2]]
    model, tok = served.engine.model, served.engine.tokenizer
    off = Engine(model, tok, KVPool(model, slot_bytes(model, SEQ_LEN), SEQ_LEN), batch_invariant=False)
    assert not off.batch_invariant_on()
    assert len(_generate(served, ids, batch_invariant=False)) == 2


@pytest.mark.parametrize("flag,want", [([], None), (["--batch-invariant"], True), (["--no-batch-invariant"], False)])
def test_run_and_serve_take_the_flag(flag, want):
    from dsv4rt.cli import build_parser
    from dsv4rt.model.runner import options_from_args
    from dsv4rt.serve.cli import _options

    parser = build_parser()
    assert options_from_args(parser.parse_args(["run", *flag])).batch_invariant is want
    assert _options(parser.parse_args(["serve", *flag])).batch_invariant is want
