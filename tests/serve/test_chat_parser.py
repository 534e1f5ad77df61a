"""The completion parser of the DeepSeek-V4 chat format: reasoning / content split, DSML tool calls, the
V4 trap of a tool call with no ``</think>`` before it, and streaming: every way of cutting the text into
pieces (tags split anywhere) gives the same message and deltas that add up to it."""
import json

import pytest

from dsv4rt.serve.encoding import OutputParser
from dsv4rt.serve.encoding.dsml import V4_TAGS, V41_TAGS


def ids():
    n = iter(range(100))
    return lambda: f"call_{next(n)}"


def parse(text, tags=V4_TAGS, thinking=True, pieces=None):
    """(parser after the whole text, the deltas), feeding ``pieces`` (default: the text at once)."""
    p = OutputParser(tags, thinking, ids())
    deltas = []
    for piece in pieces or [text]:
        deltas += p.feed(piece)
    deltas += p.finish()
    return p, deltas


def merged(deltas):
    """What a client rebuilds from the deltas: (reasoning, content, [(id, name, arguments)])."""
    reasoning, content, calls = "", "", {}
    for d in deltas:
        assert len(d) == 1, d
        reasoning += d.get("reasoning_content", "")
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], ["", "", ""])
            if "id" in tc:
                assert call == ["", "", ""] and tc["type"] == "function"
                call[0], call[1] = tc["id"], tc["function"]["name"]
            call[2] += tc["function"]["arguments"]
    return reasoning, content, [tuple(calls[i]) for i in sorted(calls)]


V4_CALL = ('The user wants weather.</think>Let me check.\n\n<｜DSML｜tool_calls>\n'
           '<｜DSML｜invoke name="get_weather">\n'
           '<｜DSML｜parameter name="city" string="true">Pa"ris\n</｜DSML｜parameter>\n'
           '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
           '<｜DSML｜parameter name="opts" string="false">{"units": ["C"]}</｜DSML｜parameter>\n'
           '</｜DSML｜invoke>\n'
           '<｜DSML｜invoke name="get_time">\n\n</｜DSML｜invoke>\n'
           '</｜DSML｜tool_calls>')
V4_ARGS = '{"city": "Pa\\"ris\\n", "days": 3, "opts": {"units": ["C"]}}'


def test_reasoning_content_and_two_tool_calls():
    p, deltas = parse(V4_CALL)
    assert p.reasoning == "The user wants weather." and p.content == "Let me check."
    assert p.tool_calls == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": V4_ARGS}},
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    assert json.loads(V4_ARGS) == {"city": 'Pa"ris\n', "days": 3, "opts": {"units": ["C"]}}
    assert merged(deltas) == (p.reasoning, p.content,
                              [("call_0", "get_weather", V4_ARGS), ("call_1", "get_time", "{}")])


def test_v41_tags_and_the_released_example():
    # the round-trip output of the V4.1 release's test_encoding.py
    text = ('  reason  </think>summary\n\n<｜DSML｜ calls>\n<｜DSML｜ invoke name="lookup">\n'
            '<｜DSML｜ parameter name="query" string="true">value</｜DSML｜ parameter>\n'
            '<｜DSML｜ parameter name="limit" string="false">2</｜DSML｜ parameter>\n</｜DSML｜ invoke>\n</｜DSML｜ calls>')
    p, _ = parse(text, V41_TAGS)
    assert (p.reasoning, p.content) == ("  reason  ", "summary")
    assert json.loads(p.tool_calls[0]["function"]["arguments"]) == {"query": "value", "limit": 2}
    # V4 tags are not V4.1's: the V4 parser leaves a V4.1 block in the content
    q, _ = parse(text, V4_TAGS)
    assert q.tool_calls == [] and q.content.startswith("summary\n\n<｜DSML｜ calls>")


def test_v4_tool_call_without_think_end():
    """V4 sometimes starts a tool call while still reasoning: the block ends the reasoning."""
    text = ('I need the weather\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
            '</｜DSML｜tool_calls>')
    for pieces in (None, list(text)):
        p, deltas = parse(text, pieces=pieces)
        assert p.reasoning == "I need the weather" and p.content == ""
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in p.tool_calls] == \
            [("get_weather", '{"city": "Paris"}')]
        assert merged(deltas)[0] == "I need the weather"


def test_chat_mode_and_no_tools():
    p, deltas = parse("Hello <b>there</b>", thinking=False)
    assert (p.reasoning, p.content, p.tool_calls) == (None, "Hello <b>there</b>", [])
    assert deltas == [{"content": "Hello <b>there</b>"}]
    # without tags (no tools offered) DSML is plain content; reasoning is still split
    p, _ = parse('r</think>a\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>', tags=None)
    assert (p.reasoning, p.content, p.tool_calls) == ("r", 'a\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>', [])


def test_lenient_think_tags():
    p, _ = parse("a<think>b</think>c</think>d", thinking=True)      # repeated <think>, stray </think>
    assert (p.reasoning, p.content) == ("ab", "cd")
    p, _ = parse("x<think>y</think>z", thinking=False)             # <think> in the answer starts reasoning
    assert (p.reasoning, p.content) == ("y", "xz")


def test_held_back_text_is_released_at_the_end():
    p, deltas = parse("thinking</think>ends with <｜DSML", pieces=["thinking</think>ends with <｜DSML"])
    assert p.content == "ends with <｜DSML" and merged(deltas)[1] == "ends with <｜DSML"
    p = OutputParser(V4_TAGS, False, ids())
    assert p.feed("answer\n") == [{"content": "answer"}]              # "\n" may start "\n\n<｜DSML｜..."
    assert p.feed("\nmore") == [{"content": "\n\nmore"}]
    assert p.feed("</thi") == [] and p.finish() == [{"content": "</thi"}]


def test_cut_off_call_drops_the_partial_tag():
    text = '</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="q" string="true">abc</｜DSML'
    p, deltas = parse(text)
    assert p.tool_calls[0]["function"]["arguments"] == '{"q": "abc'             # cut by max_tokens: as far as it got
    assert merged(deltas)[2] == [("call_0", "f", '{"q": "abc')]


def _splits(text, n):
    """``n`` cuts of ``text``: every single cut point, then pieces of 1..7 characters."""
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    for size in range(1, n):
        yield [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("tags,text,thinking", [(V4_TAGS, V4_CALL, True),
                                                (V41_TAGS, V4_CALL.replace("｜DSML｜tool_calls", "｜DSML｜ calls")
                                                 .replace("｜DSML｜invoke", "｜DSML｜ invoke")
                                                 .replace("｜DSML｜parameter", "｜DSML｜ parameter"), True),
                                                (V4_TAGS, "plain <answer> with\n\nnewlines </think> and <", False)])
def test_streaming_chunk_boundaries_anywhere(tags, text, thinking):
    whole, _ = parse(text, tags, thinking)
    want = (whole.reasoning or "", whole.content, [(c["id"], c["function"]["name"], c["function"]["arguments"])
                                                  for c in whole.tool_calls])
    for pieces in _splits(text, 8):
        p, deltas = parse(text, tags, thinking, pieces)
        assert (p.reasoning, p.content, p.tool_calls) == (whole.reasoning, whole.content, whole.tool_calls), pieces
        assert merged(deltas) == want, pieces
        assert all(v for d in deltas for k, v in d.items() if k != "tool_calls"), deltas   # no empty text deltas
        shown = "".join(d.get("content", "") + d.get("reasoning_content", "") for d in deltas)
        assert "DSML" not in shown and "think>" not in shown, deltas             # no markup leaks, even cut
