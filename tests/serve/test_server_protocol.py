"""Request validation into typed parameters, and the chat template, without HTTP."""
import json

import pytest

from dsv4rt.model.tokenizer import ByteTokenizer
from dsv4rt.serve.chat import ChatTemplate, MessageError, fallback_render, validate_messages
from dsv4rt.serve.protocol import ApiError, parse_chat, parse_completion

M, V = "m", 259


def test_completion_defaults_and_fields():
    r = parse_completion({"prompt": "hi", "user": "ignored", "frequency_penalty": 0, "logit_bias": {}}, M, V)
    assert r.prompt == "hi" and not r.stream and not r.include_usage
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (16, 1.0, 1.0, -1, None, ())
    r = parse_completion({"model": M, "prompt": [0, 5, 6], "max_tokens": 3, "temperature": 0, "top_p": 0.5,
                          "top_k": 4, "n": 1, "stream": True, "stop": ["a", "bc"], "seed": 7, "echo": False,
                          "stream_options": {"include_usage": True}, "ignore_eos": True}, M, V)
    assert r.prompt == [0, 5, 6] and r.stream and r.include_usage
    assert (r.params.max_tokens, r.params.temperature, r.params.top_p, r.params.top_k, r.params.seed,
            r.params.stop, r.params.ignore_eos) == (3, 0.0, 0.5, 4, 7, ("a", "bc"), True)
    assert parse_completion({"prompt": "x", "stop": "s", "max_tokens": None}, M, V).params.stop == ("s",)
    assert parse_completion({"prompt": ["one"]}, M, V).prompt == "one"
    assert parse_completion({"prompt": "x", "top_k": 0}, M, V).params.top_k == 0


@pytest.mark.parametrize("body,status,param", [
    ([1, 2], 400, None),
    ({}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2.5]}, 400, "prompt"),
    ({"prompt": [1, 259]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
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
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "stop": ["a", 1]}, 400, "stop"),
    ({"prompt": "x", "seed": "s"}, 400, "seed"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "stream_options": []}, 400, "stream_options"),
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
