"""Request validation into typed parameters, and the chat template, without HTTP."""
import json

import pytest

from dsv4rt.model.tokenizer import ByteTokenizer
from dsv4rt.serve.chat import ChatTemplate, MessageError, fallback_render, validate_messages
from dsv4rt.serve.protocol import MAX_DEPTH, ApiError, parse_chat, parse_completion, parse_json
from dsv4rt.serve.sampling import SamplingParams

M, V = "m", 259


def test_completion_defaults_and_fields():
    r = parse_completion({"prompt": "hi", "user": "u", "frequency_penalty": 0, "logit_bias": {}}, M, V)
    assert r.prompts == ["hi"] and not r.stream and not r.include_usage and (r.n, r.best_of, r.echo) == (1, 1, False)
    p = r.params
    assert p == SamplingParams()                     # max_tokens None: up to the context limit
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.logprobs) == (
        None, 1.0, 1.0, -1, None, (), None)
    r = parse_completion({"model": M, "prompt": [0, 5, 6], "max_tokens": 3, "temperature": 0, "top_p": 0.5,
                          "top_k": 4, "n": 2, "best_of": 3, "stop": ["a", "bc"], "seed": -7, "echo": True,
                          "ignore_eos": True, "presence_penalty": -2, "frequency_penalty": 1.5,
                          "repetition_penalty": 1.2, "logit_bias": {"5": -100, "258": 2.5}}, M, V)
    assert r.prompts == [[0, 5, 6]] and (r.n, r.best_of, r.echo) == (2, 3, True)
    q = r.params
    assert (q.max_tokens, q.temperature, q.top_p, q.top_k, q.seed, q.stop, q.ignore_eos) == (
        3, 0.0, 0.5, 4, -7, ("a", "bc"), True)
    assert (q.presence_penalty, q.frequency_penalty, q.repetition_penalty, q.logit_bias) == (
        -2.0, 1.5, 1.2, ((5, -100.0), (258, 2.5)))
    r = parse_completion({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0},
                         M, V)
    assert r.stream and r.include_usage and r.params.logprobs == 0
    assert parse_completion({"prompt": "x", "stop": "s", "max_tokens": None}, M, V).params.stop == ("s",)
    assert parse_completion({"prompt": ["one"]}, M, V).prompts == ["one"]
    assert parse_completion({"prompt": ["a", [0, 7], "b"]}, M, V).prompts == ["a", [0, 7], "b"]
    assert parse_completion({"prompt": "x", "top_k": 0}, M, V).params.top_k == 0
    assert parse_completion({"prompt": "x", "top_k": 2 ** 31 - 1}, M, V).params.top_k == 2 ** 31 - 1
    assert parse_completion({"prompt": "x", "seed": 2 ** 63 - 1}, M, V).params.seed == 2 ** 63 - 1
    assert parse_completion({"prompt": "x", "seed": -2 ** 63}, M, V).params.seed == -2 ** 63
    assert parse_completion({"prompt": "x", "temperature": 0.5e-5}, M, V).params.greedy       # below 1e-5
    assert not parse_completion({"prompt": "x", "temperature": 1e-5}, M, V).params.greedy
    assert parse_completion({"prompt": "x", "suffix": None, "best_of": None}, M, V).best_of == 1   # null: not given


@pytest.mark.parametrize("body,status,param", [
    ([1, 2], 400, None),
    ({}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2.5]}, 400, "prompt"),
    ({"prompt": [1, 259]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": ["a", 5]}, 400, "prompt"),
    ({"prompt": [[0, 1], []]}, 400, "prompt"),
    ({"prompt": [[0, 300]]}, 400, "prompt"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
    ({"prompt": "x", "model": 3}, 400, "model"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_k": -2}, 400, "top_k"),
    ({"prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ({"prompt": "x", "top_p": float("inf")}, 400, "top_p"),
    ({"prompt": "x", "top_k": 2 ** 31}, 400, "top_k"),
    ({"prompt": "x", "top_k": 9223372036854775808}, 400, "top_k"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 129}, 400, "n"),
    ({"prompt": ["a"] * 65, "n": 2}, 400, "n"),
    ({"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of"),
    ({"prompt": "x", "best_of": 2, "stream": True}, 400, "best_of"),
    ({"prompt": "x", "best_of": 0}, 400, "best_of"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "stop": ["a", 1]}, 400, "stop"),
    ({"prompt": "x", "stop": ["s"] * 17}, 400, "stop"),
    ({"prompt": "x", "seed": "s"}, 400, "seed"),
    ({"prompt": "x", "seed": 2 ** 63}, 400, "seed"),
    ({"prompt": "x", "seed": -2 ** 63 - 1}, 400, "seed"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"prompt": "x", "stream_options": []}, 400, "stream_options"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),    # without stream
    ({"prompt": "x", "stream": True, "stream_options": {"include_obfuscation": True}}, 400, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"continuous": True}}, 400, "stream_options"),
    ({"prompt": "x", "presence_penalty": 5.0}, 400, "presence_penalty"),
    ({"prompt": "x", "presence_penalty": -2.1}, 400, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": 5.0}, 400, "frequency_penalty"),
    ({"prompt": "x", "frequency_penalty": "a"}, 400, "frequency_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "repetition_penalty": 2.5}, 400, "repetition_penalty"),
    ({"prompt": "x", "logit_bias": {"259": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": "up"}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": [5]}, 400, "logit_bias"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "suffix": "tail"}, 400, "suffix"),
    ({"prompt": "x", "user": 5}, 400, "user"),
    ({"prompt": "x", "tools": []}, 400, "tools"),                   # a chat field
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "x", "frobnicate": None}, 400, "frobnicate"),
])
def test_completion_refusals(body, status, param):
    with pytest.raises(ApiError) as ei:
        parse_completion(body, M, V)
    e = ei.value
    assert (e.status, e.param) == (status, param)
    b = e.body()["error"]
    assert set(b) == {"message", "type", "param", "code"} and b["type"] == "invalid_request_error" and b["message"]
    json.dumps(e.body())


