"""vLLM's min_tokens, allowed_token_ids, bad_words, include_stop_str_in_output, skip_special_tokens
and prompt_logprobs through a live `qmoe serve` (official client and raw HTTP).

References: the embedded runtime run alone with the same parameters (each field's own semantics
are tested against independent references in tests/runtime/test_vllm_fields.py); prompt_logprobs
against transformers' log_softmax (<= 1e-4) and ranks against numpy over the engine's own logits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from runtime.engine import GenerationResult
from runtime.sampling import SamplingParams

from .conftest import MODEL
from .test_serve_api import post

HELLO: Any = [{"role": "user", "content": "Write about experts and routers, 你好"}]
IM_START = 151644


def solo(embedded, ids: list[int], **sampling) -> GenerationResult:
    result = GenerationResult(list(ids))
    result.text = "".join(embedded.stream_text(ids, SamplingParams(**sampling), result=result))
    return result


def test_each_field_equals_the_embedded_runtime(client, embedded) -> None:
    ids = embedded.tokenizer.encode_chat(HELLO)
    eos = embedded.tokenizer.eos_token_ids[0]
    base = solo(embedded, ids, max_new_tokens=10)
    stop = base.text[4:6]
    cases: list[dict[str, Any]] = [
        {"min_tokens": 4, "logit_bias": {str(eos): 100}},
        {"allowed_token_ids": [11, 220, 9707, 1879]},
        {"bad_words": ["hello", base.text[:2]], "logit_bias": {str(embedded.tokenizer.encode("hello")[0]): 100}},
        {"stop": [stop], "include_stop_str_in_output": True},
        {"skip_special_tokens": False, "logit_bias": {str(IM_START): 100}},
        {"stop": [stop], "min_tokens": 8},
    ]
    for extra in cases:
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, extra_body=extra)
        sampling = {k: v for k, v in extra.items() if k != "logit_bias"}
        bias = {int(k): v for k, v in extra.get("logit_bias", {}).items()}
        expected = solo(embedded, ids, max_new_tokens=10, logit_bias=bias, **sampling)
        got = r.choices[0]
        answer = (got.message.content, got.finish_reason, r.usage.completion_tokens)
        assert answer == (expected.text, expected.finish_reason, len(expected.tokens)), extra
        without = solo(embedded, ids, max_new_tokens=10, logit_bias=bias, stop=extra.get("stop", ()))
        assert answer != (without.text, without.finish_reason, len(without.tokens)), f"{extra} changes nothing"
    # what each case shows, on the server's own outputs
    forced = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10,
                                            extra_body={"min_tokens": 4, "logit_bias": {str(eos): 100}})
    assert forced.usage.completion_tokens == 5 and forced.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, stop=[stop],
                                       extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].message.content == base.text[: base.text.index(stop) + len(stop)]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, logit_bias={str(IM_START): 100},
                                       logprobs=True, extra_body={"skip_special_tokens": False})
    assert r.choices[0].message.content == "<|im_start|>" * 2
    assert [(e.token, bytes(e.bytes)) for e in r.choices[0].logprobs.content] == [("<|im_start|>", b"<|im_start|>")] * 2


@pytest.mark.parametrize("stream", [False, True])
def test_completions_stream_and_whole_agree(client, embedded, stream: bool) -> None:
    prompt = "Routers pick experts"
    ids = embedded.tokenizer.encode(prompt)
    base = solo(embedded, ids, max_new_tokens=8)
    stop = base.text[3:5]
    extra = {"include_stop_str_in_output": True, "min_tokens": 1, "bad_words": ["the"]}
    kw = dict(model=MODEL, prompt=prompt, max_tokens=8, stop=[stop], extra_body=extra)
    expected = solo(embedded, ids, max_new_tokens=8, stop=[stop], include_stop_str_in_output=True, min_tokens=1,
                    bad_words=["the"])
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    else:
        r = client.completions.create(**kw)
        text, reason = r.choices[0].text, [r.choices[0].finish_reason]
    assert (text, reason) == (expected.text, [expected.finish_reason])


def check_prompt_logprobs(entries: list, ids: list[int], k: int, embedded, hf) -> None:
    """vLLM's shape, values against transformers, ranks against numpy over the engine's logits."""
    from tests.helpers import prompt_logits

    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    own = prompt_logits(embedded, ids).astype(np.float64)
    assert len(entries) == len(ids) and entries[0] is None
    decode = embedded.tokenizer.decode
    for i in range(1, len(ids)):
        entry, row = entries[i], ref[i - 1]
        assert next(iter(entry)) == str(ids[i])  # the prompt's token first, then the alternatives
        best = [int(t) for t in np.argsort(-row, kind="stable")[:k]]
        assert set(entry) == {str(ids[i]), *map(str, best)}
        for t, v in entry.items():
            assert set(v) == {"logprob", "rank", "decoded_token"}
            assert abs(v["logprob"] - row[int(t)]) < 1e-4 and v["decoded_token"] == decode([int(t)], False)
        for place, t in enumerate(best, start=1):  # vLLM: the alternatives rank 1..k (the prompt's token too)
            assert entry[str(t)]["rank"] == place
        if ids[i] not in best:  # its rank among the whole vocabulary
            assert entry[str(ids[i])]["rank"] == int(np.count_nonzero(own[i - 1] > own[i - 1, ids[i]])) + 1 > k


def test_completion_prompt_logprobs_per_choice_with_echo(server, embedded, tiny_checkpoint) -> None:
    """A batch of two prompts, n=2: every choice carries its prompt's prompt_logprobs; echo's
    logprobs (2 alternatives) come from the same scoring pass and agree."""
    from tests.helpers import hf_model

    hf = hf_model(tiny_checkpoint)
    prompts = ["The router sends each token to experts; 路由器", "Experts"]
    status, body = post(server.url + "/v1/completions", {
        "model": MODEL, "prompt": prompts, "max_tokens": 3, "n": 2, "echo": True, "logprobs": 2,
        "prompt_logprobs": 4})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for c, prompt in zip(body["choices"], [p for p in prompts for _ in range(2)]):
        ids = embedded.tokenizer.encode(prompt)
        check_prompt_logprobs(c["prompt_logprobs"], ids, 4, embedded, hf)
        lp = c["logprobs"]
        for i in range(1, len(ids)):  # echo's entries equal prompt_logprobs' values
            assert lp["token_logprobs"][i] == c["prompt_logprobs"][i][str(ids[i])]["logprob"]
            assert len(lp["top_logprobs"][i]) <= 3
    assert body["choices"][0]["prompt_logprobs"] == body["choices"][1]["prompt_logprobs"]
    # without echo, and 0 alternatives: the prompt's tokens only
    status, body = post(server.url + "/v1/completions", {"model": MODEL, "prompt": "Experts route", "max_tokens": 2,
                                                          "prompt_logprobs": 0})
    entries = body["choices"][0]["prompt_logprobs"]
    ids = embedded.tokenizer.encode("Experts route")
    assert [list(e) for e in entries[1:]] == [[str(t)] for t in ids[1:]] and entries[0] is None
    assert "prompt_logprobs" not in post(server.url + "/v1/completions",
                                         {"model": MODEL, "prompt": "x", "max_tokens": 1})[1]["choices"][0]


def test_chat_prompt_logprobs_at_the_top_level(server, embedded, tiny_checkpoint) -> None:
    from tests.helpers import hf_model

    status, body = post(server.url + "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2,
                                                               "prompt_logprobs": 2})
    assert status == 200, body
    ids = embedded.tokenizer.encode_chat(HELLO)
    check_prompt_logprobs(body["prompt_logprobs"], ids, 2, embedded, hf_model(tiny_checkpoint))
    assert body["prompt_logprobs"][1][str(ids[1])]["decoded_token"] == "system"
    assert "prompt_logprobs" not in body["choices"][0]


def test_concurrent_requests_with_different_fields_equal_solo_runs(server, client, embedded) -> None:
    """Requests sharing the server's batched steps: each equals its run alone."""
    eos = embedded.tokenizer.eos_token_ids[0]
    ids = embedded.tokenizer.encode_chat(HELLO)
    base = solo(embedded, ids, max_new_tokens=10)
    stop = base.text[5:7]
    cases: list[dict[str, Any]] = [
        {"min_tokens": 6, "logit_bias": {eos: 100}},
        {"allowed_token_ids": list(range(2000, 2300)), "temperature": 1.0, "seed": 3},
        {"bad_words": [base.text[:3], "hello"]},
        {"stop": [stop], "include_stop_str_in_output": True},
        {"skip_special_tokens": False, "logit_bias": {IM_START: 8}, "temperature": 1.0, "seed": 8},
        {"min_tokens": 10, "stop": [stop], "ignore_eos": True},
    ] * 2

    def ask(extra: dict[str, Any]) -> tuple[str, str, int]:
        body = {**extra}
        if "logit_bias" in body:
            body["logit_bias"] = {str(k): v for k, v in body["logit_bias"].items()}
        kw = {k: body.pop(k) for k in ("temperature", "seed", "stop", "logit_bias") if k in body}
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, extra_body=body, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(ask, cases))
    plain = ("logit_bias", "temperature", "seed", "stop", "ignore_eos")
    for extra, answer in zip(cases, got):
        expected = solo(embedded, ids, max_new_tokens=10, **extra)
        assert answer == (expected.text, expected.finish_reason, len(expected.tokens)), extra
        without = solo(embedded, ids, max_new_tokens=10, **{k: v for k, v in extra.items() if k in plain})
        assert answer != (without.text, without.finish_reason, len(without.tokens)), f"{extra} changes nothing"
    assert server.app.state.service.worker.scheduler.max_batch > 1


