"""dsv4rt's DeepSeek-V4 / V4.1 prompt encoder, checked on exact token ids through a tokenizer.json in the
released layout (tests/serve/conftest.py: control tokens at their released ids, text one id per byte,
byte b -> b + 3), and the choice of chat format by model_type and tokenizer.

Expected prompts are written out here as text; :func:`ids` turns such text into ids on its own (control
strings -> their released ids, everything else -> bytes + 3), independently of the encoder and of the
tokenizers library.
"""
import json
import re

import pytest

from v4_tokenizer import V41_IDS
from dsv4rt.errors import CheckpointError
from dsv4rt.model.tokenizer import ByteTokenizer, HFTokenizer
from dsv4rt.serve.chat import ChatOptions, ChatTemplate, MessageError, validate_messages
from dsv4rt.serve.encoding import DIALECTS, render

V4, V41 = DIALECTS["deepseek_v4"], DIALECTS["deepseek_v41"]
BOS, EOS, USER, ASSISTANT, THINK, END, DSML, SYSTEM = 0, 1, 128803, 128804, 128821, 128822, 128825, 128799
_CONTROL = re.compile("(" + "|".join(map(re.escape, sorted(V41_IDS, key=len, reverse=True))) + ")")


def b(text):
    """Ids of plain text: one per UTF-8 byte."""
    return [c + 3 for c in text.encode()]


def ids(text):
    """Ids of prompt text: control strings -> released ids, the rest -> bytes."""
    out = []
    for piece in _CONTROL.split(text):
        out += [V41_IDS[piece]] if piece in V41_IDS else b(piece)
    return out


@pytest.fixture(scope="module")
def tok(v41_tokenizer_json):
    return HFTokenizer(v41_tokenizer_json, 0, 1)


def encode(tok, dialect, messages, thinking=False, effort=None, tools=None, tool_choice="auto"):
    options = ChatOptions(tools, tool_choice, thinking, effort)
    return ChatTemplate(dialect=dialect).encode(validate_messages(messages), tok, options)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def tools_section(tags_block, tags_invoke, tags_param, schemas):
    """The released tools section, written out (V4: tool_calls/invoke/parameter; V4.1: with a space)."""
    o, i, p = f"<｜DSML｜{tags_block}>", f"<｜DSML｜{tags_invoke}", f"<｜DSML｜{tags_param}"
    return (
        "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools "
        f'by writing a "{o}" block like the following:\n\n{o}\n{i} name="$TOOL_NAME">\n'
        f'{p} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜{tags_param}>\n...\n'
        f'</｜DSML｜{tags_invoke}>\n{i} name="$TOOL_NAME2">\n...\n</｜DSML｜{tags_invoke}>\n</｜DSML｜{tags_block}>\n\n'
        'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
        'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
        "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
        "<think>...</think> BEFORE any tool calls or final response.\n\n"
        "Otherwise, output directly after </think> with tool calls or final response.\n\n"
        f"### Available Tool Schemas\n\n{schemas}\n\n"
        "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n")


WEATHER_SCHEMA = ('{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", '
                  '"properties": {"city": {"type": "string"}}}}')


# ---- V4 ----------------------------------------------------------------------------------------------

def test_v4_system_and_user(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert encode(tok, V4, msgs) == [BOS, *b("Be brief."), USER, *b("Hi"), ASSISTANT, END]
    assert encode(tok, V4, msgs, thinking=True) == [BOS, *b("Be brief."), USER, *b("Hi"), ASSISTANT, THINK]
    assert tok.decode(encode(tok, V4, msgs)) == "Be brief.Hi"          # skip_special_tokens drops them all


def test_v4_multi_turn_thinking_drops_earlier_reasoning(tok):
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "add them"},
            {"role": "user", "content": "and 3+3?"}]
    want = [BOS, USER, *b("2+2?"), ASSISTANT, END, *b("4"), EOS, USER, *b("and 3+3?"), ASSISTANT, THINK]
    assert encode(tok, V4, msgs, thinking=True) == want
    assert encode(tok, V4, msgs, thinking=False) == want[:-1] + [END]
    # vLLM's name for the field is taken as well; array content is joined with a blank line
    msgs[1] = {"role": "assistant", "content": [{"type": "text", "text": "4"}], "reasoning": "add them"}
    msgs[2]["content"] = [{"type": "text", "text": "and"}, {"type": "text", "text": "3+3?"}]
    assert encode(tok, V4, msgs, thinking=True) == [BOS, USER, *b("2+2?"), ASSISTANT, END, *b("4"), EOS,
                                                    USER, *b("and\n\n3+3?"), ASSISTANT, THINK]


