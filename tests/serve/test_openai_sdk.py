"""The official ``openai`` SDK against ``dsv4rt serve`` over loopback HTTP, on a tiny-shaped model with V4's
129,280-id vocabulary and a tokenizer.json in the released layout (passed with ``--tokenizer``): chat with
thinking off and on, and a tool call round trip, JSON and streamed.

The model is the real one, with one twist: :class:`Scripted` overwrites the logits at a sequence's
generated positions with a one-hot of a scripted completion (chosen by the text of the prompt's last
user turn), so the completion is known: random weights never write ``</think>`` or DSML. Prompts with no
script keep the random model's own tokens. Every prompt the model saw is recorded, so the tests check
the exact ids the server's encoder produced, including the round trip's second prompt.
"""
import json

import pytest

openai = pytest.importorskip("openai", reason="the SDK tests need the openai package (pip install 'dsv4rt[dev]')")
pytest.importorskip("starlette", reason="dsv4rt serve needs starlette (pip install 'dsv4rt[serve]')")
pytest.importorskip("uvicorn", reason="dsv4rt serve needs uvicorn (pip install 'dsv4rt[serve]')")

from dsv4rt.serve.app import BackgroundServer, build_app  # noqa: E402
from dsv4rt.serve.cli import ServeOptions, build_server  # noqa: E402
from dsv4rt.serve.engine import Engine  # noqa: E402

BOS, EOS, USER, ASSISTANT, THINK, END = 0, 1, 128803, 128804, 128821, 128822

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
SCRIPTS = {
    "What is 2+2?": "Four.",
    "Think: 3+3?": "Add three to three.</think>Six.",
    # V4 at times opens a tool call without closing its reasoning first: no </think> here
    "Weather in Paris?": "The user wants the weather.\n\n" + CALL,
    '<tool_result>{"temp": 21}</tool_result>': "It is warm.</think>It is 21 degrees in Paris.",
}


def b(text):
    return [c + 3 for c in text.encode()]


class Scripted:
    """The model, whose logits follow ``scripts`` (last user turn -> completion text) once a prompt is in."""

    def __init__(self, model, tok, scripts):
        self.model, self.tok = model, tok
        self.scripts = {key: tok.encode(text)[1:] + [EOS] for key, text in scripts.items()}
        self.history, self.prompts = {}, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_ragged(self, tokens, caches):
        logits = self.model.forward_ragged(tokens, caches)
        for row, (t, cache) in enumerate(zip(tokens, caches)):
            t = t.tolist()
            seen = self.history.setdefault(id(cache), [])
            if t[0] == BOS:                        # a new request in this KV slot
                seen.clear()
            seen.extend(t)
            if ASSISTANT not in seen:
                continue
            head = len(seen) - seen[::-1].index(ASSISTANT)     # just past the last <｜Assistant｜>
            prompt, done = seen[:head + 1], len(seen) - head - 1
            user = self.tok.decode(prompt[len(prompt) - prompt[::-1].index(USER):], skip_special_tokens=False)
            script = next((s for key, s in self.scripts.items() if key in user), None)
            if script is None:
                continue
            if done == 0:
                self.prompts.append(prompt)
            logits[row] = float("-inf")
            logits[row, script[done] if done < len(script) else EOS] = 0.0
        return logits


@pytest.fixture(scope="module")
def server(v4_vocab_checkpoint, v4_tokenizer_json):
    served = build_server(ServeOptions(checkpoint=v4_vocab_checkpoint, tokenizer=v4_tokenizer_json, backend="cpu",
                                       dtype="fp32", max_seqs=2, max_seq_len=4096))
    assert served.template.kind == "deepseek_v4"
    model = Scripted(served.engine.model, served.engine.tokenizer, SCRIPTS)
    engine = Engine(model, served.engine.tokenizer, served.engine.pool, backend="cpu").start()
    http = BackgroundServer(build_app(engine, served.model_name, None, served.template))
    client = openai.OpenAI(base_url=http.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        yield client, model, served.model_name
    finally:
        http.stop()
        engine.stop()


def test_chat_without_thinking(server):
    client, model, name = server
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is 2+2?"}],
                                       temperature=0, max_tokens=20)
    msg = r.choices[0].message
    assert (msg.content, msg.reasoning_content, msg.tool_calls) == ("Four.", None, None)
    assert r.choices[0].finish_reason == "stop"
    assert model.prompts[-1] == [BOS, USER, *b("What is 2+2?"), ASSISTANT, END]
    assert r.usage.prompt_tokens == len(model.prompts[-1]) and r.usage.completion_tokens == len(b("Four.")) + 1


