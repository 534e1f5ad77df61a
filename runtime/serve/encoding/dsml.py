"""DSML, the markup in which DeepSeek-V4 models write tool calls, and the tool section of their system prompt.

An assistant turn that calls tools ends with a block (V4 tag names shown; :data:`V41_TAGS` has V4.1's)::

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

``｜DSML｜`` is one token of the tokenizer. A parameter with ``string="true"`` holds raw text; with
``string="false"`` a JSON value. Invokes are joined with one newline, parameters likewise. Arguments map
back to OpenAI's JSON string as ``{"city": "Paris", "days": 3}``: keys and string values through
``json.dumps(..., ensure_ascii=False)``, other values pasted as written, ``", "`` between pairs.

The prompt format is the released one (``encoding/encoding_dsv4.py`` of DeepSeek-V4, ``encoding/encoding.py``
of V4.1); the model was trained on these exact strings, so they are reproduced byte for byte.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .tokens import DSML, THINK_END, THINK_START

__all__ = ["DsmlTags", "V4_TAGS", "V41_TAGS", "to_json", "render_tool_calls", "render_tools", "call_arguments"]


def to_json(value: Any) -> str:
    """``json.dumps`` as the release writes values: non-ASCII kept, default separators."""
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class DsmlTags:
    """The three tag names of one DSML dialect (V4.1 writes them with a leading space)."""

    block: str
    invoke: str
    parameter: str

    @property
    def block_open(self) -> str:
        return f"<{DSML}{self.block}>"

    @property
    def block_close(self) -> str:
        return f"</{DSML}{self.block}>"

    @property
    def invoke_open(self) -> str:
        """The start of an invoke tag, up to its attributes."""
        return f"<{DSML}{self.invoke}"

    @property
    def invoke_close(self) -> str:
        return f"</{DSML}{self.invoke}>"

    @property
    def param_open(self) -> str:
        """The start of a parameter tag, up to its attributes."""
        return f"<{DSML}{self.parameter}"

    @property
    def param_close(self) -> str:
        return f"</{DSML}{self.parameter}>"


V4_TAGS = DsmlTags("tool_calls", "invoke", "parameter")
V41_TAGS = DsmlTags(" calls", " invoke", " parameter")


def call_arguments(arguments: Any) -> dict[str, Any]:
    """The argument dict of an OpenAI tool call's ``arguments``: a JSON object string (a JSON string holding
    one is unwrapped once more), or already a dict; anything else becomes ``{"arguments": <as given>}``."""
    value = arguments
    for _ in range(2):
        if not isinstance(value, str):
            break
        try:
            value = json.loads(value)
        except ValueError:
            break
    return value if isinstance(value, dict) else {"arguments": arguments}


def _parameter(tags: DsmlTags, name: str, value: Any) -> str:
    is_str = isinstance(value, str)
    text = value if is_str else to_json(value)
    return f'{tags.param_open} name="{name}" string="{"true" if is_str else "false"}">{text}{tags.param_close}'


def render_tool_calls(tags: DsmlTags, calls: list[dict[str, Any]]) -> str:
    """The DSML block of OpenAI-format ``calls`` (``{"function": {"name", "arguments"}}``), without the
    ``\\n\\n`` that separates it from the turn's content."""
    invokes = []
    for call in calls:
        fn = call["function"]
        params = "\n".join(_parameter(tags, k, v) for k, v in call_arguments(fn.get("arguments", "{}")).items())
        invokes.append(f'{tags.invoke_open} name="{fn["name"]}">\n{params}\n{tags.invoke_close}')
    return f"{tags.block_open}\n" + "\n".join(invokes) + f"\n{tags.block_close}"


def render_tools(tags: DsmlTags, tools: list[dict[str, Any]]) -> str:
    """The ``## Tools`` section appended to the system prompt: how to call, then each OpenAI tool's
    ``function`` object as one line of JSON."""
    o, i, p = tags.block_open, tags.invoke_open, tags.param_open
    example = "\n".join([
        o,
        f'{i} name="$TOOL_NAME">',
        f'{p} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{tags.param_close}',
        "...",
        tags.invoke_close,
        f'{i} name="$TOOL_NAME2">',
        "...",
        tags.invoke_close,
        tags.block_close,
    ])
    schemas = "\n".join(to_json(t["function"]) for t in tools)
    return (
        "## Tools\n\n"
        "You have access to a set of tools to help answer the user's question. You can invoke tools by "
        f'writing a "{o}" block like the following:\n\n'
        f"{example}\n\n"
        'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
        'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
        f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning "
        f"inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
        f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
        "### Available Tool Schemas\n\n"
        f"{schemas}\n\n"
        "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
    )
