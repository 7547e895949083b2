"""The OpenAI API of `qmoe serve`, driven by the official openai client against a live server.

The reference for every output is the embedded runtime (a separate engine in this process) run on
the same artifact: greedy text must match exactly, seeded sampling too.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from runtime.engine import GenerationResult
from runtime.sampling import SamplingParams

from .conftest import MODEL

N = 12  # new tokens per request: small keeps the file fast on 2 cores
HELLO: Any = [{"role": "user", "content": "Hello! What is a mixture of experts?"}]


def reference(embedded, ids: list[int], **sampling) -> GenerationResult:
    result = GenerationResult(list(ids))
    result.text = "".join(embedded.stream_text(ids, SamplingParams(**sampling), result=result))
    return result


def post(url: str, body: bytes | dict, method: str = "POST", timeout: float = 30) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_served_name(client) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_matches_embedded_greedy(client, embedded) -> None:
    # No temperature given: the tiny artifact's generation_config says do_sample=false, so greedy.
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N)
    expected = embedded.chat(HELLO, SamplingParams(max_new_tokens=N))
    assert expected and r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    prompt = len(embedded.tokenizer.encode_chat(HELLO))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, N, prompt + N)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")


def test_chat_stream_matches_embedded_greedy(client, embedded) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in content if d]) > 1, "the reply should arrive in several deltas"
    assert "".join(content) == embedded.chat(HELLO, SamplingParams(max_new_tokens=N))
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    without_usage = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stream=True))
    assert all(c.usage is None and c.choices for c in without_usage)


def test_completions_match_embedded_greedy(client, embedded) -> None:
    prompt = "The experts of a sparse model"
    expected = embedded.complete(prompt, SamplingParams(max_new_tokens=N))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(embedded.tokenizer.encode(prompt)) and r.usage.completion_tokens == N
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    by_ids = client.completions.create(model=MODEL, prompt=embedded.tokenizer.encode(prompt), max_tokens=N)
    assert by_ids.choices[0].text == expected


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_reply(client, embedded, stream: bool) -> None:
    full = embedded.chat(HELLO, SamplingParams(max_new_tokens=N))
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    kw = dict(model=MODEL, messages=HELLO, max_tokens=N, stop=["never-appears", stop])
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(**kw)
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert (text, reason) == (expected, "stop")


def test_seeded_sampling_matches_embedded(client, embedded) -> None:
    sampling = dict(temperature=0.9, top_p=0.95, seed=1234)
    ids = embedded.tokenizer.encode_chat(HELLO)
    expected = reference(embedded, ids, max_new_tokens=N, top_k=40, **sampling).text
    assert expected != reference(embedded, ids, max_new_tokens=N).text, "pick a seed whose draw is not greedy"
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=N, **sampling,
                                       extra_body={"top_k": 40})  # vLLM's extension
    assert r.choices[0].message.content == expected
    assert r.usage.completion_tokens == N  # max_completion_tokens is honoured like max_tokens


def test_sixteen_concurrent_streams_each_match_embedded(client, embedded) -> None:
    words = "apple river stone cloud tiger piano rocket garden winter copper violet harbor meadow lantern falcon desert"
    # (The random tiny model mostly answers the chat template's tail; these 16 prompts give 16 replies.)
    conversations = [[{"role": "user", "content": f"{w} {w} {w}"}] for w in words.split()]
    got: dict[int, tuple[str, set[str], str | None]] = {}
    barrier = threading.Barrier(16)

    def one(i: int) -> None:
        barrier.wait()
        chunks = list(client.chat.completions.create(model=MODEL, messages=conversations[i], max_tokens=8,
                                                     stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        got[i] = (text, {c.id for c in chunks}, chunks[-1].choices[0].finish_reason)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == list(range(16))
    expected = [embedded.chat(c, SamplingParams(max_new_tokens=8)) for c in conversations]
    assert len(set(expected)) == 16, "the prompts should give distinct replies"
    for i in range(16):
        text, ids, reason = got[i]
        assert text == expected[i], f"client {i}"
        assert len(ids) == 1 and reason == "length"


GOOD: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
BAD_REQUESTS: list[tuple[str, str, Any, int, str | None, str | None]] = [
    ("invalid JSON", "/v1/chat/completions", b'{"model": ', 400, None, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("unknown model", "/v1/chat/completions", {**GOOD, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages", None),
    ("messages not a list", "/v1/chat/completions", {**GOOD, "messages": "hi"}, 400, "messages", None),
    ("unknown role", "/v1/chat/completions", {**GOOD, "messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages", None),
    ("max_tokens not an int", "/v1/chat/completions", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens", None),
    ("max_tokens zero", "/v1/chat/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", None),
    ("too many tokens", "/v1/chat/completions", {**GOOD, "max_tokens": 10**6}, 400, "max_tokens",
     "context_length_exceeded"),
    ("negative temperature", "/v1/chat/completions", {**GOOD, "temperature": -1}, 400, "temperature", None),
    ("top_p over 1", "/v1/chat/completions", {**GOOD, "top_p": 2}, 400, "top_p", None),
    ("seed not an int", "/v1/chat/completions", {**GOOD, "seed": "x"}, 400, "seed", None),
    ("stop not strings", "/v1/chat/completions", {**GOOD, "stop": [1]}, 400, "stop", None),
    ("stop zero", "/v1/chat/completions", {**GOOD, "stop": 0}, 400, "stop", None),
    ("stop false", "/v1/chat/completions", {**GOOD, "stop": False}, 400, "stop", None),
    ("stop an empty object", "/v1/chat/completions", {**GOOD, "stop": {}}, 400, "stop", None),
    ("lone surrogate in content", "/v1/chat/completions",
     b'{"model": "tiny-moe", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, None, None),
    ("lone surrogate in prompt", "/v1/completions", b'{"model": "tiny-moe", "prompt": "a\\udfffb"}', 400, None, None),
    ("nested too deeply", "/v1/chat/completions", b"[" * 100000 + b"]" * 100000, 400, None, None),
    ("tool call arguments nested too deeply", "/v1/chat/completions",
     {**GOOD, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 100000}}]}]}, 400, "messages",
     None),
    ("tool call arguments with an integer of 5000 digits", "/v1/chat/completions",
     {**GOOD, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
         {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": ' + "9" * 5000 + "}"}}]}]},
     400, "messages", None),
    ("guided_json nested too deeply", "/v1/chat/completions", {**GOOD, "guided_json": "[" * 100000}, 400,
     "guided_json", None),
    ("guided_json with an integer of 5000 digits", "/v1/chat/completions",
     {**GOOD, "guided_json": '{"maxLength": ' + "9" * 5000 + "}"}, 400, "guided_json", None),
    ("integer of 5000 digits", "/v1/completions",
     b'{"model": "tiny-moe", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, None, None),
    ("stream not a bool", "/v1/chat/completions", {**GOOD, "stream": "yes"}, 400, "stream", None),
    ("n zero", "/v1/chat/completions", {**GOOD, "n": 0}, 400, "n", None),
    ("n over the cap", "/v1/chat/completions", {**GOOD, "n": 129}, 400, "n", None),
    ("n a string", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": "2"}, 400, "n", None),
    ("best_of", "/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of", None),
    ("chat logprobs not a bool", "/v1/chat/completions", {**GOOD, "logprobs": 3}, 400, "logprobs", None),
    ("top_logprobs over 20", "/v1/chat/completions", {**GOOD, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs", None),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**GOOD, "top_logprobs": 2}, 400, "top_logprobs",
     None),
    ("completion logprobs over 20", "/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400,
     "logprobs", None),
    ("completion logprobs a bool", "/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": True}, 400,
     "logprobs", None),
    ("presence_penalty over 2", "/v1/chat/completions", {**GOOD, "presence_penalty": 2.5}, 400, "presence_penalty",
     None),
    ("frequency_penalty a string", "/v1/chat/completions", {**GOOD, "frequency_penalty": "1"}, 400,
     "frequency_penalty", None),
    ("min_p over 1", "/v1/chat/completions", {**GOOD, "min_p": 1.5}, 400, "min_p", None),
    ("logit_bias key not an id", "/v1/chat/completions", {**GOOD, "logit_bias": {"hello": 1}}, 400, "logit_bias",
     None),
    ("logit_bias value over 100", "/v1/chat/completions", {**GOOD, "logit_bias": {"11": 101}}, 400, "logit_bias",
     None),
    ("logit_bias id past the vocabulary", "/v1/chat/completions", {**GOOD, "logit_bias": {"999999": 1}}, 400,
     "logit_bias", None),
    ("logit_bias a list", "/v1/chat/completions", {**GOOD, "logit_bias": [11, 1]}, 400, "logit_bias", None),
    ("logit_bias key a superscript digit", "/v1/chat/completions", {**GOOD, "logit_bias": {"²": 1}}, 400,
     "logit_bias", None),
    ("logit_bias key of 5000 digits", "/v1/chat/completions", {**GOOD, "logit_bias": {"1" * 5000: 1}}, 400,
     "logit_bias", None),
    ("stream_options without stream", "/v1/chat/completions", {**GOOD, "stream_options": {"include_usage": True}},
     400, "stream_options", None),
    ("vLLM use_beam_search streamed", "/v1/chat/completions", {**GOOD, "use_beam_search": True, "stream": True}, 400,
     "stream", None),
    ("vLLM spaces_between_special_tokens", "/v1/chat/completions", {**GOOD, "spaces_between_special_tokens": False},
     400, "spaces_between_special_tokens", None),
    ("stop_token_ids not a list", "/v1/chat/completions", {**GOOD, "stop_token_ids": 5}, 400, "stop_token_ids",
     None),
    ("stop_token_ids negative", "/v1/chat/completions", {**GOOD, "stop_token_ids": [-1]}, 400, "stop_token_ids",
     None),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("token id out of range", "/v1/completions", {"model": MODEL, "prompt": [10**7]}, 400, "prompt", None),
    ("unknown path", "/v1/engines", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path, body, status, param, code", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, path, body, status, param,
                                                                       code) -> None:
    got_status, got = post(server.url + path, body)
    assert got_status == status
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["message"] and "\n" not in got["error"]["message"]
    assert (got["error"]["param"], got["error"]["code"]) == (param, code)
    assert post(server.url + "/v1/chat/completions", GOOD)[0] == 200


def test_openai_client_raises_on_errors(client) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=-0.5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)


def test_wrong_method_gets_an_openai_error(server) -> None:
    status, got = post(server.url + "/v1/chat/completions", b"", method="GET")
    assert status == 405 and got["error"]["type"] == "invalid_request_error"


def _bounded_followup(client, embedded, seconds: float) -> None:
    t0 = time.monotonic()
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, timeout=seconds)
    assert time.monotonic() - t0 < seconds
    assert r.choices[0].message.content == embedded.chat(HELLO, SamplingParams(max_new_tokens=4))


def test_client_leaving_a_stream_cancels_its_generation(client, embedded) -> None:
    # 20000 tokens would keep the engine busy for a minute here; the follow-up must not wait for them.
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20000, stream=True)
    for n, _ in enumerate(stream):
        if n == 2:
            break
    stream.close()
    _bounded_followup(client, embedded, 5.0)


def test_client_leaving_a_whole_response_cancels_its_generation(server, client, embedded) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 20000}
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        post(server.url + "/v1/chat/completions", body, timeout=0.5)
    _bounded_followup(client, embedded, 5.0)


def test_concurrent_streams_share_decode_steps(server, client, embedded) -> None:
    scheduler = server.app.state.service.worker.scheduler
    assert scheduler.max_slots == 8  # create_app's default
    scheduler.max_batch = 0  # forget earlier tests
    conversations = [[{"role": "user", "content": f"tell me about {w}"}]
                     for w in "salt iron wool glass amber cedar linen basalt".split()]
    got: dict[int, str] = {}
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        barrier.wait()
        chunks = client.chat.completions.create(model=MODEL, messages=conversations[i], max_tokens=24, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in chunks)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert scheduler.max_batch > 1, "the streams should have shared steps"
    assert [got.get(i) for i in range(8)] == [embedded.chat(c, SamplingParams(max_new_tokens=24))
                                              for c in conversations]


def test_a_request_whose_client_left_before_it_started_still_ends(embedded) -> None:
    """A job cancelled while it waited for the worker (its client left during a long step) gets a
    Finished event, so the handler waiting on it ends instead of hanging until shutdown."""
    import asyncio

    from runtime.metrics import Metrics
    from runtime.serve import EngineWorker, Finished, Job, results

    metrics = Metrics("m", lambda: 0, lambda: 0)

    async def main() -> list:
        worker = EngineWorker(embedded, max_batch=1)
        worker.metrics = metrics
        job = Job([9707, 11], SamplingParams(max_new_tokens=2), asyncio.get_running_loop(), asyncio.Queue())
        job.cancelled.set()
        worker._start(job)  # what the worker thread does with the next queued job
        assert not worker.scheduler.has_work()
        return [item async for item in results([job])]

    assert asyncio.run(asyncio.wait_for(main(), 10)) == [(0, Finished("cancelled", 0))]
    assert b'qmoe:request_success_total{finished_reason="cancelled",model_name="m"} 1.0' in metrics.exposition()[0]


def test_an_empty_stop_string_means_no_stop(server) -> None:
    status, got = post(server.url + "/v1/chat/completions", {**GOOD, "stop": ""})
    assert status == 200 and got["choices"][0]["finish_reason"] in ("length", "stop")


def test_usage_reports_prefix_cache_hits(client, embedded) -> None:
    """usage.prompt_tokens_details.cached_tokens: prompt tokens whose K/V the scheduler reused
    (a finished request's slot keeps its K/V). The same prompt again reuses all but its last token
    (which runs for its logits); a follow-up turn reuses at least the previous turn's prompt."""
    prompt = "Prefix caching test: the quick brown fox jumps over the lazy dog."
    ids = embedded.tokenizer.encode(prompt)
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens == len(ids) - 1
    turn = [{"role": "user", "content": "Remember the word cobalt."}]
    first = client.chat.completions.create(model=MODEL, messages=turn, max_tokens=3)
    follow = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "Which word?"}]
    second = client.chat.completions.create(model=MODEL, messages=follow, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True})
    usage = list(second)[-1].usage
    assert len(embedded.tokenizer.encode_chat(turn)) <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    r = client.responses.create(model=MODEL, input="Remember the word cobalt.", max_output_tokens=3)
    r2 = client.responses.create(model=MODEL, input="Which word?", previous_response_id=r.id, max_output_tokens=3)
    assert r.usage.input_tokens <= r2.usage.input_tokens_details.cached_tokens < r2.usage.input_tokens
