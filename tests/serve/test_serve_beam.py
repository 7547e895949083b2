"""vLLM's use_beam_search on `qmoe serve` (official openai client, live server): the n best beams
of runtime/beam.py (itself checked against transformers in tests/runtime/test_beam.py) run alone
on the embedded engine, best first."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from runtime.beam import BeamSearchParams, beam_search

from .conftest import MODEL
from .test_serve_api import post

HELLO: Any = [{"role": "user", "content": "Hello! What is a mixture of experts?"}]


def test_completions_beams_equal_the_embedded_engine(client, embedded) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France", max_tokens=8, n=3,
                                  extra_body={"use_beam_search": True, "length_penalty": 0.5})
    want = beam_search(embedded, embedded.tokenizer.encode("The capital of France"),
                       BeamSearchParams(num_beams=3, max_new_tokens=8, num_return_sequences=3, length_penalty=0.5))
    assert [c.text for c in r.choices] == [b.text for b in want]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.finish_reason for c in r.choices] == [b.finish_reason for b in want]
    assert r.usage.completion_tokens == sum(len(b.tokens) for b in want)
    # a batch of prompts: choice k * n + i is prompt k's beam i
    r = client.completions.create(model=MODEL, prompt=["The capital of France", "Once upon"], max_tokens=4, n=2,
                                  extra_body={"use_beam_search": True})
    second = beam_search(embedded, embedded.tokenizer.encode("Once upon"),
                         BeamSearchParams(num_beams=2, max_new_tokens=4, num_return_sequences=2))
    assert [c.text for c in r.choices[2:]] == [b.text for b in second] and r.choices[3].index == 3


def test_chat_beams_equal_the_embedded_engine(client, embedded) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, n=2,
                                       extra_body={"use_beam_search": True, "early_stopping": True})
    want = beam_search(embedded, embedded.tokenizer.encode_chat(HELLO),
                       BeamSearchParams(num_beams=2, max_new_tokens=6, num_return_sequences=2, early_stopping=True))
    assert [c.message.content for c in r.choices] == [b.text for b in want]


@pytest.mark.parametrize("body,param", [
    ({"use_beam_search": True, "stream": True}, "stream"),
    ({"use_beam_search": True, "temperature": 0.7}, "temperature"),
    ({"use_beam_search": True, "top_p": 0.5}, "top_p"),
    ({"use_beam_search": True, "n": 17}, "n"),
    ({"use_beam_search": True, "length_penalty": "long"}, "length_penalty"),
    ({"use_beam_search": True, "early_stopping": "sometimes"}, "early_stopping"),
    ({"use_beam_search": True, "length_penalty": 1e308}, "length_penalty"),  # 2 ** 1e308: was a 500
    ({"use_beam_search": True, "length_penalty": 10**400}, "length_penalty"),  # past float: was a 500
    ({"use_beam_search": True, "max_tokens": 10**6}, "max_tokens"),
    ({"use_beam_search": True, "logprobs": True}, "logprobs"),
    ({"use_beam_search": "yes"}, "use_beam_search"),
    ({"use_beam_search": True, "max_tokens": None}, "max_tokens"),
    ({"length_penalty": 2.0}, "length_penalty"),
])
def test_bad_beam_requests_get_a_400(server, body, param) -> None:
    code, out = post(f"{server.url}/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 4, **body})
    assert code == 400, out
    assert out["error"]["param"] == param and "\n" not in out["error"]["message"]


def test_plain_requests_still_work_beside_beams(client, embedded) -> None:
    import threading

    from runtime.sampling import SamplingParams

    got: dict = {}
    t = threading.Thread(target=lambda: got.update(beam=client.completions.create(
        model=MODEL, prompt="A long story", max_tokens=24, n=4, extra_body={"use_beam_search": True})))
    t.start()
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6)
    t.join(60)
    assert plain.choices[0].message.content == embedded.chat(HELLO, SamplingParams(max_new_tokens=6))
    assert len(got["beam"].choices) == 4
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True,
                                  extra_body={"use_beam_search": True})


def test_ignore_eos_keeps_the_request_stop_token_ids(client, embedded) -> None:
    """As without use_beam_search: ignore_eos drops the model's eos ids, stop_token_ids still stop."""
    ids = embedded.tokenizer.encode("The capital of France")
    free = beam_search(embedded, ids, BeamSearchParams(num_beams=2, max_new_tokens=6, num_return_sequences=2,
                                                       ignore_eos=True))
    stop = free[0].tokens[2]
    r = client.completions.create(model=MODEL, prompt="The capital of France", max_tokens=6, n=2,
                                  extra_body={"use_beam_search": True, "ignore_eos": True, "stop_token_ids": [stop]})
    want = beam_search(embedded, ids, BeamSearchParams(num_beams=2, max_new_tokens=6, num_return_sequences=2,
                                                       stop_token_ids=(stop,)))
    assert [c.text for c in r.choices] == [b.text for b in want]
    assert [c.finish_reason for c in r.choices] == [b.finish_reason for b in want] and "stop" in \
        [b.finish_reason for b in want]
