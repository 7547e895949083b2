"""`n`, log-probabilities, presence/frequency penalties, logit_bias and min_p through the OpenAI
API (official client, live server).

References: each choice equals the embedded runtime run alone with the same parameters (choice i
of a seeded request: seed `choice_seed(seed, i)`); reported log-probabilities equal torch's
log_softmax of the embedded engine's raw logits for the same tokens (<= 1e-4: the server's steps
may batch differently, ~1e-6 in the logits).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from runtime.engine import GenerationResult
from runtime.sampling import SamplingParams, choice_seed

from .conftest import MODEL

N = 10
HELLO: Any = [{"role": "user", "content": "Write about experts and routers, 你好"}]


def solo(embedded, ids: list[int], **sampling) -> GenerationResult:
    result = GenerationResult(list(ids))
    result.text = "".join(embedded.stream_text(ids, SamplingParams(**sampling), result=result))
    return result


def raw_logprobs(embedded, ids: list[int], tokens: list[int]) -> np.ndarray:
    """[len(tokens), V] float64: torch log_softmax of the embedded engine's logits when it is fed
    `tokens` (greedy with every other token banned reproduces them, the raw logits are unbiased)."""
    rows = []
    for i in range(len(tokens)):
        r = embedded.generate([ids + tokens[:i]], SamplingParams(max_new_tokens=1), output_logits=True)[0]
        rows.append(torch.log_softmax(torch.from_numpy(r.logits[0].astype(np.float64)), -1).numpy())
    return np.stack(rows)


def test_chat_logprobs_are_the_models(client, embedded) -> None:
    ids = embedded.tokenizer.encode_chat(HELLO)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N, logprobs=True, top_logprobs=4)
    choice = r.choices[0]
    expected = solo(embedded, ids, max_new_tokens=N)
    assert choice.message.content == expected.text
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens == len(expected.tokens)
    ref = raw_logprobs(embedded, ids, expected.tokens)
    tokenizer = embedded.tokenizer
    for entry, tok, row in zip(content, expected.tokens, ref):
        assert bytes(entry.bytes) == tokenizer.token_bytes(tok)
        assert entry.token == tokenizer.decode([tok], skip_special_tokens=False)
        assert abs(entry.logprob - row[tok]) < 1e-4
        assert len(entry.top_logprobs) == 4
        best = np.argsort(-row, kind="stable")[:4]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], row[best], atol=1e-4)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-9  # greedy: the chosen token is the top one
    # every token's bytes, in order, are the reply's bytes (the eos token, if any, adds its own)
    joined = b"".join(bytes(e.bytes) for e in content)
    assert joined.decode("utf-8", errors="replace").startswith(expected.text)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert plain.choices[0].logprobs is None
    without_top = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, logprobs=True)
    assert [len(e.top_logprobs) for e in without_top.choices[0].logprobs.content] == [0, 0]


def test_streamed_chat_logprobs_add_up_to_the_whole_responses(client) -> None:
    kw = dict(model=MODEL, messages=HELLO, max_tokens=N, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob, e.bytes) for e in entries] == \
        [(e.token, e.logprob, e.bytes) for e in whole.logprobs.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs(client, embedded, stream: bool) -> None:
    prompt = "Routers pick experts"
    ids = embedded.tokenizer.encode(prompt)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=N, logprobs=3)
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
        tokens = [t for p in parts for t in p.tokens]
        token_logprobs = [t for p in parts for t in p.token_logprobs]
        tops = [t for p in parts for t in p.top_logprobs]
        offsets = [t for p in parts for t in p.text_offset]
    else:
        choice = client.completions.create(**kw).choices[0]
        text, lp = choice.text, choice.logprobs
        tokens, token_logprobs, tops, offsets = lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    expected = solo(embedded, ids, max_new_tokens=N)
    assert text == expected.text and len(tokens) == N
    ref = raw_logprobs(embedded, ids, expected.tokens)
    decode = embedded.tokenizer.decode
    assert tokens == [decode([t], skip_special_tokens=False) for t in expected.tokens]
    np.testing.assert_allclose(token_logprobs, [row[t] for row, t in zip(ref, expected.tokens)], atol=1e-4)
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    for top, row, tok in zip(tops, ref, expected.tokens):
        assert decode([tok], skip_special_tokens=False) in top  # the chosen token is always there
        best = {decode([int(i)], skip_special_tokens=False): row[i] for i in np.argsort(-row, kind="stable")[:3]}
        assert set(best) <= set(top) and len(top) <= 4
        for t, v in best.items():
            assert abs(top[t] - v) < 1e-4


def test_n_seeded_choices_are_reproducible_and_distinct(client, embedded) -> None:
    sampling = dict(temperature=1.0, top_p=0.95, seed=99)
    ids = embedded.tokenizer.encode_chat(HELLO)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N, n=3, **sampling)
    assert [c.index for c in r.choices] == [0, 1, 2]
    expected = [solo(embedded, ids, max_new_tokens=N, temperature=1.0, top_p=0.95, seed=choice_seed(99, i))
                for i in range(3)]
    assert [c.message.content for c in r.choices] == [e.text for e in expected]
    assert len({c.message.content for c in r.choices}) == 3, "seeded choices should differ"
    assert r.usage.completion_tokens == sum(len(e.tokens) for e in expected)
    assert r.usage.prompt_tokens == len(ids)  # the prompt counts once
    # streamed: each index's deltas add up to the same text; one role chunk and one finish per index
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N, n=3, stream=True,
                                                 stream_options={"include_usage": True}, **sampling))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)}
    assert [texts[i] for i in range(3)] == [e.text for e in expected]
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert sorted(roles) == [0, 1, 2] and finished == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_n_completions_greedy_and_more_choices_than_slots(server, client, embedded) -> None:
    """Greedy choices are all the same; 12 choices on 8 slots queue and all finish."""
    r = client.completions.create(model=MODEL, prompt="Experts", max_tokens=4, n=12, temperature=0)
    expected = embedded.complete("Experts", SamplingParams(max_new_tokens=4))
    assert [c.index for c in r.choices] == list(range(12))
    assert all(c.text == expected for c in r.choices)


def test_penalties_bias_and_min_p_match_embedded(client, embedded) -> None:
    ids = embedded.tokenizer.encode_chat(HELLO)
    banned = solo(embedded, ids, max_new_tokens=N).tokens[0]
    sampling = dict(presence_penalty=-1.5, frequency_penalty=0.5, logit_bias={str(banned): -100, "11": 3.5})
    expected = solo(embedded, ids, max_new_tokens=N, **sampling)
    assert banned not in expected.tokens
    assert expected.text != solo(embedded, ids, max_new_tokens=N).text
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N, **sampling)
    assert r.choices[0].message.content == expected.text
    # min_p (vLLM's extension) with sampling
    kw = dict(temperature=1.2, seed=5, min_p=0.3)
    expected = solo(embedded, ids, max_new_tokens=N, **kw)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N, temperature=1.2, seed=5,
                                       extra_body={"min_p": 0.3})
    assert r.choices[0].message.content == expected.text


def test_a_client_leaving_an_n_stream_cancels_every_choice(server, client, embedded) -> None:
    scheduler = server.app.state.service.worker.scheduler
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20000, n=4, stream=True)
    for k, _ in enumerate(stream):
        if k == 6:
            break
    stream.close()
    done = threading.Event()

    def idle() -> None:
        while scheduler.running or scheduler.has_work():
            threading.Event().wait(0.05)
        done.set()

    threading.Thread(target=idle, daemon=True).start()
    assert done.wait(10), "the cancelled choices should leave the scheduler"


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema(client, embedded, stream: bool) -> None:
    import json

    import jsonschema

    from runtime.structured import StructuredOutput

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    kw = dict(model=MODEL, messages=HELLO, max_tokens=40, response_format=fmt, temperature=0.9, seed=2)
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        r = client.chat.completions.create(**kw)
        text, reason = r.choices[0].message.content, [r.choices[0].finish_reason]
    jsonschema.validate(json.loads(text), PERSON)
    assert reason == ["stop"]
    ids = embedded.tokenizer.encode_chat(HELLO)
    assert text == solo(embedded, ids, max_new_tokens=40, temperature=0.9, seed=2,
                        structured=StructuredOutput.json_schema(PERSON)).text


def test_vllm_structured_output_fields(client) -> None:
    import re

    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=10, n=3, temperature=1.5, seed=1,
                                  extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    assert all(c.text in ("alpha", "beta", "gamma") for c in r.choices)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20,
                                       extra_body={"structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}})
    assert re.fullmatch("[0-9]{2}:[0-9]{2}", r.choices[0].message.content)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "yaml"}}, "response_format", "response_format must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "invalid json_schema"),
    ({"guided_regex": "(unclosed"}, "guided_regex", "invalid regex"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format", "only one"),
    ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs", "invalid grammar"),
    ({"guided_grammar": 'start: "x" start'}, None, "structured output failed"),  # no finite string: found
    # only when llguidance's item limit stops it a few tokens in; still a 400
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}, None,
     "structured output failed"),  # compiles; llguidance's item limit stops it a few tokens in: still a 400
])
def test_bad_structured_output_requests(server, body, param, message) -> None:
    from .test_serve_api import post

    status, got = post(server.url + "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 4,
                                                              **body})
    assert status == 400 and got["error"]["param"] == param and message in got["error"]["message"], got
    assert "\n" not in got["error"]["message"]


@pytest.mark.parametrize("max_tokens, stream", [(0, False), (5, False), (5, True)])
def test_echo_scores_the_prompt_like_transformers(client, embedded, tiny_checkpoint, max_tokens, stream) -> None:
    """What evaluation harnesses (lm-eval's local-completions) send: echo + logprobs, max_tokens 0.
    Every prompt token after the first gets log P(token | tokens before) from transformers' forward."""
    from tests.helpers import hf_model

    prompt = "The router sends each token to eight experts; 路由器"
    ids = embedded.tokenizer.encode(prompt)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2, temperature=0)
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
        lp = type("LP", (), {k: [x for p in parts for x in getattr(p, k)] for k in
                             ("tokens", "token_logprobs", "top_logprobs", "text_offset")})
        usage_tokens = None
    else:
        r = client.completions.create(**kw)
        text, lp, usage_tokens = r.choices[0].text, r.choices[0].logprobs, r.usage.completion_tokens
    generated = embedded.complete(prompt, SamplingParams(max_new_tokens=max_tokens)) if max_tokens else ""
    assert text == prompt + generated
    assert usage_tokens in (None, max_tokens)
    with torch.no_grad():
        logits = hf_model(tiny_checkpoint)(torch.tensor([ids])).logits[0].double()
    ref = torch.log_softmax(logits, -1).numpy()
    n = len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:n], [ref[i - 1, ids[i]] for i in range(1, n)], atol=1e-4)
    for i in range(1, n):
        best = np.sort(ref[i - 1])[::-1][:2]
        assert sorted(lp.top_logprobs[i].values(), reverse=True)[:2] == pytest.approx(best, abs=1e-4)
    decode = embedded.tokenizer.decode
    assert lp.tokens[:n] == [decode([t], skip_special_tokens=False) for t in ids]
    assert len(lp.tokens) == n + max_tokens
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    # token by token the text is the prompt, up to 路 whose bytes two tokens share (each alone: U+FFFD)
    assert "".join(lp.tokens[:n]).startswith(prompt[: prompt.index("路")])


