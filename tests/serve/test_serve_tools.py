"""Tool calling through the OpenAI API (official client, live server).

References: the embedded engine run alone with the same prompt (tools rendered by the template,
checked against transformers in tests/runtime/test_tools.py) and the same forcing grammar, its
text parsed by runtime.tools.parse; jsonschema validates every forced call's arguments.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from runtime.sampling import SamplingParams, choice_seed
from runtime.tokenizer import tool_template
from runtime.tools import forced_calls, parse, validate_tools

from .conftest import MODEL
from .test_serve_api import post

WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK: Any = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                              "additionalProperties": False}}}
TOOLS: Any = [WEATHER, CLOCK]
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def embedded_text(embedded, messages, choice: str, parallel: bool = True, **sampling) -> str:
    ids = embedded.tokenizer.encode_chat(messages, tools=validate_tools(TOOLS))
    spec = forced_calls(validate_tools(TOOLS), choice, parallel)
    return "".join(embedded.stream_text(ids, SamplingParams(structured=spec, **sampling)))


def check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_match_the_embedded_engine(client, embedded, choice) -> None:
    name = "required" if choice == "required" else "get_weather"
    for kw in ({}, {"temperature": 1.0, "seed": 3}):
        # one call: this random model would write calls until max_tokens cuts the last one
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                           parallel_tool_calls=False, max_tokens=80, **kw)
        msg = r.choices[0].message
        check_calls(msg.tool_calls, {"get_weather", "now"} if name == "required" else {"get_weather"})
        assert msg.content is None and r.choices[0].finish_reason == "tool_calls"
        text = embedded_text(embedded, ASK, name, parallel=False, max_new_tokens=80, **kw)
        content, calls = parse(text)
        assert content is None
        assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == \
            [(c.name, c.arguments) for c in calls]
        assert r.usage.prompt_tokens == len(embedded.tokenizer.encode_chat(ASK, tools=validate_tools(TOOLS)))


def test_streamed_tool_calls_add_up_to_the_whole_response(client, embedded) -> None:
    kw: Any = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=1.0,
                   seed=5, n=2, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for i in range(2):
        deltas = [c.choices[0].delta for c in chunks if c.choices[0].index == i]
        streamed = [t for d in deltas for t in (d.tool_calls or [])]
        expected = whole.choices[i].message.tool_calls
        assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == \
            [(k, t.function.name, t.function.arguments) for k, t in enumerate(expected)]
        assert all(t.id.startswith("call_") and t.type == "function" for t in streamed)
        assert "".join(d.content or "" for d in deltas) == ""
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].index == i and c.choices[0].finish_reason]
        assert reasons == ["tool_calls"]
        # choice i is the embedded engine run alone with choice i's seed
        _, calls = parse(embedded_text(embedded, ASK, "required", parallel=False, max_new_tokens=80, temperature=1.0,
                                       seed=choice_seed(5, i)))
        assert [(c.name, c.arguments) for c in calls] == [(t.function.name, t.function.arguments) for t in expected]


def test_parallel_tool_calls_false_gives_one_call(client) -> None:
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80, temperature=1.0, seed=seed)
        assert len(r.choices[0].message.tool_calls) == 1


def test_auto_parses_what_the_model_writes(client, embedded) -> None:
    # The random model never writes a call itself: a regex makes it write text then a call, which
    # "auto" must split into content and tool_calls; "none" leaves it as text.
    block = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    regex = "Let me check the time\\.\n" + "".join("\\" + c if c in "{}[]().*+?|^$\\" else c for c in block)
    for stream in (False, True):
        kw: Any = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, extra_body={"guided_regex": regex})
        if stream:
            chunks = list(client.chat.completions.create(**kw, stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
            reason = chunks[-1].choices[0].finish_reason
        else:
            msg = client.chat.completions.create(**kw).choices[0]
            content, calls, reason = msg.message.content, msg.message.tool_calls, msg.finish_reason
        assert content == "Let me check the time."
        assert [(c.function.name, c.function.arguments) for c in calls] == [("now", "{}")]
        assert reason == "tool_calls"
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=60,
                                       extra_body={"guided_regex": regex})
    assert r.choices[0].message.content == "Let me check the time.\n" + block
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    # without tool calls in the output, auto returns the text as it is
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8)
    expected = "".join(embedded.stream_text(embedded.tokenizer.encode_chat(ASK, tools=validate_tools(TOOLS)),
                                            SamplingParams(max_new_tokens=8)))
    assert plain.choices[0].message.content == expected and plain.choices[0].message.tool_calls is None


def test_a_tool_conversation_renders_like_transformers(server, tokenizer_dir) -> None:
    """The follow-up turn (assistant tool_calls with JSON-text arguments, tool results) is the
    prompt transformers renders from the same template."""
    call = {"id": "call_a", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "C"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": 21}'}]
    status, got = post(server.url + "/tokenize", {"model": MODEL, "messages": messages, "tools": TOOLS})
    assert status == 200
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    as_dicts = [*ASK, {**messages[1], "tool_calls": [{**call, "function": {**call["function"],
                                                                            "arguments": {"city": "Paris", "unit": "C"}}}]},
                messages[2]]
    ref = hf.apply_chat_template(as_dicts, tools=TOOLS, chat_template=tool_template(), add_generation_prompt=True,
                                 tokenize=True, return_dict=False)
    assert got["tokens"] == list(ref)
    status, reply = post(server.url + "/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": TOOLS,
                                                                "max_tokens": 4})
    assert status == 200 and reply["usage"]["prompt_tokens"] == len(ref)


GOOD: Any = {"model": MODEL, "messages": ASK, "max_tokens": 4}
BAD = [
    ("tools not a list", {**GOOD, "tools": {"type": "function"}}, "tools"),
    ("tool without a function", {**GOOD, "tools": [{"type": "function"}]}, "tools"),
    ("tool name with a space", {**GOOD, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ("duplicate tool names", {**GOOD, "tools": [CLOCK, CLOCK]}, "tools"),
    ("unknown tool_choice", {**GOOD, "tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("tool_choice names a missing function", {**GOOD, "tools": TOOLS,
                                              "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ("required without tools", {**GOOD, "tool_choice": "required"}, "tool_choice"),
    ("required with response_format", {**GOOD, "tools": TOOLS, "tool_choice": "required",
                                       "response_format": {"type": "json_object"}}, "tool_choice"),
    ("a schema llguidance refuses", {**GOOD, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 7}}}}}]},
     "tool_choice"),
    ("parallel_tool_calls not a bool", {**GOOD, "tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ("tool_calls arguments not JSON", {**GOOD, "messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "now", "arguments": "{"}}]}]}, "messages"),
    ("legacy functions", {**GOOD, "functions": [{"name": "f"}]}, "functions"),
]


@pytest.mark.parametrize("body, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_tool_requests_get_a_400(server, body, param) -> None:
    status, got = post(server.url + "/v1/chat/completions", body)
    assert status == 400 and got["error"]["param"] == param and "\n" not in got["error"]["message"]
    assert post(server.url + "/v1/chat/completions", GOOD)[0] == 200


def test_tools_on_completions_get_a_400(server) -> None:
    status, got = post(server.url + "/v1/completions", {"model": MODEL, "prompt": "hi", "tools": TOOLS})
    assert status == 400 and got["error"]["param"] == "tools"


def test_openai_client_refuses_nothing_it_sends(client) -> None:
    """The official client's typed tool parameters go through unchanged."""
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model=MODEL, messages=ASK, tool_choice="required")
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "now"}}, max_tokens=40)
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == [("now", "{}")]