def test_chat_with_thinking_json_and_stream(server):
    client, model, name = server
    body = dict(model=name, messages=[{"role": "user", "content": "Think: 3+3?"}], temperature=0, max_tokens=40,
                extra_body={"chat_template_kwargs": {"thinking": True}})
    msg = client.chat.completions.create(**body).choices[0].message
    assert (msg.reasoning_content, msg.content) == ("Add three to three.", "Six.")
    assert model.prompts[-1] == [BOS, USER, *b("Think: 3+3?"), ASSISTANT, THINK]
    reasoning, content, finish = "", "", None
    for chunk in client.chat.completions.create(**body, stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, finish) == ("Add three to three.", "Six.", "stop")
    # reasoning_effort alone asks for thinking too; "none" turns it off
    client.chat.completions.create(**{**body, "extra_body": None}, reasoning_effort="high")
    assert model.prompts[-1][-1] == THINK
    client.chat.completions.create(**body, reasoning_effort="none")
    assert model.prompts[-1][-1] == END


def test_refusals_reach_the_sdk(server):
    client, _, name = server
    hi = [{"role": "user", "content": "Hi"}]
    for kwargs, param in [(dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                           "tool_choice"),
                          (dict(reasoning_effort=50), "reasoning_effort"),         # numeric effort is V4.1's
                          (dict(messages=hi + [{"role": "assistant", "content": "Hello"}]), "messages")]:
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(**{"model": name, "messages": hi, "max_tokens": 2, **kwargs})
        assert ei.value.body["param"] == param, kwargs


def test_random_weights_in_both_modes(server):
    """No script: the random model's own tokens go through decoding and the parser without breaking."""
    client, _, name = server
    for thinking in (False, True):
        extra = {"ignore_eos": True, "chat_template_kwargs": {"thinking": thinking}}
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Say anything"}],
                                           max_tokens=6, temperature=0, extra_body=extra)
        msg = r.choices[0].message
        assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
        assert (msg.reasoning_content is not None) == thinking
        assert isinstance(msg.content, str)


def test_tool_call_round_trip(server):
    client, model, name = server
    messages = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"}]
    body = dict(model=name, tools=[WEATHER], temperature=0, max_tokens=200,
                extra_body={"chat_template_kwargs": {"thinking": True}})
    r = client.chat.completions.create(messages=messages, **body)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    msg = choice.message
    assert msg.content is None and msg.reasoning_content == "The user wants the weather."
    (call,) = msg.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    first = model.prompts[-1]
    assert first[:len(b("You help.\n\n## Tools")) + 1] == [BOS, *b("You help.\n\n## Tools")]
    assert first[-len(b("Weather in Paris?")) - 3:] == [USER, *b("Weather in Paris?"), ASSISTANT, THINK]

    # the same call, streamed: the name first, then argument pieces that add up
    calls, finish, reasoning = {}, None, ""
    for chunk in client.chat.completions.create(messages=messages, stream=True, **body):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for tc in delta.tool_calls or []:
            got = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            got["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and reasoning == "The user wants the weather."
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}

    # round trip: the call and its result go back; the reasoning of the call's turn stays (tools present)
    messages += [msg.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r2 = client.chat.completions.create(messages=messages, **body)
    msg2 = r2.choices[0].message
    assert (msg2.reasoning_content, msg2.content, msg2.tool_calls) == ("It is warm.", "It is 21 degrees in Paris.",
                                                                      None)
    assert r2.choices[0].finish_reason == "stop"
    turn = ("<｜Assistant｜><think>The user wants the weather.</think>\n\n" + CALL
            + '<｜end▁of▁sentence｜><｜User｜><tool_result>{"temp": 21}</tool_result><｜Assistant｜><think>')
    second = model.prompts[-1]
    assert second[:len(first) - 1] == first[:-1]                  # the first prompt, up to its <think>
    assert model.tok.decode(second[len(first) - 2:], skip_special_tokens=False) == turn
    assert second[len(first) - 2:] == model.tok.encode(turn)[1:]
