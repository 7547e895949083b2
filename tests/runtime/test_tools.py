"""Tool calling: the Hermes-format template, the parser (whole and streamed) and the grammar that
forces calls.

References: transformers' `apply_chat_template` renders the same template (its own Jinja
environment, given the same tools and messages); without tools the template must render exactly
as Qwen2's own; jsonschema validates forced arguments; the whole-text parser is checked against
hand-written expectations in vLLM's hermes semantics.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from runtime import structured
from runtime.tokenizer import ChatMessageError, ChatTemplateError, Tokenizer, tool_template
from runtime.tools import (ToolCall, ToolError, ToolParser, check_schemas, forced_calls, parse, validate_choice,
                           validate_tools)

from .test_tokenizer import CONVERSATIONS as PLAIN  # user / assistant / system turns
from .test_tokenizer import copy_dir, hf, tok  # noqa: F401  (fixtures: our tokenizer and transformers')

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                     "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [CALL]},
     {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}],
    [{"role": "user", "content": "Paris and Rome?"},
     {"role": "assistant", "content": "Checking both.", "tool_calls": [CALL, {**CALL, "id": "call_2", "function": {
         "name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "21"}, {"role": "tool", "tool_call_id": "call_2", "content": "25"},
     {"role": "assistant", "content": "Paris 21, Rome 25."}, {"role": "user", "content": "Thanks 你好"}],
]


def as_openai(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as an OpenAI client sends them: arguments as JSON text."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_tool_prompts_equal_transformers_rendering_the_template(tok, hf, conv: int, add_generation_prompt: bool):
    msgs = CONVERSATIONS[conv]
    ref = hf.apply_chat_template(msgs, tools=TOOLS, chat_template=tool_template(), tokenize=False,
                                 add_generation_prompt=add_generation_prompt)
    ours = tok.apply_chat_template(as_openai(msgs), add_generation_prompt, tools=validate_tools(TOOLS))
    assert ours == ref
    assert "<tools>\n" + json.dumps(WEATHER) in ours and "</tools>" in ours
    if conv:
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in ours
        assert "<|im_start|>user\n<tool_response>\n" in ours


@pytest.mark.parametrize("conv", range(3))
def test_without_tools_the_tool_template_renders_like_qwen2s(tok, hf, conv: int):
    for add in (True, False):
        ref = hf.apply_chat_template(PLAIN[conv], tokenize=False, add_generation_prompt=add)  # Qwen2's own template
        assert hf.apply_chat_template(PLAIN[conv], chat_template=tool_template(), tokenize=False,
                                      add_generation_prompt=add) == ref
        assert tok.apply_chat_template(PLAIN[conv], add) == ref
    assert tok.chatml_compatible


def test_a_template_without_tools_that_is_not_chatml_refuses_them(tokenizer_dir: Path, tmp_path: Path):
    folder = copy_dir(tokenizer_dir, tmp_path / "plain")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    other = Tokenizer.from_dir(folder)
    assert not other.chatml_compatible
    assert other.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    with pytest.raises(ChatTemplateError, match="does not render tools.*--chat-template"):
        other.apply_chat_template([{"role": "user", "content": "hi"}], tools=validate_tools(TOOLS))
    with pytest.raises(ChatTemplateError, match="does not render tools"):
        other.apply_chat_template(CONVERSATIONS[1])
    # a template that reads `tools` is used as it is
    own = other.with_chat_template("{{ tools | length }} tools; {% for m in messages %}{{ m.content }}{% endfor %}")
    assert own.apply_chat_template([{"role": "user", "content": "hi"}], tools=validate_tools(TOOLS)) == "2 tools; hi"


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": None}], r"messages\[0\].content must be a string"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], r"tool_calls\[0\] must be"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}], "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "must be a JSON object"),
    ([{"role": "assistant", "tool_calls": "f"}], "must be a list"),
    ([{"role": "tool", "content": "x", "tool_call_id": 5}], r"messages\[0\].tool_call_id must be a string"),
])
def test_bad_tool_messages_are_one_line_errors(tok, messages, match):
    with pytest.raises(ChatMessageError, match=match) as e:
        tok.apply_chat_template(messages)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tools, choice, match", [
    ("f", None, "tools must be a list"),
    ([{"type": "function"}], None, r"tools\[0\] must be"),
    ([{"type": "code_interpreter", "function": {"name": "f"}}], None, r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "1-64 letters"),
    ([{"type": "function", "function": {"name": "f\n"}}], None, "1-64 letters"),  # `$` matches before a final newline
    ([{"type": "function", "function": {"name": "f"}}] * 2, None, "used twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "JSON schema object"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, "description must be a string"),
    # arguments are an object: a forced call with other parameters could never parse as a call (OpenAI: 400)
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None, "type \"object\""),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None, "type \"object\""),
    ([CLOCK] * 129, None, "over the limit"),
    (TOOLS, "sometimes", "tool_choice must be one of"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not in tools"),
    (TOOLS, {"type": "function"}, "tool_choice must be"),
    ([], "required", "needs tools"),
])
def test_bad_tools_are_one_line_errors(tools, choice, match):
    with pytest.raises(ToolError, match=match) as e:
        validate_choice(choice, validate_tools(tools))
    assert "\n" not in str(e.value)


def test_tool_choice_defaults_follow_openai():
    assert validate_choice(None, validate_tools(TOOLS)) == "auto"
    assert validate_choice(None, []) == "none"
    assert validate_choice({"type": "function", "function": {"name": "now"}}, validate_tools(TOOLS)) == "now"
    assert "parameters" not in validate_tools([{"type": "function", "function": {"name": "f"}}])[0]["function"]


def test_a_function_without_parameters_is_forced_to_no_arguments(tok):
    spec = forced_calls(validate_tools([{"type": "function", "function": {"name": "f"}}]), "f")
    assert walk(tok, spec, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    assert not walk(tok, spec, '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')


def test_schema_errors_name_the_function(tok):
    tools = validate_tools([CLOCK, {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"a": {"type": 5}}}}}])
    check_schemas(tools, "now", tok, tok.vocab_size)  # only the chosen function is compiled
    with pytest.raises(ToolError, match=r"^tools\[1\]\.function\.parameters: ") as e:
        check_schemas(tools, "required", tok, tok.vocab_size)
    assert "\n" not in str(e.value)


# --- parsing --------------------------------------------------------------------------------

BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'


@pytest.mark.parametrize("text, content, calls", [
    ("Just text, no tools.\n", "Just text, no tools.\n", []),
    (BLOCK, None, ['get_weather{"city": "Paris", "unit": "C"}']),
    ("Let me check.\n" + BLOCK + "\n" + BLOCK.replace("Paris", "Rome"), "Let me check.",
     ['get_weather{"city": "Paris", "unit": "C"}', 'get_weather{"city": "Rome", "unit": "C"}']),
    (BLOCK + "\nDone.", "Done.", ['get_weather{"city": "Paris", "unit": "C"}']),
    # text on both sides of a call keeps the whitespace that followed the call between them
    ("Checking.\n" + BLOCK + "\n\nDone.  ", "Checking.\n\nDone.  ", ['get_weather{"city": "Paris", "unit": "C"}']),
    ("a " + BLOCK + " tail", "a tail", ['get_weather{"city": "Paris", "unit": "C"}']),
    # not JSON, no name, arguments not an object: the block stays text as written (vLLM's hermes)
    ("a \n<tool_call>\nnot json\n</tool_call> b", "a \n<tool_call>\nnot json\n</tool_call> b", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "f", "arguments": "x"}</tool_call>', '<tool_call>{"name": "f", "arguments": "x"}</tool_call>', []),
    # a block left open at the end (max_tokens ran out after the JSON) is still a call
    ('<tool_call>\n{"name": "now", "arguments": {}}', None, ["now{}"]),
    ("<tool_call>\n{\"name\": \"now\", \"argu", "<tool_call>\n{\"name\": \"now\", \"argu", []),
    ("ends with a partial tag <tool_ca", "ends with a partial tag <tool_ca", []),
    ('{"name": "now", "arguments": {}}', '{"name": "now", "arguments": {}}', []),  # no tags: text
])
def test_parse_follows_the_hermes_format(text: str, content: str | None, calls: list[str]):
    got_content, got_calls = parse(text)
    assert got_content == content
    assert [c.name + c.arguments for c in got_calls] == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


def test_unicode_arguments_stay_unescaped():
    _, calls = parse('<tool_call>{"name": "f", "arguments": {"city": "\\u5317\\u4eac 北京"}}</tool_call>')
    assert calls[0].arguments == '{"city": "北京 北京"}'


@pytest.mark.parametrize("arguments", ["9" * 5000, "[" * 100000])
def test_a_block_python_cannot_read_stays_text(arguments: str):
    """A model can write JSON that json.loads refuses with something other than a JSONDecodeError
    (an integer past Python's digit limit, nesting past the recursion limit): that block is not a
    call, the same as invalid JSON, instead of an error that fails the request."""
    text = '<tool_call>{"name": "f", "arguments": {"a": ' + arguments + "}}</tool_call>"
    assert parse(text) == (text, [])
    parser = ToolParser()
    assert "".join(p for p in parser.push(text) + parser.finish() if isinstance(p, str)) == text


def test_parallel_false_keeps_the_first_call():
    content, calls = parse("x\n" + BLOCK + "\n" + BLOCK.replace("Paris", "Rome") + "\ny", limit=1)
    assert content == "x\ny" and [json.loads(c.arguments)["city"] for c in calls] == ["Paris"]


def test_a_closing_tag_inside_an_argument_string_does_not_end_the_call():
    # JSON strings may hold "</tool_call>" (a forced call's grammar allows it): the block ends at
    # the tag after the JSON, whole and streamed
    block = '<tool_call>\n{"name": "f", "arguments": {"s": "a </tool_call> b"}}\n</tool_call>'
    for text in (block, "Hi\n" + block + "\nafter"):
        content, calls = parse(text)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"s": "a </tool_call> b"})], text
        parser, items = ToolParser(), []
        for ch in text:
            items += parser.push(ch)
        items += parser.finish()
        assert [(c.name, c.arguments) for c in items if isinstance(c, ToolCall)] == [(c.name, c.arguments) for c in calls]
        assert "".join(x for x in items if isinstance(x, str)) == (content or "")
    # an unclosed string (not JSON): the text stays as written, and the block ends at its first tag
    assert parse('<tool_call>\n{"name": "f\n</tool_call> x') == ('<tool_call>\n{"name": "f\n</tool_call> x', [])
    bad = '<tool_call>\n{"name": "f", "arguments": {"s": "a"b"}}\n</tool_call>'
    content, calls = parse(bad + "\n" + BLOCK + "\nend")
    assert content == bad + "\nend" and [c.name for c in calls] == ["get_weather"]


def test_streamed_parsing_equals_the_whole_text_parse():
    pieces = ["Let me check.\n", BLOCK, "\n", BLOCK.replace("Paris", "Rome"), "\n<tool_call>\nbad\n</tool_call>", " then ",
              "<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>", "\n\n  Done <tool_c", "all> x <", "tool",
              '<tool_call>\n{"name": "f", "arguments": {"s": "a </tool_call> b"}}\n</tool_call>',
              '<tool_call>{"name": "f", "arguments": {"s": "a"b"}}</tool_call>']
    rng = random.Random(0)
    for trial in range(300):
        text = "".join(rng.sample(pieces, rng.randint(1, len(pieces))))
        content, calls = parse(text)
        parser, items, i = ToolParser(), [], 0
        while i < len(text):  # random split points, down to single characters
            j = i + rng.randint(1, 12)
            items += parser.push(text[i:j])
            i = j
        # text is not sent while it may still be a call: a block seen as text is a closed one
        assert all("<tool_call>" not in x or "</tool_call>" in x for x in items if isinstance(x, str))
        items += parser.finish()
        streamed = "".join(x for x in items if isinstance(x, str))
        assert (streamed or None if calls else streamed) == content, text
        assert [(c.name, c.arguments) for c in items if isinstance(c, ToolCall)] == \
            [(c.name, c.arguments) for c in calls], text


# --- forcing calls --------------------------------------------------------------------------

def walk(tok: Tokenizer, spec, text: str) -> bool:
    """Whether the grammar accepts `text` token by token and then allows eos."""
    m = structured.Matcher(spec, tok, tok.vocab_size)
    for t in tok.encode(text):
        if not m.allowed()[t]:
            return False
        m.consume(t)
    return bool(m.allowed()[tok.eos_token_ids[0]])


@pytest.mark.parametrize("choice", ["required", "get_weather", "now"])
def test_forced_calls_accept_valid_calls_only(tok, choice: str):
    tools = validate_tools(TOOLS)
    spec = forced_calls(tools, choice)
    weather, clock = BLOCK, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    assert walk(tok, spec, weather) == (choice != "now")
    assert walk(tok, spec, clock) == (choice != "get_weather")
    assert walk(tok, spec, weather + "\n" + weather) == (choice == "required")  # parallel calls: not when named
    assert not walk(tok, forced_calls(tools, choice, parallel=False), weather + "\n" + weather)
    bad = [BLOCK.replace('"C"', '"K"'),  # not in the enum
           BLOCK.replace(', "unit": "C"', ""),  # a required property missing
           BLOCK.replace('"C"}', '"C", "extra": 1}'),  # additionalProperties false
           BLOCK.replace('{"city"', '{ "city"'),  # whitespace the compact form does not allow
           "Sure! " + BLOCK]  # text before the call
    for text in bad:
        assert not walk(tok, spec, text), text


def test_forced_calls_with_a_bad_schema_are_refused(tok):
    spec = forced_calls(validate_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": 5}}}}}]), "required")
    with pytest.raises(structured.StructuredOutputError):
        structured.check(spec, tok, tok.vocab_size)


def test_engine_chat_with_forced_calls_produces_valid_arguments(tiny_artifact: Path):
    import runtime
    from runtime.sampling import SamplingParams

    engine = runtime.load(tiny_artifact)
    tools = validate_tools(TOOLS)
    for seed in range(3):
        text = engine.chat([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                           sampling=SamplingParams(temperature=1.0, seed=seed, max_new_tokens=96,
                                                   structured=forced_calls(tools, "get_weather", parallel=False)))
        content, calls = parse(text)
        assert content is None and len(calls) == 1 and calls[0].name == "get_weather", text
        jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])
    # the random model does not write a call on its own
    text = engine.chat([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                       sampling=SamplingParams(max_new_tokens=24))
    assert parse(text)[1] == [] and np.isscalar(len(text))
