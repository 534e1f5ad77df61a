"""The sampling parameters through the official ``openai`` SDK, checked against float64 references of their
definitions on the very logits the model produced: logprobs (completions and chat, JSON and streamed),
presence / frequency / repetition penalties and logit_bias, n = 2 and its seeds, best_of, echo, greedy
below temperature 1e-5, and max_tokens left out.

One KV slot, so requests run one after another and :class:`Recording` knows that every row it sees
belongs to the running request: the logits of each generated token, in order.
"""
from collections import Counter

import pytest
import torch

openai = pytest.importorskip("openai", reason="the SDK tests need the openai package (pip install 'dsv4rt[dev]')")
pytest.importorskip("starlette", reason="dsv4rt serve needs starlette (pip install 'dsv4rt[serve]')")
pytest.importorskip("uvicorn", reason="dsv4rt serve needs uvicorn (pip install 'dsv4rt[serve]')")

from dsv4rt.serve.cli import ServeOptions  # noqa: E402
from sdk_server import sdk_client  # noqa: E402

MAX_LEN = 160
PROMPT = [0] + [3 + b for b in b"The cat sat on the mat and"]


class Recording:
    """The model, keeping a copy of every logits row it returns and of the tokens it is fed (after the
    prompt: each generated token but the last)."""

    def __init__(self, model):
        self.model, self.rows, self.fed = model, [], []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_ragged(self, tokens, caches):
        logits = self.model.forward_ragged(tokens, caches)
        self.rows += [r.double().clone() for r in logits]
        self.fed += [t.tolist() for t in tokens]
        return logits

    def clear(self):
        self.rows.clear()
        self.fed.clear()

    def generated(self):
        """The generated ids the model was fed back (all but the last)."""
        return [t[0] for t in self.fed[1:]]


@pytest.fixture(scope="module")
def srv():
    opts = ServeOptions(preset="tiny", backend="cpu", dtype="fp32", max_seqs=1, max_seq_len=MAX_LEN)
    with sdk_client(opts, lambda model, tok: Recording(model), timeout=120) as (client, model, name, _):
        yield client, model, name


def _ids(text):
    return [3 + b for b in text.encode("utf-8")]