def test_v4_tool_round_trip(tok):
    """Tools in the system prompt, the assistant's call in DSML with its reasoning kept (a conversation
    with tools keeps every turn's reasoning), the result as a <tool_result> user turn."""
    msgs = [{"role": "system", "content": "S"},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "reasoning_content": "need it", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "days": 2}'}}]},
            {"role": "tool", "tool_call_id": "c2", "content": "rain"},
            {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}]
    text = ("<｜begin▁of▁sentence｜>S\n\n" + tools_section("tool_calls", "invoke", "parameter", WEATHER_SCHEMA)
            + "<｜User｜>Weather?<｜Assistant｜><think>need it</think>\n\n<｜DSML｜tool_calls>\n"
            '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n"
            '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
            "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
            '<｜User｜><tool_result>{"temp": 21}</tool_result>\n\n<tool_result>rain</tool_result><｜Assistant｜><think>')
    assert render(V4, validate_messages(msgs), True, None, [WEATHER]) == text          # results in call order
    got = encode(tok, V4, msgs, thinking=True, tools=[WEATHER])
    assert got == ids(text) and got[:2] == [BOS, *b("S")] and got[-2:] == [ASSISTANT, THINK]
    assert got.count(DSML) == 9 + 12                                                   # section + block


def test_v4_tools_without_a_system_message_and_tool_choice(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    with_tools = render(V4, validate_messages(msgs), False, None, [WEATHER, TIME])
    assert with_tools.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n\n")         # an empty system message first
    assert with_tools.endswith("tool calls.\n<｜User｜>Hi<｜Assistant｜></think>")
    t = ChatTemplate(dialect=V4)
    m = validate_messages(msgs)
    assert t.render(m, ChatOptions([WEATHER, TIME], "none")) == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    named = t.render(m, ChatOptions([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}))
    assert '"name": "get_time"' in named and "get_weather" not in named
    assert t.render(m, ChatOptions([WEATHER, TIME], "required")) == with_tools
    assert t.prepare(m, tok, ChatOptions([WEATHER], "none")).parser.tags is None      # offered nothing: no DSML parse
    assert t.prepare(m, tok, ChatOptions([WEATHER])).parser.tags is V4.tags


def test_v4_reasoning_effort(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    prefix = ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your "
              "thinking and comprehensively decompose the problem to resolve the root cause, rigorously "
              "stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
              "Explicitly write out your entire deliberation process, documenting every intermediate step, "
              "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
              "unchecked.\n\n")
    assert encode(tok, V4, msgs, True, "max") == [BOS, *b(prefix), USER, *b("Hi"), ASSISTANT, THINK]
    for effort in (None, "low", "medium", "high", "xhigh"):
        assert encode(tok, V4, msgs, True, effort) == [BOS, USER, *b("Hi"), ASSISTANT, THINK]
    assert encode(tok, V4, msgs, False, "max") == [BOS, USER, *b("Hi"), ASSISTANT, END]    # chat mode: none
    for bad in (50, "extreme", True):
        with pytest.raises(MessageError) as ei:
            encode(tok, V4, msgs, True, bad)
        assert ei.value.param == "reasoning_effort" and "deepseek_v4" in str(ei.value)


# ---- V4.1 --------------------------------------------------------------------------------------------

def test_v41_system_token_and_numeric_effort(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert encode(tok, V41, msgs) == [BOS, SYSTEM, *b("Be brief."), USER, *b("Hi"), ASSISTANT, END]
    effort = "Reasoning Effort: {} (range 1-100, the higher the value, the more thorough the reasoning)\n\n"
    for value, budget in ((None, 50), ("low", 25), ("minimal", 25), ("medium", 50), ("high", 50), ("xhigh", 75),
                          ("max", 100), (1, 1), (88, 88), (100, 100)):
        assert encode(tok, V41, msgs, True, value) == \
            [BOS, SYSTEM, *b(effort.format(budget) + "Be brief."), USER, *b("Hi"), ASSISTANT, THINK], value
    # no system message: the effort still opens with <｜System｜>; chat mode has neither
    assert encode(tok, V41, msgs[1:], True) == [BOS, SYSTEM, *b(effort.format(50)), USER, *b("Hi"), ASSISTANT, THINK]
    assert encode(tok, V41, msgs[1:], False, 7) == [BOS, USER, *b("Hi"), ASSISTANT, END]
    for bad in (0, 101, -1, 1.5, True, "extreme"):
        with pytest.raises(MessageError) as ei:
            encode(tok, V41, msgs, False, bad)                      # checked in chat mode too, as the release does
        assert ei.value.param == "reasoning_effort"


def test_v41_mid_conversation_system_message(tok):
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"}, {"role": "system", "content": "mid"}]
    effort = "Reasoning Effort: 88 (range 1-100, the higher the value, the more thorough the reasoning)\n\n"
    assert encode(tok, V41, msgs, True, 88) == [BOS, SYSTEM, *b(effort + "sys"), USER, *b("q1"), ASSISTANT, END,
                                                *b("a1"), EOS, SYSTEM, *b("mid"), ASSISTANT, THINK]
    with pytest.raises(MessageError, match="last message"):          # V4: a later system message asks nothing
        encode(tok, V4, msgs, True)


def test_v41_tool_call_tags(tok):
    msgs = [{"role": "user", "content": "question"},
            {"role": "assistant", "reasoning_content": "  reason  ", "content": "summary", "tool_calls": [
                {"type": "function", "function": {"name": "lookup", "arguments": '{"query":"value","limit":2}'}}]},
            {"role": "tool", "content": "ok"}]
    text = render(V41, validate_messages(msgs), True, None, [WEATHER])
    # the assistant turn of the V4.1 release's own test, byte for byte
    assert ('<｜User｜>question<｜Assistant｜><think>  reason  </think>summary\n\n<｜DSML｜ calls>\n'
            '<｜DSML｜ invoke name="lookup">\n<｜DSML｜ parameter name="query" string="true">value</｜DSML｜ parameter>\n'
            '<｜DSML｜ parameter name="limit" string="false">2</｜DSML｜ parameter>\n</｜DSML｜ invoke>\n'
            '</｜DSML｜ calls><｜end▁of▁sentence｜><｜User｜><tool_result>ok</tool_result><｜Assistant｜><think>') in text
    assert text.startswith("<｜begin▁of▁sentence｜><｜System｜>Reasoning Effort: 50 (range 1-100, the higher the "
                           "value, the more thorough the reasoning)\n\n\n\n"
                           + tools_section(" calls", " invoke", " parameter", WEATHER_SCHEMA))
    assert encode(tok, V41, msgs, True, None, [WEATHER]) == ids(text)


# ---- both ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dialect", [V4, V41])
def test_the_conversation_must_end_asking(tok, dialect):
    with pytest.raises(MessageError, match="last message must be a user or tool message") as ei:
        encode(tok, dialect, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert ei.value.param == "messages"
    with pytest.raises(MessageError):
        encode(tok, dialect, [{"role": "system", "content": "only a system message"}])


def test_arguments_as_an_object_or_double_encoded():
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": {"x": [1, "é"]}}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": json.dumps('{"y": null}')}},
             {"id": "c", "type": "function", "function": {"name": "h", "arguments": "not json"}}]
    msgs = validate_messages([{"role": "user", "content": "u"}, {"role": "assistant", "content": "",
                                                                "tool_calls": calls}, {"role": "user", "content": "v"}])
    text = render(V4, msgs, False)
    assert '<｜DSML｜parameter name="x" string="false">[1, "é"]</｜DSML｜parameter>' in text
    assert '<｜DSML｜parameter name="y" string="false">null</｜DSML｜parameter>' in text
    assert '<｜DSML｜parameter name="arguments" string="true">not json</｜DSML｜parameter>' in text


