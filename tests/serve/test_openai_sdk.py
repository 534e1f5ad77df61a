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

from dsv4rt.serve.cli import ServeOptions  # noqa: E402
from sdk_server import sdk_client  # noqa: E402

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
    opts = ServeOptions(checkpoint=v4_vocab_checkpoint, tokenizer=v4_tokenizer_json, backend="cpu", dtype="fp32",
                        max_seqs=2, max_seq_len=4096)
    with sdk_client(opts, lambda model, tok: Scripted(model, tok, SCRIPTS), timeout=300) as (client, model, name,
                                                                                           served):
        assert served.template.kind == "deepseek_v4"
        yield client, model, name


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


def test_logprobs_and_n_through_the_chat_parser(server):
    client, model, name = server
    body = dict(model=name, messages=[{"role": "user", "content": "Think: 3+3?"}], temperature=0, max_tokens=40,
                extra_body={"chat_template_kwargs": {"thinking": True}})
    r = client.chat.completions.create(**body, n=2, logprobs=True, top_logprobs=2)
    per_choice = len(b("Add three to three.")) + 1 + len(b("Six.")) + 1         # + </think> and EOS
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 2 * per_choice
    for c in r.choices:
        assert (c.message.reasoning_content, c.message.content, c.finish_reason) == ("Add three to three.", "Six.",
                                                                                      "stop")
        content = c.logprobs.content
        # every generated token, reasoning and control tokens included; the script gives each all the mass
        assert "".join(e.token for e in content) == "Add three to three.</think>Six.<｜end▁of▁sentence｜>"
        assert all(e.logprob == 0.0 and [t.logprob for t in e.top_logprobs] == [0.0, -9999.0] for e in content)
        assert bytes(x for e in content for x in e.bytes).decode() == "".join(e.token for e in content)
    got = {0: ["", ""], 1: ["", ""]}
    lps = {0: [], 1: []}
    for chunk in client.chat.completions.create(**body, n=2, logprobs=True, stream=True):
        ch = chunk.choices[0]
        got[ch.index][0] += getattr(ch.delta, "reasoning_content", None) or ""
        got[ch.index][1] += ch.delta.content or ""
        lps[ch.index] += [e.token for e in (ch.logprobs.content if ch.logprobs else [])]
    assert got == {0: ["Add three to three.", "Six."], 1: ["Add three to three.", "Six."]}
    assert lps[0] == lps[1] == [e.token for e in r.choices[0].logprobs.content]


# --- every parameter of the SDK's request types works or is refused with a 400 naming it -------------------

def _sdk_names(module):
    names = set()
    for cls in (module.CompletionCreateParamsNonStreaming, module.CompletionCreateParamsStreaming):
        names |= set(cls.__required_keys__) | set(cls.__optional_keys__)
    return names


