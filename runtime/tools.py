"""Tool (function) calling in the Hermes format that Qwen models are trained on.

    request tools + messages -> chat template with tools (the model's own if it renders them, else
    qmoe's Qwen template: runtime/qwen_tools.jinja) -> the model writes
        optional text, then <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> blocks
    -> ToolParser (whole text, or streamed deltas) -> content + ToolCalls (OpenAI's `tool_calls`)

`tool_choice` "auto" leaves the choice to the model and parses whatever it wrote; "required" and a
named function constrain the output with a grammar (runtime/structured.py) to one or more calls in
the same Hermes text, with each call's arguments matching its function's JSON schema. vLLM forces
those choices as a bare JSON array, a format the model was never trained on; the Hermes text keeps
it on its own distribution. "none" renders the tools (as vLLM does by default) and parses nothing.

Parsing follows vLLM's `hermes` parser: a block whose body is not a JSON object with a string
`name` and an object `arguments` stays in the text, and a block left open at the end (the output
ran out) is still parsed. The whitespace between text and a block is a separator, not content.
The streaming parser emits text as it comes (holding back what could start a `<tool_call>` tag)
and each call whole once its block closes; the whole-text parser is the streaming one run over
the text, so the two always agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import QmoeError
from .sampling import stop_holdback
from .structured import JSON_OPTIONS, StructuredOutput

START, END = "<tool_call>", "</tool_call>"
CALL_TAIL = "}\n" + END  # closes a call's JSON and its block
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit per request
CHOICES = ("none", "auto", "required")


class ToolError(QmoeError, ValueError):
    """An invalid `tools` or `tool_choice` value, or tool messages the template cannot render; one line."""


# --- request values -------------------------------------------------------------------------


def validate_tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description"?, "parameters"?}}])
    checked, as plain dicts for the template (parameters default to an empty object schema)."""
    if not isinstance(value, list):
        raise ToolError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    if len(value) > MAX_TOOLS:
        raise ToolError(f"tools holds {len(value)} functions, over the limit of {MAX_TOOLS}")
    out, names = [], set()
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {name!r}")
        if name in names:
            raise ToolError(f"tools[{i}].function.name {name!r} is used twice")
        names.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        clean: dict[str, Any] = {"name": name}
        if description is not None:
            clean["description"] = description
        clean["parameters"] = parameters
        out.append({"type": "function", "function": clean})
    return out


def validate_choice(value: Any, tools: Sequence[Mapping[str, Any]]) -> str:
    """`tool_choice` -> "none" | "auto" | "required" | the one function's name. The default is
    "auto" with tools, "none" without (OpenAI's)."""
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in CHOICES:
            raise ToolError(f"tool_choice must be one of {', '.join(CHOICES)} or a function, got {value!r}")
        if value == "required" and not tools:
            raise ToolError("tool_choice 'required' needs tools")
        return value
    fn = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ToolError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                        '{"name": ...}}')
    if name not in {t["function"]["name"] for t in tools}:
        raise ToolError(f"tool_choice names the function {name!r}, which is not in tools")
    return name


def forced_calls(tools: Sequence[Mapping[str, Any]], choice: str, parallel: bool = True) -> StructuredOutput:
    """The grammar of a forced choice ("required": any of the tools; a name: that one call, as
    OpenAI gives it): one call (for "required" with parallel: one or more, separated by newlines)
    in the Hermes text, the arguments a compact JSON value matching the function's parameters
    schema."""
    parallel = parallel and choice == "required"
    chosen = [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]
    rules, calls = [], []
    for i, fn in enumerate(chosen):
        schema = {"type": "object", **fn["parameters"], "x-guidance": JSON_OPTIONS}
        head = json.dumps(f'{START}\n{{"name": "{fn["name"]}", "arguments": ')
        calls.append(f"call_{i}")
        rules.append(f"call_{i}: {head} args_{i} {json.dumps(CALL_TAIL)}")
        rules.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    call = "call: " + " | ".join(calls)
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return StructuredOutput.grammar("\n".join([start, call, *rules]))


# --- the model's output ---------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str = ""

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or \
            not isinstance(value.get("arguments"), dict):
        return None
    return ToolCall(value["name"], json.dumps(value["arguments"], ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")


class ToolParser:
    """Splits a model's output, fed in pieces, into text and ToolCalls as they complete."""

    def __init__(self, limit: int | None = None) -> None:
        """limit: the most calls to report (parallel_tool_calls false: 1); later ones are dropped."""
        self.limit = limit
        self._buffer = ""
        self._in_call = False
        self._after_call = False  # whitespace right after a call separates, it is not content
        self._gap = ""  # the whitespace before an open block: dropped if it is a call, kept if not
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> list[str | ToolCall]:
        """The text and calls that `text` completes (text that could start a tag is held back)."""
        self._buffer += text
        out: list[str | ToolCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(END)
                if end < 0:
                    return out
                self._close(self._buffer[:end], out)
                self._buffer = self._buffer[end + len(END):]
                continue
            if self._after_call:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    return out
                self._after_call = False
            start = self._buffer.find(START)
            if start >= 0:
                before = self._buffer[:start].rstrip()
                self._text(before, out)
                self._gap = self._buffer[len(before):start]
                self._buffer, self._in_call = self._buffer[start + len(START):], True
                continue
            # hold back a tail that could start the tag, and the whitespace before it
            keep = len(self._buffer) - stop_holdback(self._buffer, [START])
            keep = len(self._buffer[:keep].rstrip())
            self._text(self._buffer[:keep], out)
            self._buffer = self._buffer[keep:]
            return out

    def finish(self) -> list[str | ToolCall]:
        """Everything still held; a block left open is parsed as if it had closed."""
        out: list[str | ToolCall] = []
        if self._in_call:
            self._close(self._buffer, out, closed=False)
        elif not self._after_call:
            self._text(self._buffer, out)
        self._buffer, self._in_call, self._after_call, self._gap = "", False, False, ""
        return out

    def _close(self, body: str, out: list[str | ToolCall], closed: bool = True) -> None:
        call = _call(body)
        if call is None:  # not a call: the block stays text, as written
            self._text(self._gap + START + body + (END if closed else ""), out)
        elif self.limit is None or len(self.calls) < self.limit:
            self.calls.append(call)
            out.append(call)
        self._in_call, self._after_call, self._gap = False, call is not None, ""

    @staticmethod
    def _text(text: str, out: list[str | ToolCall]) -> None:
        if text:
            out.append(text)


def parse(text: str, limit: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """A whole output -> (content, calls). Content is None when the output is only calls."""
    parser = ToolParser(limit)
    items = parser.push(text) + parser.finish()
    content = "".join(i for i in items if isinstance(i, str))
    return (content if content or not parser.calls else None), parser.calls