def test_echo_without_logprobs_and_its_errors(client, server) -> None:
    from .test_serve_api import post

    r = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=0, echo=True)
    assert r.choices[0].text == "Hi there" and r.choices[0].logprobs is None and r.usage.completion_tokens == 0
    for body, param in [({"model": MODEL, "messages": HELLO, "echo": True}, "echo"),
                        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
                        ({"model": MODEL, "prompt": "x", "max_tokens": False, "echo": True}, "max_tokens"),
                        ({"model": MODEL, "prompt": "x", "max_tokens": 0.0, "echo": True}, "max_tokens"),
                        ({"model": MODEL, "prompt": "x", "use_beam_search": True}, "max_tokens"),
                        ({"model": MODEL, "prompt": "x", "guided_choice": {"a": 1}}, "guided_choice"),
                        ({"model": MODEL, "prompt": "x", "echo": "yes"}, "echo")]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, got = post(server.url + path, body)
        assert status == 400 and got["error"]["param"] == param, got


def test_vllm_stop_token_ids_and_ignore_eos(client, embedded) -> None:
    ids = embedded.tokenizer.encode_chat(HELLO)
    greedy = solo(embedded, ids, max_new_tokens=N)
    third = greedy.tokens[2]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N, extra_body={"stop_token_ids": [third]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3
    # eos stays a stop token: forcing it ends at once, unless ignore_eos
    eos = embedded.tokenizer.eos_token_ids[0]
    forced = {"logit_bias": {str(eos): 100}, "stop_token_ids": [third]}
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N, extra_body=forced)
    assert r.usage.completion_tokens == 1 and r.choices[0].message.content == ""
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4,
                                       extra_body={"logit_bias": {str(eos): 100}, "ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    # ignore_eos ignores eos only: other stop ids still stop (vLLM's behaviour)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=N,
                                       extra_body={"stop_token_ids": [third], "ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3


def test_special_tokens_in_logprobs_are_empty_like_the_text(client) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=1,
                                  logit_bias={"151644": 100})  # <|im_start|>: special, not eos
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "" and lp.tokens == ["", "", ""] and lp.text_offset == [0, 0, 0]
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, logprobs=True,
                                          logit_bias={"151644": 100})
    assert [(e.token, e.bytes) for e in chat.choices[0].logprobs.content] == [("", []), ("", [])]