# ---- choosing the format ---------------------------------------------------------------------------

def _ckpt(tmp_path, model_type, template=None):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if template is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template,
                                                                    "bos_token": "<｜begin▁of▁sentence｜>"}))
    return str(tmp_path)


def test_format_by_model_type_and_tokenizer(tmp_path, v4_tokenizer_json, v41_tokenizer_json):
    v4tok, v41tok = HFTokenizer(v4_tokenizer_json, 0, 1), HFTokenizer(v41_tokenizer_json, 0, 1)
    assert ChatTemplate.from_checkpoint(_ckpt(tmp_path, "deepseek_v4"), v4tok).kind == "deepseek_v4"
    assert ChatTemplate.from_checkpoint(_ckpt(tmp_path, "deepseek_v41"), v41tok).kind == "deepseek_v41"
    assert ChatTemplate.from_checkpoint(None, v4tok).kind == "deepseek_v4"        # the presets are V4
    assert ChatTemplate.from_checkpoint(None, ByteTokenizer()).kind == "fallback"  # bytes cannot carry the format
    assert ChatTemplate.from_checkpoint(_ckpt(tmp_path, "llama"), v4tok).kind == "fallback"
    with pytest.raises(CheckpointError, match="no single token for <｜System｜>.*deepseek_v41"):
        ChatTemplate.from_checkpoint(_ckpt(tmp_path, "deepseek_v41"), v4tok)


def test_a_checkpoint_template_wins_and_is_still_parsed(tmp_path, v4_tokenizer_json):
    tpl = ("{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}"
           "<｜Assistant｜>{% if thinking %}<think>{% else %}</think>{% endif %}"
           "{% if tools %}[{{ tools | length }} tools]{% endif %}")
    t = ChatTemplate.from_checkpoint(_ckpt(tmp_path, "deepseek_v4", tpl), HFTokenizer(v4_tokenizer_json, 0, 1))
    assert t.kind == "jinja" and t.dialect is V4
    m = validate_messages([{"role": "user", "content": "Hi"}])
    tok = HFTokenizer(v4_tokenizer_json, 0, 1)
    p = t.prepare(m, tok, ChatOptions(template_kwargs={"thinking": True}))
    assert p.ids == [BOS, USER, *b("Hi"), ASSISTANT, THINK] and p.parser.state == "reasoning"
    p = t.prepare(m, tok, ChatOptions([WEATHER]))
    assert p.ids[-len(b("[1 tools]")):] == b("[1 tools]") and p.parser.state == "content"


def test_fallback_refuses_tools():
    with pytest.raises(MessageError) as ei:
        ChatTemplate().render(validate_messages([{"role": "user", "content": "Hi"}]), ChatOptions([WEATHER]))
    assert ei.value.param == "tools" and "fallback" in str(ei.value)
    hi = validate_messages([{"role": "user", "content": "Hi"}])
    assert ChatTemplate().prepare(hi, ByteTokenizer()).parser is None