def reference(z, prompt, out, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """The processed logits of the definitions: bias, CTRL repetition over prompt + output, OpenAI
    frequency / presence over the output."""
    z = z.clone()
    for t, b in (bias or {}).items():
        z[t] += b
    for j in set(prompt) | set(out):
        if repetition != 1:
            z[j] = z[j] / repetition if z[j] > 0 else z[j] * repetition
    for j, c in Counter(out).items():
        z[j] -= c * frequency + presence
    return z


def _argmax_agrees(z, token):
    """token is z's argmax, or within 1e-4 of it (an fp32 near-tie)."""
    return bool(z[token] >= z.max() - 1e-4)


def test_penalties_and_logit_bias_follow_their_definitions(srv):
    client, model, name = srv
    plain = dict(model=name, prompt=PROMPT, max_tokens=16, temperature=0)
    cases = [dict(presence_penalty=1.5), dict(frequency_penalty=1.2), dict(extra_body={"repetition_penalty": 1.8}),
             dict(logit_bias={"70": 6.0, "71": -100}),
             dict(presence_penalty=-0.5, frequency_penalty=0.7, logit_bias={"80": 3.0},
                  extra_body={"repetition_penalty": 0.6})]
    changed = 0
    for case in cases:
        model.clear()
        body = {**plain, **case, "extra_body": {"ignore_eos": True, **case.get("extra_body", {})}}
        r = client.completions.create(**body)
        assert r.usage.completion_tokens == 16 and len(model.rows) == 16
        gen = model.generated()
        assert len(gen) == 15
        pen = dict(presence=case.get("presence_penalty", 0.0), frequency=case.get("frequency_penalty", 0.0),
                   repetition=body["extra_body"].get("repetition_penalty", 1.0),
                   bias={int(k): v for k, v in case.get("logit_bias", {}).items()})
        for i, z in enumerate(model.rows[:15]):
            ref = reference(z, PROMPT, gen[:i], **pen)
            assert _argmax_agrees(ref, gen[i]), (case, i)
            changed += int(ref.argmax()) != int(z.argmax())
        assert r.choices[0].text == client.completions.create(**body).choices[0].text
    assert changed >= 4                        # the cases did change what greedy takes


def test_completion_logprobs_are_the_raw_distribution(srv):
    client, model, name = srv
    model.clear()
    body = dict(model=name, prompt=PROMPT, max_tokens=8, temperature=0.8, seed=3, logprobs=3, frequency_penalty=1.0,
                extra_body={"ignore_eos": True})
    r = client.completions.create(**body)
    lp, gen = r.choices[0].logprobs, model.generated()
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(model.rows) == 8
    for i, z in enumerate(model.rows):
        ref = torch.log_softmax(z, -1)                       # raw: before the penalty and the temperature
        assert sorted(lp.top_logprobs[i].values(), reverse=True)[:3] == pytest.approx(ref.topk(3).values.tolist(),
                                                                                       abs=1e-4)
        assert lp.top_logprobs[i][lp.tokens[i]] == lp.token_logprobs[i]
        if i < len(gen):
            assert lp.token_logprobs[i] == pytest.approx(ref[gen[i]].item(), abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    # streamed: the same tokens and logprobs, spread over the chunks
    chunks = list(client.completions.create(**body, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs and "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_chat_logprobs_json_and_stream(srv):
    client, model, name = srv
    body = dict(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    model.clear()
    r = client.chat.completions.create(**body)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and len(model.rows) == 6
    for e, z in zip(content, model.rows):
        ref = torch.log_softmax(z, -1)
        t = int(z.argmax())                                  # greedy: the top token
        assert e.bytes == ([t - 3] if 3 <= t < 259 else []) and e.logprob == pytest.approx(ref[t].item(), abs=1e-4)
        assert [x.logprob for x in e.top_logprobs] == pytest.approx(ref.topk(2).values.tolist(), abs=1e-4)
        assert e.top_logprobs[0].bytes == e.bytes
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    streamed = []
    for c in client.chat.completions.create(**body, stream=True):
        if c.choices and c.choices[0].logprobs:
            streamed += c.choices[0].logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    off = client.chat.completions.create(**{**body, "logprobs": False, "top_logprobs": None})
    assert off.choices[0].logprobs is None


def test_n_2_gives_the_seeds_seed_and_seed_plus_1(srv):
    client, _, name = srv
    base = dict(model=name, prompt=PROMPT, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    r = client.completions.create(**base, n=2, seed=21)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 16
    one = [client.completions.create(**base, seed=s).choices[0].text for s in (21, 22)]
    assert [c.text for c in r.choices] == one and one[0] != one[1]
    texts = {0: "", 1: ""}
    for c in client.completions.create(**base, n=2, seed=21, stream=True):
        texts[c.choices[0].index] += c.choices[0].text
    assert [texts[0], texts[1]] == one
    chat = dict(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=1.0,
                extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**chat, n=2, seed=5)
    alone = [client.chat.completions.create(**chat, seed=s).choices[0].message.content for s in (5, 6)]
    assert [c.message.content for c in r.choices] == alone and r.usage.completion_tokens == 10


def test_best_of_keeps_the_highest_mean_logprob(srv):
    client, _, name = srv
    base = dict(model=name, prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    runs = [client.completions.create(**base, seed=s, logprobs=0).choices[0] for s in (40, 41, 42)]
    means = [sum(c.logprobs.token_logprobs) / 6 for c in runs]
    r = client.completions.create(**base, seed=40, best_of=3)
    assert r.choices[0].text == runs[means.index(max(means))].text and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 18                               # every generated token is counted
    r = client.completions.create(**base, seed=40, best_of=3, n=2, logprobs=1)
    assert [c.text for c in r.choices] == [runs[i].text for i in sorted(range(3), key=lambda i: -means[i])[:2]]


def test_echo_greedy_epsilon_and_max_tokens_to_the_limit(srv):
    client, _, name = srv
    g = client.completions.create(model=name, prompt="Echo this", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    e = client.completions.create(model=name, prompt="Echo this", max_tokens=5, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True}).choices[0].text
    assert e == "Echo this" + g
    tiny = client.completions.create(model=name, prompt="Echo this", max_tokens=5, temperature=0.5e-5, seed=1,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert tiny == g                                                   # below 1e-5: greedy, as vLLM
    r = client.completions.create(model=name, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == MAX_LEN - len(PROMPT) and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == MAX_LEN