def test_chat_fields_and_refusals():
    r = parse_chat({"messages": [{"role": "system", "content": "s"},
                                 {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                                 {"role": "assistant", "content": None}], "max_completion_tokens": 5}, M)
    assert r.messages == [{"role": "system", "content": "s"},
                          {"role": "user", "content": "a\nb", "parts": ["a", "b"]},
                          {"role": "assistant", "content": ""}]
    assert r.params.max_tokens == 5
    assert parse_chat({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}, M).params.max_tokens == 4
    for body, param in [({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
                        ({"messages": ["hi"]}, "messages[0]"),
                        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
                        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
                         "max_completion_tokens")]:
        with pytest.raises(ApiError) as ei:
            parse_chat(body, M)
        assert ei.value.status == 400 and ei.value.param == param, body


TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
HI = [{"role": "user", "content": "hi"}]


def test_chat_options():
    o = parse_chat({"messages": HI}, M).options
    assert (o.tools, o.tool_choice, o.thinking, o.reasoning_effort, o.template_kwargs) == (None, "auto", False, None, {})
    o = parse_chat({"messages": HI, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}},
                    "chat_template_kwargs": {"enable_thinking": True, "x": 1}}, M).options
    assert o.tools == [TOOL] and o.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert o.thinking and o.template_kwargs == {"enable_thinking": True, "x": 1} and o.offered_tools() == [TOOL]
    assert parse_chat({"messages": HI, "reasoning_effort": "high"}, M).options.thinking      # effort implies it
    assert parse_chat({"messages": HI, "reasoning_effort": 30}, M).options.reasoning_effort == 30
    assert not parse_chat({"messages": HI, "reasoning_effort": "high",
                           "chat_template_kwargs": {"thinking": False}}, M).options.thinking
    assert not parse_chat({"messages": HI, "reasoning_effort": "none",
                           "chat_template_kwargs": {"thinking": True}}, M).options.thinking
    assert parse_chat({"messages": HI, "tools": [TOOL], "tool_choice": "none"}, M).options.offered_tools() is None
    assert parse_chat({"messages": HI}, M).params.skip_special_tokens
    assert not parse_completion({"prompt": "x", "skip_special_tokens": False}, M, V).params.skip_special_tokens
    for body, param in [({"tools": {}}, "tools"), ({"tools": [{"type": "function"}]}, "tools[0]"),
                        ({"tools": [{"function": {"name": "f", "parameters": []}}]}, "tools[0].function"),
                        ({"tool_choice": "required"}, "tool_choice"), ({"tool_choice": "sometimes"}, "tool_choice"),
                        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
                         "tool_choice"),
                        ({"reasoning_effort": 1.5}, "reasoning_effort"),
                        ({"chat_template_kwargs": []}, "chat_template_kwargs"),
                        ({"chat_template_kwargs": {"thinking": "yes"}}, "chat_template_kwargs")]:
        with pytest.raises(ApiError) as ei:
            parse_chat({"messages": HI, **body}, M)
        assert ei.value.status == 400 and ei.value.param == param, body