def test_a_sampled_special_token_appears_once_among_its_alternatives(embedded) -> None:
    from runtime.sampling import TokenLogprob
    from runtime.serve import GenerationRequest, _Logprobs

    eos = embedded.tokenizer.eos_token_ids[0]
    entry = TokenLogprob(eos, -0.1, ((eos, -0.1), (11, -2.5)))
    for kind in ("completion", "chat"):
        req = GenerationRequest(kind, [9707], SamplingParams(logprobs=2), False, False)
        out = _Logprobs(req, embedded.tokenizer).render([entry])
        if kind == "completion":
            assert out["top_logprobs"] == [{"": -0.1, ",": -2.5}] and out["tokens"] == [""]
        else:
            assert [t["token"] for t in out["content"][0]["top_logprobs"]] == ["", ","]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_take_a_batch_of_prompts(client, embedded, stream: bool) -> None:
    """OpenAI's batched prompt: choice k * n + i is prompt k's choice i, each equal to that prompt
    run alone with its seed; echo and logprobs per prompt; usage counts each prompt once."""
    prompts: list[Any] = ["Routers pick", "专家", embedded.tokenizer.encode("Experts are")]
    kw = dict(model=MODEL, prompt=prompts, max_tokens=4, n=2, temperature=1.0, seed=3, echo=True, logprobs=1)
    if stream:
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                 for i in range(6)}
        tokens = {i: [t for c in chunks if c.choices and c.choices[0].index == i and c.choices[0].logprobs
                      for t in c.choices[0].logprobs.tokens] for i in range(6)}
        usage = chunks[-1].usage
    else:
        r = client.completions.create(**kw)
        assert [c.index for c in r.choices] == list(range(6))
        texts = {c.index: c.text for c in r.choices}
        tokens = {c.index: c.logprobs.tokens for c in r.choices}
        usage = r.usage
    ids = [embedded.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    for k, (prompt, x) in enumerate(zip(prompts, ids)):
        echoed = prompt if isinstance(prompt, str) else embedded.tokenizer.decode(x, skip_special_tokens=False)
        for i in range(2):
            alone = solo(embedded, x, max_new_tokens=4, temperature=1.0, seed=choice_seed(3, i))
            assert texts[2 * k + i] == echoed + alone.text
            assert len(tokens[2 * k + i]) == len(x) + 4
    assert usage.prompt_tokens == sum(map(len, ids)) and usage.completion_tokens == 6 * 4


def test_too_many_prompts(server) -> None:
    from .test_serve_api import post

    status, got = post(server.url + "/v1/completions", {"model": MODEL, "prompt": ["a"] * 65, "max_tokens": 1})
    assert status == 400 and got["error"]["param"] == "prompt" and "at most 64 prompts" in got["error"]["message"]