@pytest.mark.parametrize("extra, param, message", [
    ({"min_tokens": -1}, "min_tokens", "min_tokens must be an integer >= 0"),
    ({"min_tokens": "2"}, "min_tokens", "min_tokens must be an integer"),
    ({"min_tokens": 5}, "min_tokens", "min_tokens must be at most"),  # max_tokens is 4
    ({"allowed_token_ids": []}, "allowed_token_ids", "must not be empty"),
    ({"allowed_token_ids": 5}, "allowed_token_ids", "a list of token ids"),
    ({"allowed_token_ids": [1, -1]}, "allowed_token_ids", "integer >= 0"),
    ({"allowed_token_ids": [1.5]}, "allowed_token_ids", "integer >= 0"),
    ({"allowed_token_ids": [151646]}, "allowed_token_ids", "token ids in [0, 151646)"),
    ({"allowed_token_ids": [151645], "min_tokens": 1}, "min_tokens", "all stop tokens"),
    ({"bad_words": "hello"}, "bad_words", "a list of strings"),
    ({"bad_words": [""]}, "bad_words", "non-empty strings"),
    ({"bad_words": [" "]}, "bad_words", "non-empty strings"),
    ({"bad_words": [7]}, "bad_words", "non-empty strings"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output", "true or false"),
    ({"skip_special_tokens": 0}, "skip_special_tokens", "true or false"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "at most 20"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "integer >= 0"),
    ({"prompt_logprobs": True}, "prompt_logprobs", "an integer in [0, 20]"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not available with stream"),
    ({"prompt_logprobs": 0, "stream": True}, "prompt_logprobs", "not available with stream"),
])
def test_bad_values_get_a_400_naming_the_field(server, extra, param, message) -> None:
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": HELLO}),
                       ("/v1/completions", {"model": MODEL, "prompt": "Hi"})):
        status, got = post(server.url + path, {**body, "max_tokens": 4, **extra})
        assert status == 400 and got["error"]["param"] == param and message in got["error"]["message"], got
        assert "\n" not in got["error"]["message"]