def test_chat_message_fields():
    msgs = validate_messages([
        {"role": "assistant", "content": None, "reasoning_content": "r", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}])
    assert msgs == [{"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"}]
    for m, param in [({"role": "assistant", "tool_calls": {}}, "messages[0].tool_calls"),
                     ({"role": "assistant", "tool_calls": [{"function": {}}]}, "messages[0].tool_calls[0]"),
                     ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]},
                      "messages[0].tool_calls[0].function.arguments"),
                     ({"role": "assistant", "reasoning_content": 1}, "messages[0].reasoning_content"),
                     ({"role": "tool", "tool_call_id": 5}, "messages[0].tool_call_id")]:
        with pytest.raises(MessageError) as ei:
            validate_messages([m])
        assert ei.value.param == param, m


def test_chat_fallback_template():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert fallback_render(msgs) == ChatTemplate().render(msgs) == text
    tok = ByteTokenizer()
    assert ChatTemplate().encode(msgs, tok) == tok.encode(text)


def test_chat_jinja_template_from_the_checkpoint(tmp_path):
    tpl = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
           "{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tpl, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    ct = ChatTemplate.from_checkpoint(str(tmp_path))
    assert ct.kind == "jinja"
    msgs = validate_messages([{"role": "user", "content": "hello"}])
    assert ct.render(msgs) == "<s>[user] hello</s>[assistant] "
    tok = ByteTokenizer()
    assert ct.encode(msgs, tok) == tok.encode("[user] hello</s>[assistant] ")     # one BOS, from the tokenizer
    assert ChatTemplate.from_checkpoint(None).kind == "fallback"


def test_chat_template_raise_exception_is_a_message_error():
    ct = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    with pytest.raises(MessageError, match="user first"):
        ct.render([{"role": "assistant", "content": "a"}])


def test_chat_sampling_fields():
    r = parse_chat({"messages": HI, "logprobs": True, "top_logprobs": 3, "n": 2, "seed": 1,
                    "presence_penalty": 0.5, "logit_bias": {"7": 1}}, M, V)
    assert (r.params.logprobs, r.n, r.params.seed, r.params.presence_penalty, r.params.logit_bias) == (
        3, 2, 1, 0.5, ((7, 1.0),))
    assert parse_chat({"messages": HI, "logprobs": True}, M).params.logprobs == 0
    assert parse_chat({"messages": HI, "logprobs": False}, M).params.logprobs is None
    assert parse_chat({"messages": HI}, M).params.max_tokens is None
    # the values that ask for what the server does anyway, and the labels
    ok = {"response_format": {"type": "text"}, "parallel_tool_calls": True, "store": False, "service_tier": "auto",
          "modalities": ["text"], "verbosity": "medium", "user": "u", "safety_identifier": "s",
          "prompt_cache_key": "k", "metadata": {"a": "b"}, "audio": None, "functions": None}
    parse_chat({"messages": HI, **ok}, M)
    for body, param in [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"logprobs": 1}, "logprobs"), ({"n": 0}, "n"), ({"best_of": 2}, "best_of"),
                        ({"echo": True}, "echo"), ({"prompt": "x"}, "prompt"), ({"suffix": "x"}, "suffix"),
                        ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"parallel_tool_calls": False}, "parallel_tool_calls"), ({"store": True}, "store"),
                        ({"service_tier": "flex"}, "service_tier"), ({"modalities": ["text", "audio"]}, "modalities"),
                        ({"verbosity": "low"}, "verbosity"), ({"audio": {"voice": "alloy"}}, "audio"),
                        ({"functions": [{"name": "f"}]}, "functions"), ({"function_call": "auto"}, "function_call"),
                        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
                        ({"web_search_options": {}}, "web_search_options"), ({"metadata": "m"}, "metadata"),
                        ({"logit_bias": {"259": 1}}, "logit_bias"), ({"seed": 2 ** 64}, "seed")]:
        with pytest.raises(ApiError) as ei:
            parse_chat({"messages": HI, **body}, M, V)
        assert ei.value.status == 400 and ei.value.param == param, body


def test_parse_json_refuses_what_is_not_plain_json():
    assert parse_json(b'{"a": [1, "x"]}') == {"a": [1, "x"]}
    deep_ok = b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    parse_json(deep_ok)
    for raw, param in [(b"{", None), (b'{"t": NaN}', None), (b'{"t": Infinity}', None), (b'{"t": -Infinity}', None),
                       (b"[" * 100_000 + b"]" * 100_000, None),
                       (b'{"a": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}", "a"),
                       (b'{"prompt": "ok \\ud800"}', "prompt"),
                       (b'{"messages": [{"role": "user", "content": "\\udfff x"}]}', "messages[0].content"),
                       (b'{"\\ud800": 1}', None), (b"\xff\xfe", None)]:
        with pytest.raises(ApiError) as ei:
            parse_json(raw)
        assert ei.value.status == 400 and ei.value.param == param, raw[:40]