HI = [{"role": "user", "content": "What is 2+2?"}]
# name -> [(extra fields, None for 200 or the param the 400 names)]; the cases' bodies carry what they need
CHAT_CASES = {
    "messages": [({}, None)], "model": [({}, None)], "max_tokens": [({"max_tokens": 2}, None)],
    "max_completion_tokens": [({"max_completion_tokens": 2}, None)], "temperature": [({"temperature": 0.5}, None)],
    "top_p": [({"top_p": 0.5}, None)], "n": [({"n": 2}, None)], "seed": [({"seed": 7}, None)],
    "stop": [({"stop": ["x"]}, None)], "stream": [({"stream": True}, None)],
    "stream_options": [({"stream": True, "stream_options": {"include_usage": True}}, None),
                       ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options")],
    "presence_penalty": [({"presence_penalty": 1.0}, None), ({"presence_penalty": 5.0}, "presence_penalty")],
    "frequency_penalty": [({"frequency_penalty": 1.0}, None), ({"frequency_penalty": 5.0}, "frequency_penalty")],
    "logit_bias": [({"logit_bias": {"70": 5}}, None), ({"logit_bias": {"999999": 5}}, "logit_bias")],
    "logprobs": [({"logprobs": True}, None)], "top_logprobs": [({"logprobs": True, "top_logprobs": 3}, None)],
    "tools": [({"tools": [WEATHER]}, None)], "tool_choice": [({"tools": [WEATHER], "tool_choice": "required"}, None)],
    "reasoning_effort": [({"reasoning_effort": "high"}, None)],
    "parallel_tool_calls": [({"tools": [WEATHER], "parallel_tool_calls": True}, None),
                            ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls")],
    "response_format": [({"response_format": {"type": "text"}}, None),
                        ({"response_format": {"type": "json_object"}}, "response_format")],
    "store": [({"store": False}, None), ({"store": True}, "store")],
    "service_tier": [({"service_tier": "default"}, None), ({"service_tier": "priority"}, "service_tier")],
    "modalities": [({"modalities": ["text"]}, None), ({"modalities": ["text", "audio"]}, "modalities")],
    "verbosity": [({"verbosity": "medium"}, None), ({"verbosity": "high"}, "verbosity")],
    "user": [({"user": "u-1"}, None)], "safety_identifier": [({"safety_identifier": "h"}, None)],
    "metadata": [({"metadata": {"k": "v"}}, None)], "prompt_cache_key": [({"prompt_cache_key": "k"}, None)],
    "audio": [({"audio": {"voice": "alloy", "format": "wav"}}, "audio")],
    "function_call": [({"function_call": "auto"}, "function_call")],
    "functions": [({"functions": [WEATHER["function"]]}, "functions")],
    "moderation": [({"moderation": {"model": "omni-moderation-latest"}}, "moderation")],
    "prediction": [({"prediction": {"type": "content", "content": "Four."}}, "prediction")],
    "prompt_cache_options": [({"prompt_cache_options": {"ttl": "1h"}}, "prompt_cache_options")],
    "prompt_cache_retention": [({"prompt_cache_retention": "24h"}, "prompt_cache_retention")],
    "web_search_options": [({"web_search_options": {}}, "web_search_options")],
}
COMPLETION_CASES = {
    "prompt": [({}, None), ({"prompt": ["a", "b"]}, None)], "model": [({}, None)],
    "max_tokens": [({"max_tokens": 2}, None)],
    "temperature": [({"temperature": 0.5}, None)], "top_p": [({"top_p": 0.5}, None)], "n": [({"n": 2}, None)],
    "best_of": [({"best_of": 2}, None)], "echo": [({"echo": True}, None)], "seed": [({"seed": 7}, None)],
    "stop": [({"stop": "x"}, None)], "stream": [({"stream": True}, None)],
    "stream_options": [({"stream": True, "stream_options": {"include_usage": True}}, None)],
    "presence_penalty": [({"presence_penalty": -1.0}, None), ({"presence_penalty": 5.0}, "presence_penalty")],
    "frequency_penalty": [({"frequency_penalty": 1.0}, None), ({"frequency_penalty": -5.0}, "frequency_penalty")],
    "logit_bias": [({"logit_bias": {"70": -5}}, None)], "logprobs": [({"logprobs": 5}, None)],
    "user": [({"user": "u-1"}, None)], "suffix": [({"suffix": " end"}, "suffix")],
}


def _check_case(http, path, body, param):
    r = http.post(path, json=body)
    if param is None:
        assert r.status_code == 200, (body, r.text)
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.status_code, r.text)


def test_every_sdk_parameter_works_or_is_refused_by_name(server):
    """The names come from the installed SDK's request types, so a parameter a new SDK adds is either listed
    above with what it does, or must get a 400 naming it (the server refuses names it does not know)."""
    import httpx
    from openai.types import completion_create_params as completion_params
    from openai.types.chat import completion_create_params as chat_params

    from dsv4rt.serve import params

    client, _, name = server
    with httpx.Client(base_url=str(client.base_url), timeout=300) as http:
        for path, module, cases, base, accepted in [
                ("chat/completions", chat_params, CHAT_CASES, {"model": name, "messages": HI, "max_tokens": 2},
                 params.CHAT | set(params.LABELS["chat"]) | set(params.DEFAULT_ONLY["chat"])),
                ("completions", completion_params, COMPLETION_CASES, {"model": name, "prompt": "2+2=", "max_tokens": 2},
                 params.COMPLETION | set(params.LABELS["completions"]))]:
            sdk = _sdk_names(module)
            assert {"model", "temperature", "logprobs"} <= sdk                      # the SDK's types were read
            for field in sorted(sdk):
                for extra, param in cases.get(field, [({field: "unlisted"}, field)]):
                    _check_case(http, path, {**base, **extra}, param)
            # every SDK parameter the server accepts has a case that shows it accepted
            assert {f for f in sdk & accepted if not any(p is None for _, p in cases.get(f, []))} == set()
