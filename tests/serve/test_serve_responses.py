"""OpenAI's Responses API (/v1/responses) of `qmoe serve`, driven by the official openai client.

References: the embedded engine run alone on the chat prompt the request stands for (instructions
as a system message, the input, a previous response's conversation), rendered by the tokenizer
whose template is checked against transformers elsewhere; jsonschema for structured output and
forced tool calls; the chat completions route for log-probabilities (itself checked against
transformers in tests/serve/test_serve_sampling.py).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from runtime.sampling import SamplingParams
from runtime.tools import forced_calls, parse, validate_tools

from .conftest import MODEL
from .test_serve_api import post

N = 10
WEATHER: Any = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                                "unit": {"type": "string", "enum": ["C", "F"]}},
                               "required": ["city", "unit"], "additionalProperties": False}, "strict": True}
CHAT_WEATHER = {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}


def embedded_reply(embedded, messages, n: int = N, tools=None, choice: str = "auto", **sampling) -> str:
    ids = embedded.tokenizer.encode_chat(messages, tools=tools)
    spec = forced_calls(tools, choice, False) if tools and choice not in ("auto", "none") else None
    return "".join(embedded.stream_text(ids, SamplingParams(max_new_tokens=n, structured=spec, **sampling)))


def test_text_matches_the_embedded_engine(client, embedded) -> None:
    r = client.responses.create(model=MODEL, input="Hello! What is a mixture of experts?", max_output_tokens=N,
                                instructions="Answer briefly.")
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Hello! What is a mixture of experts?"}]
    assert r.output_text == embedded_reply(embedded, messages) and r.output_text
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] == ["message"] and r.output[0].status == "incomplete"
    prompt = len(embedded.tokenizer.encode_chat(messages))
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (prompt, N, prompt + N)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.instructions == "Answer briefly." and r.max_output_tokens == N and r.store is True
    # seeded sampling, input as items with a developer message (= system) and text parts
    items = [{"role": "developer", "content": "Answer briefly."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                                             {"type": "input_text", "text": " there"}]}]
    r = client.responses.create(model=MODEL, input=items, max_output_tokens=N, temperature=1.0, top_p=0.9,
                                extra_body={"seed": 7})
    want = embedded_reply(embedded, [messages[0], {"role": "user", "content": "Hi there"}], temperature=1.0,
                          top_p=0.9, seed=7)
    assert r.output_text == want and r.temperature == 1.0 and r.top_p == 0.9


def test_a_finished_reply_is_completed(client) -> None:
    r = client.responses.create(model=MODEL, input="Say hi", max_output_tokens=20,
                                extra_body={"guided_regex": "Hi there[.]"})
    assert r.status == "completed" and r.incomplete_details is None and r.output_text == "Hi there."


def test_stream_events_add_up_to_the_response(client) -> None:
    kw: Any = dict(model=MODEL, input="Tell me a story", max_output_tokens=N, temperature=1.0,
                   extra_body={"seed": 3})
    whole = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    done = events[-1].response
    assert done.output_text == whole.output_text and done.status == "incomplete"
    assert done.usage.output_tokens == N and len({e.response.id for e in events if hasattr(e, "response")}) == 1
    # the SDK's stream helper accumulates a completed response
    with client.responses.stream(model=MODEL, input="Say hi", max_output_tokens=20,
                                 extra_body={"guided_regex": "Hi there[.]"}) as s:
        list(s)
        final = s.get_final_response()
    assert final.output_text == "Hi there." and final.status == "completed"


def test_previous_response_id_continues_the_conversation(client, embedded) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=N,
                                    instructions="Be brief.")
    second = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=N,
                                     previous_response_id=first.id)
    # the previous input and output, not the previous instructions (OpenAI's rule)
    conversation = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "What is my name?"}]
    assert second.usage.input_tokens == len(embedded.tokenizer.encode_chat(conversation))
    assert second.output_text == embedded_reply(embedded, conversation)
    assert second.previous_response_id == first.id
    items = client.responses.input_items.list(second.id, order="asc")
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "What is my name?")]


def test_store_retrieve_delete_and_input_items(client, server) -> None:
    inputs = [{"role": "user", "content": f"line {i}"} for i in range(5)]
    r = client.responses.create(model=MODEL, input=inputs, max_output_tokens=2)
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()
    desc = client.responses.input_items.list(r.id)  # newest first by default, as OpenAI lists them
    assert [i.content[0].text for i in desc.data] == [f"line {i}" for i in reversed(range(5))]
    status, page = post(f"{server.url}/v1/responses/{r.id}/input_items?order=asc&limit=2", {}, method="GET")
    assert status == 200 and page["has_more"] is True
    assert [i["content"][0]["text"] for i in page["data"]] == ["line 0", "line 1"]
    status, rest = post(f"{server.url}/v1/responses/{r.id}/input_items?order=asc&limit=10&after={page['last_id']}", {},
                        method="GET")
    assert [i["content"][0]["text"] for i in rest["data"]] == ["line 2", "line 3", "line 4"]
    assert rest["has_more"] is False
    status, out = post(f"{server.url}/v1/responses/{r.id}", {}, method="DELETE")
    assert (status, out) == (200, {"id": r.id, "object": "response", "deleted": True})
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="again", previous_response_id=r.id, max_output_tokens=2)
    unstored = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_function_calls_match_the_embedded_engine(client, embedded, choice) -> None:
    ask = "What is the weather in Paris?"
    r = client.responses.create(model=MODEL, input=ask, tools=[WEATHER], tool_choice=choice,
                                parallel_tool_calls=False, max_output_tokens=80)
    calls = [o for o in r.output if o.type == "function_call"]
    assert [o.type for o in r.output] == ["function_call"] and r.status == "completed"
    assert calls[0].call_id.startswith("call_") and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    text = embedded_reply(embedded, [{"role": "user", "content": ask}], 80, validate_tools([CHAT_WEATHER]),
                          "required" if choice == "required" else "get_weather")
    assert [(c.name, c.arguments) for c in parse(text)[1]] == [(calls[0].name, calls[0].arguments)]
    # streamed: the call arrives in output_item / function_call_arguments events
    events = list(client.responses.create(model=MODEL, input=ask, tools=[WEATHER], tool_choice=choice,
                                          parallel_tool_calls=False, max_output_tokens=80, stream=True))
    args = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(a.name, a.arguments) for a in args] == [(calls[0].name, calls[0].arguments)]
    assert events[-1].type == "response.completed"
    assert [o.type for o in events[-1].response.output] == ["function_call"]


def test_a_tool_round_trip_renders_like_the_chat_api(client, server) -> None:
    """function_call + function_call_output items are the same conversation as chat's tool_calls
    and tool messages: the same prompt tokens."""
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather",
            "arguments": json.dumps({"city": "Paris", "unit": "C"})}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "18 degrees"}
    r = client.responses.create(model=MODEL, tools=[WEATHER], max_output_tokens=2,
                                input=[{"role": "user", "content": "Weather in Paris?"}, call, output])
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    c = client.chat.completions.create(model=MODEL, messages=chat, tools=[CHAT_WEATHER], max_tokens=2)
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.output_text == c.choices[0].message.content
    # a follow-up after a response that called a tool carries the call into the conversation
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=80)
    fc = first.output[0]
    follow = client.responses.create(model=MODEL, tools=[WEATHER], max_output_tokens=2, previous_response_id=first.id,
                                     input=[{"type": "function_call_output", "call_id": fc.call_id,
                                             "output": "18 degrees"}])
    chat2 = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": fc.call_id, "type": "function", "function": {"name": fc.name, "arguments": fc.arguments}}]},
             {"role": "tool", "tool_call_id": fc.call_id, "content": "18 degrees"}]
    c2 = client.chat.completions.create(model=MODEL, messages=chat2, tools=[CHAT_WEATHER], max_tokens=2)
    assert follow.usage.input_tokens == c2.usage.prompt_tokens


def test_json_schema_output(client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
              "required": ["name", "ok"], "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Give me JSON", max_output_tokens=100,
                                text={"format": {"type": "json_schema", "name": "thing", "schema": schema,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_logprobs_equal_the_chat_routes(client) -> None:
    r = client.responses.create(model=MODEL, input="Hello", max_output_tokens=6, top_logprobs=3,
                                include=["message.output_text.logprobs"])
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                       logprobs=True, top_logprobs=3)
    got = r.output[0].content[0].logprobs
    want = c.choices[0].logprobs.content
    # the same tokens and alternatives; values within 1e-4 (each run is a fresh KV cache slot, whose
    # floating-point batch variance is ~1e-6 here)
    def same(a, b) -> bool:
        return a.token == b.token and abs(a.logprob - b.logprob) <= 1e-4

    assert len(got) == len(want) == 6 and all(len(e.top_logprobs) == 3 for e in got)
    assert all(same(a, b) and all(same(x, y) for x, y in zip(a.top_logprobs, b.top_logprobs))
               for a, b in zip(got, want))
    events = list(client.responses.create(model=MODEL, input="Hello", max_output_tokens=6, top_logprobs=3,
                                          include=["message.output_text.logprobs"], stream=True))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert len(streamed) == 6 and all(same(a, b) for a, b in zip(streamed, got))


@pytest.mark.parametrize("body,status,param", [
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"input": "hi", "background": True}, 400, "background"),
    ({"input": "hi", "reasoning": {"effort": "high"}}, 400, "reasoning.effort"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input"),
    ({"input": [{"role": "robot", "content": "hi"}]}, 400, "input"),
    ({"input": 3}, 400, "input"),
    ({}, 400, "input"),
    ({"input": "hi", "metadata": {"k": 1}}, 400, "metadata"),
    ({"input": "hi", "truncation": "sometimes"}, 400, "truncation"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, 400, "text.format"),
    ({"input": "hi", "tool_choice": {"type": "allowed_tools"}}, 400, "tool_choice"),
    # errors name the Responses request's fields, not the chat request it becomes
    ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": "5"}, 400, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 10 ** 9}, 400, "max_output_tokens"),
    ({"input": "hi", "text": {"format": {"type": "json_schema"}}}, 400, "text.format"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}}, 400,
     "text.format"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "not json"}]}, 400, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, 400, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "", "arguments": "{}"}]}, 400, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[" * 100000}]}, 400, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"a": ' + "9" * 5000 + "}"}]},
     400, "input"),
    ({"input": "hi", "temperature": -1}, 400, "temperature"),
    ({"input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": "hi", "store": "no"}, 400, "store"),
    ({"input": "hi", "user": 5}, 400, "user"),
    ({"input": "hi", "include": [1]}, 400, "include"),
    ({"input": "hi", "stream_options": {"include_obfuscation": False}}, 400, "stream_options"),  # without stream
    ({"input": "hi", "stream": True, "stream_options": {"include_obfuscation": True}}, 400, "stream_options"),
    ({"input": "hi", "stream": True, "stream_options": "x"}, 400, "stream_options"),
    ({"input": "hi", "model": "gpt-4o"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param) -> None:
    code, out = post(f"{server.url}/v1/responses", {"model": MODEL, **body} if "model" not in body else body)
    assert code == status, out
    assert out["error"]["param"] == param and "\n" not in out["error"]["message"]
    message = out["error"]["message"]
    assert not any(f in message for f in ("max_completion_tokens", "max_tokens", "response_format", "messages[")), \
        message


def test_truncation_auto_drops_the_oldest_items(client, server, embedded) -> None:
    from runtime.serve import Service

    service: Service = server.app.state.service
    limit = service.context_limit
    long_text = "word " * (limit // 2)
    inputs = [{"role": "user", "content": long_text}, {"role": "assistant", "content": long_text},
              {"role": "user", "content": "Short question?"}]
    code, out = post(f"{server.url}/v1/responses", {"model": MODEL, "input": inputs, "max_output_tokens": 4})
    assert code == 400 and out["error"]["code"] == "context_length_exceeded"
    assert out["error"]["param"] == "max_output_tokens" and "max_output_tokens is 4" in out["error"]["message"]
    code, out = post(f"{server.url}/v1/responses", {"model": MODEL, "input": inputs})  # no max_output_tokens
    assert code == 400 and out["error"]["code"] == "context_length_exceeded", out
    assert out["error"]["param"] == "max_output_tokens" and "max_tokens" not in out["error"]["message"]
    r = client.responses.create(model=MODEL, input=inputs, max_output_tokens=4, truncation="auto")
    kept = [{"role": "assistant", "content": long_text}, {"role": "user", "content": "Short question?"}]
    if len(embedded.tokenizer.encode_chat(kept)) + 4 > limit:
        kept = kept[1:]
    assert r.usage.input_tokens == len(embedded.tokenizer.encode_chat(kept))
    assert r.truncation == "auto"


def test_input_item_ids_are_unique_strings(client, server) -> None:
    """input_items pages by id (`after`): an id given twice would send the official client's
    auto-pagination round in circles, so it is a 400 as on OpenAI ("Duplicate item found")."""
    def body(ids):
        return {"model": MODEL, "max_output_tokens": 2,
                "input": [{"id": i, "type": "message", "role": "user", "content": "x"} for i in ids]}

    for ids in (["msg_a", "msg_b", "msg_a", "msg_c"], [5], [""], [["msg_a"]]):
        code, out = post(f"{server.url}/v1/responses", body(ids))
        assert code == 400 and out["error"]["param"] == "input", (ids, out)
    # ids given are kept, the rest get theirs; an id of null is no id; every page is reached once
    code, r = post(f"{server.url}/v1/responses", body(["msg_a", None, "msg_b", None]))
    assert code == 200, r
    seen = [i.id for i in client.responses.input_items.list(r["id"], order="asc", limit=1)]
    assert seen[0] == "msg_a" and seen[2] == "msg_b" and len(set(seen)) == 4 and all(seen)


def test_input_items_have_openai_shape(client) -> None:
    """Listed input items are what OpenAI lists: message content as parts (input_text, or
    output_text for the assistant's), each item with a status."""
    r = client.responses.create(model=MODEL, max_output_tokens=2, input=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "developer", "content": [{"type": "input_text", "text": "be brief"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "18C"}])
    items = [i.model_dump(exclude_none=True) for i in client.responses.input_items.list(r.id, order="asc")]
    assert [(i["type"], i.get("role")) for i in items] == [
        ("message", "user"), ("message", "assistant"), ("message", "developer"), ("function_call", None),
        ("function_call_output", None)]
    assert items[0]["content"] == [{"type": "input_text", "text": "hi"}]
    assert items[1]["content"] == [{"type": "output_text", "text": "hello", "annotations": []}]
    assert items[2]["content"] == [{"type": "input_text", "text": "be brief"}]
    assert all(i["status"] == "completed" and i["id"] for i in items)


def test_stream_options_without_obfuscation(client) -> None:
    """include_obfuscation false (what this server does anyway) is accepted, as OpenAI takes it."""
    events = list(client.responses.create(model=MODEL, input="hi", max_output_tokens=2, stream=True,
                                          stream_options={"include_obfuscation": False}))
    assert events[-1].type == "response.incomplete"
    assert all(getattr(e, "obfuscation", None) is None for e in events)
