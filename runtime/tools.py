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
ran out) is still parsed. A `</tool_call>` inside a JSON string of the block does not end it (vLLM's
regex would cut the call there). The whitespace between text and a block is a separator, not content.
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
from . import structured
from .structured import JSON_OPTIONS, StructuredOutput

START, END = "<tool_call>", "</tool_call>"
CALL_TAIL = "}\n" + END  # closes a call's JSON and its block
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit per request
CHOICES = ("none", "auto", "required")
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}  # a function without parameters


class ToolError(QmoeError, ValueError):
    """An invalid `tools` or `tool_choice` value, or tool messages the template cannot render; one line."""


# --- request values -------------------------------------------------------------------------


def validate_tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description"?, "parameters"?}}])
    checked, as plain dicts for the template (a function without parameters takes none)."""
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
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {name!r}")
        if name in names:
            raise ToolError(f"tools[{i}].function.name {name!r} is used twice")
        names.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        parameters = fn.get("parameters", NO_ARGUMENTS)
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        if parameters.get("type", "object") != "object":  # arguments are an object (OpenAI refuses others too)
            raise ToolError(f'tools[{i}].function.parameters must be a schema of type "object", got type '
                            f'{json.dumps(parameters["type"])}')
        clean: dict[str, Any] = {"name": name}
        if description is not None:
            clean["description"] = description
        if "parameters" in fn:  # rendered as given; a function without them takes none (NO_ARGUMENTS)
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


def chosen(tools: Sequence[Mapping[str, Any]], choice: str) -> list[Mapping[str, Any]]:
    """The functions a forced choice may call ("required": all; a name: that one)."""
    return [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]


def arguments_schema(fn: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema a forced call's arguments follow (compact JSON: llguidance's options)."""
    return {"type": "object", **fn.get("parameters", NO_ARGUMENTS), "x-guidance": JSON_OPTIONS}


def check_schemas(tools: Sequence[Mapping[str, Any]], choice: str, tokenizer: Any, vocab_size: int) -> None:
    """Compiles each callable function's arguments schema; a ToolError names the one that fails."""
    for i, t in enumerate(tools):
        fn = t["function"]
        if choice == "required" or fn["name"] == choice:
            try:
                structured.check(StructuredOutput.json_schema(arguments_schema(fn)), tokenizer, vocab_size)
            except structured.StructuredOutputError as e:
                raise ToolError(f"tools[{i}].function.parameters: {e}") from None


def forced_calls(tools: Sequence[Mapping[str, Any]], choice: str, parallel: bool = True) -> StructuredOutput:
    """The grammar of a forced choice ("required": any of the tools; a name: that one call, as
    OpenAI gives it): one call (for "required" with parallel: one or more, separated by newlines)
    in the Hermes text, the arguments a compact JSON value matching the function's parameters
    schema."""
    parallel = parallel and choice == "required"
    rules, calls = [], []
    for i, fn in enumerate(chosen(tools, choice)):
        schema = arguments_schema(fn)
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
    except (ValueError, RecursionError):  # not JSON, or JSON Python cannot read (huge integers, deep nesting)
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or \
            not isinstance(value.get("arguments"), dict):
        return None
    return ToolCall(value["name"], json.dumps(value["arguments"], ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")


def _in_string(body: str) -> bool:
    """Whether a block's body so far, read as the start of a JSON object, ends inside a string."""
    text = body.lstrip()
    if not text.startswith("{"):
        return False
    inside = escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\" and inside:
            escaped = True
        elif c == '"':
            inside = not inside
    return inside


class ToolParser:
    """Splits a model's output, fed in pieces, into text and ToolCalls as they complete."""

    def __init__(self, limit: int | None = None) -> None:
        """limit: the most calls to report (parallel_tool_calls false: 1); later ones are dropped."""
        self.limit = limit
        self._buffer = ""
        self._in_call = False
        self._after_call = False  # whitespace right after a call separates, it is not content
        self._gap = ""  # the whitespace before an open block: dropped if it is a call, kept if not
        self._sep = ""  # the whitespace after a call: kept between two texts, dropped at either end
        self._said = False  # some text went out
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> list[str | ToolCall]:
        """The text and calls that `text` completes (text that could start a tag is held back)."""
        self._buffer += text
        out: list[str | ToolCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(END)
                while end >= 0 and _in_string(self._buffer[:end]):  # "</tool_call>" inside a JSON string
                    end = self._buffer.find(END, end + len(END))
                if end < 0:
                    return out
                self._close(self._buffer[:end], out)
                self._buffer = self._buffer[end + len(END):]
                continue
            if self._after_call:
                stripped = self._buffer.lstrip()
                self._sep += self._buffer[: len(self._buffer) - len(stripped)]
                if not stripped:
                    self._buffer = ""
                    return out
                # text after a call: separated from earlier text by the call's whitespace
                self._buffer = (self._sep if self._said else "") + stripped
                self._after_call, self._sep = False, ""
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
        body, end = self._buffer, self._buffer.find(END)
        if self._in_call and end >= 0 and _call(body) is None:
            # a closing tag was passed over as inside a string, but the JSON never ended (unbalanced
            # quotes, not JSON): the block ends at its first closing tag after all, as vLLM's would
            self._buffer = ""
            self._close(body[:end], out)
            return out + self.push(body[end + len(END):]) + self.finish()
        if self._in_call:
            self._close(self._buffer, out, closed=False)
        elif not self._after_call:
            self._text(self._buffer, out)
        self._buffer, self._in_call, self._after_call, self._gap, self._sep = "", False, False, "", ""
        return out

    def _close(self, body: str, out: list[str | ToolCall], closed: bool = True) -> None:
        call = _call(body)
        if call is None:  # not a call: the block stays text, as written
            self._text(self._gap + START + body + (END if closed else ""), out)
        elif self.limit is None or len(self.calls) < self.limit:
            self.calls.append(call)
            out.append(call)
        self._in_call, self._after_call, self._gap = False, call is not None, ""

    def _text(self, text: str, out: list[str | ToolCall]) -> None:
        if text:
            out.append(text)
            self._said = True


def parse(text: str, limit: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """A whole output -> (content, calls). Content is None when the output is only calls."""
    parser = ToolParser(limit)
    items = parser.push(text) + parser.finish()
    content = "".join(i for i in items if isinstance(i, str))
    return (content if content or not parser.calls else None), parser.calls
