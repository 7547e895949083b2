"""n-gram speculative decoding (runtime/speculative.py) in the continuous-batching scheduler.

References: the drafts against a brute-force search; every output against the same scheduler
without speculation (token for token, text, finish reason, log-probabilities <= 1e-5): the
verification samples each position as plain decoding does, so only floating-point batch variance
(~1e-6 in this model's logits) could tell them apart, and these cases have no near-ties.
The random tiny model never repeats itself, so drafts are made to happen: a constraint that makes
the output copy a sentence of the prompt (every draft kept), and a logit bias that confines the
output to four tokens (repeats, with drafts often rejected).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from runtime.batching import BatchScheduler
from runtime.sampling import SamplingParams
from runtime.speculative import NgramSpeculation, SpeculationError
from runtime.structured import StructuredOutput
from tests.helpers import run_requests

QUOTE = "The mixture of experts routes each token to eight of sixty-four experts, and a shared expert sees every token."


@pytest.fixture(scope="module")
def engine(tiny_artifact: Path):
    import runtime

    return runtime.load(tiny_artifact)


def reference_propose(tokens: list[int], k: int, high: int, low: int) -> list[int]:
    for n in range(high, low - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        starts = [i for i in range(len(tokens) - n) if tokens[i: i + n] == suffix]
        if starts:
            return tokens[starts[-1] + n: starts[-1] + n + k]
    return []


def test_drafts_equal_a_brute_force_search():
    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(4) for _ in range(rng.randint(0, 40))]
        k, high = rng.randint(1, 6), rng.randint(1, 5)
        low, limit = rng.randint(1, high), rng.randint(0, 8)
        got = NgramSpeculation(k, high, low).propose(np.array(tokens, np.int64), limit)
        assert got == reference_propose(tokens, min(k, limit), high, low), (tokens, k, high, low, limit)


@pytest.mark.parametrize("config, match", [
    ('{"method": "eagle", "num_speculative_tokens": 3}', "only \"ngram\""),
    ('{"method": "ngram"}', "num_speculative_tokens is required"),
    ('{"num_speculative_tokens": 0}', "num_speculative_tokens must be an integer >= 1"),
    ('{"num_speculative_tokens": 33}', "at most 32"),
    ('{"num_speculative_tokens": 3, "prompt_lookup_min": 5, "prompt_lookup_max": 2}', "must be <="),
    ('{"num_speculative_tokens": 3, "model": "x"}', "'model' is not supported"),
    ('{"num_speculative_tokens": true}', "num_speculative_tokens must be an integer"),
    ('{"num_speculative_tokens": 3, "prompt_lookup_min": 0}', "prompt_lookup_min must be an integer >= 1, got 0"),
    ('{"num_speculative_tokens": 3, "prompt_lookup_min": "3"}', "prompt_lookup_min must be an integer >= 1, got '3'"),
    ("[3]", "a JSON object"),
    ("{", "not valid JSON"),
])
def test_bad_configs_are_one_line_errors(config: str, match: str):
    with pytest.raises(SpeculationError, match=match) as e:
        NgramSpeculation.from_config(config)
    assert "\n" not in str(e.value)


def test_config_defaults_follow_vllms_names():
    assert NgramSpeculation.from_config('{"method": "ngram", "num_speculative_tokens": 5}') == NgramSpeculation(5, 4, 2)
    assert NgramSpeculation.from_config({"num_speculative_tokens": 3, "prompt_lookup_max": 6,
                                         "prompt_lookup_min": 1}) == NgramSpeculation(3, 6, 1)
    assert NgramSpeculation.from_config({"num_speculative_tokens": 3, "prompt_lookup_max": 1}) == NgramSpeculation(3, 1, 1)
    assert NgramSpeculation.from_config({"num_speculative_tokens": 3, "prompt_lookup_min": 5}) == NgramSpeculation(3, 5, 5)
    assert NgramSpeculation.from_config('{"num_speculative_tokens": 3, "prompt_lookup_max": null, '
                                        '"prompt_lookup_min": null}') == NgramSpeculation(3, 4, 2)


def requests(engine) -> list[tuple[list[int], SamplingParams]]:
    tok = engine.tokenizer
    copy = tok.encode(f"Repeat exactly: {QUOTE}\nAnswer: ")
    free = tok.encode("Experts and routers, 你好")
    four = {t: 40.0 for t in tok.encode(" red green blue red")[:4]}  # the output stays among these
    choice = StructuredOutput.choice([QUOTE])
    return [
        (copy, SamplingParams(max_new_tokens=40, structured=choice)),
        (copy, SamplingParams(max_new_tokens=40, structured=choice, temperature=1.0, seed=7, logprobs=3)),
        (copy, SamplingParams(max_new_tokens=40, structured=choice, stop=("sixty",))),  # a stop string mid-draft
        (copy, SamplingParams(max_new_tokens=9, structured=choice)),  # max tokens mid-draft
        (free, SamplingParams(max_new_tokens=24, logit_bias=four)),
        (free, SamplingParams(max_new_tokens=24, logit_bias=four, temperature=1.3, seed=3, top_k=3,
                              repetition_penalty=1.1, presence_penalty=0.2, logprobs=2)),
        (free, SamplingParams(max_new_tokens=12, temperature=0.8, seed=11, top_p=0.9)),  # no drafts
    ]


def run(engine, reqs, speculation, slots: int = 4, capacity: int | None = None):
    s = BatchScheduler(engine, max_slots=slots, capacity=capacity, speculation=speculation)
    return run_requests(s, reqs), s


def assert_same(a, b) -> None:
    for (ra, ta), (rb, tb) in zip(a, b):
        assert rb.tokens == ra.tokens and tb == ta and rb.finish_reason == ra.finish_reason
        if ra.logprobs is not None:
            assert [x.token for x in rb.logprobs] == [x.token for x in ra.logprobs]
            np.testing.assert_allclose([x.logprob for x in rb.logprobs], [x.logprob for x in ra.logprobs], atol=1e-5)
            assert [[i for i, _ in x.top] for x in rb.logprobs] == [[i for i, _ in x.top] for x in ra.logprobs]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_speculation_gives_the_plain_output_in_fewer_steps(engine, k: int):
    reqs = requests(engine)
    plain, s0 = run(engine, reqs, None)
    spec, s1 = run(engine, reqs, NgramSpeculation(k, 4, 1))
    assert_same(plain, spec)
    assert plain[0][1] == QUOTE and plain[2][1] == QUOTE[: QUOTE.index("sixty")]
    assert s0.draft_tokens == 0 and 0 < s1.accepted_tokens < s1.draft_tokens  # kept and rejected drafts both
    assert s1.steps < s0.steps


def test_one_request_at_a_time_and_near_the_capacity(engine):
    reqs = requests(engine)[:1] + requests(engine)[4:5]
    n = max(len(ids) + p.max_new_tokens for ids, p in reqs)
    for slots in (1, 2):
        plain, _ = run(engine, reqs, None, slots, capacity=n)
        spec, s = run(engine, reqs, NgramSpeculation(8, 3, 1), slots, capacity=n)
        assert_same(plain, spec)
        assert s.accepted_tokens > 0


def test_kept_rows_after_speculation_serve_the_next_request(engine):
    """A finished request's kept K/V excludes its rejected drafts: a follow-up that reuses it
    gives what it gives from scratch."""
    ids, p = requests(engine)[4]
    s = BatchScheduler(engine, max_slots=1, speculation=NgramSpeculation(6, 3, 1))
    first = s.submit(ids, p)
    while s.has_work():
        s.step()
    assert s.draft_tokens > s.accepted_tokens > 0
    follow = ids + first.result.tokens + engine.tokenizer.encode(" and then")
    second = s.submit(follow, p)
    while s.has_work():
        s.step()
    assert s.reused_tokens >= len(ids) + len(first.result.tokens) - 1
    fresh, _ = run(engine, [(follow, p)], None, 1)
    assert second.result.tokens == fresh[0][0].tokens


def test_the_server_reports_draft_and_accepted_tokens(engine):
    from starlette.testclient import TestClient

    from runtime.serve import create_app

    app = create_app(engine, "m", {"temperature": 0.0}, speculation=NgramSpeculation(4, 4, 1))
    body = {"prompt": f"Repeat exactly: {QUOTE}\nAnswer: ", "max_tokens": 40, "guided_choice": [QUOTE]}
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == QUOTE
        metrics = client.get("/metrics").text
    values = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("qmoe:spec_decode")}
    assert values["qmoe:spec_decode_num_draft_tokens_total"] >= values["qmoe:spec_decode_num_accepted_tokens_total"] > 0


def test_a_kept_draft_token_that_ends_the_request_counts_as_accepted(engine):
    """The accepted count is the draft tokens that verification sampled (vLLM's
    spec_decode_num_accepted_tokens), the one that ends the request too (a stop string, a stop
    token): counted here against the drafts each step fed and the tokens it gave."""
    tok = engine.tokenizer
    quote = " red green blue yellow"
    ids = tok.encode("Say:" + quote + "\nSay:")
    spec = NgramSpeculation(4, 3, 1)
    drafts: list[list[int]] = []

    class Recording:  # the same drafts, recorded per step
        def propose(self, tokens, limit):
            drafts.append(spec.propose(tokens, limit))
            return drafts[-1]

    s = BatchScheduler(engine, max_slots=1, speculation=spec)
    s.speculation = Recording()
    per_step: list[list[int]] = []
    g = s.submit(ids, SamplingParams(max_new_tokens=30, structured=StructuredOutput.choice([quote]), stop=(" blue",)),
                 on_token=lambda t: per_step[-1].append(t))
    while s.has_work():
        per_step.append([])
        s.step()
    assert g.result.finish_reason == "stop" and g.result.tokens == tok.encode(quote)[:3]
    decode = per_step[1:]  # the first step prefills (no draft)
    assert len(drafts) == len(decode)
    kept = sum(next((i for i, (a, b) in enumerate(zip(d, out)) if a != b), min(len(d), len(out)))
               for d, out in zip(drafts, decode))
    assert kept == 2  # " green" and " blue", the stop string's last token
    assert s.accepted_tokens == kept and s.draft_tokens == sum(map(len, drafts))


def test_drafts_never_make_a_step_longer_than_the_prefill_chunk(tiny_artifact):
    """A step feeds 1 + draft rows per slot: they fit the engine's prefill chunk as prompt chunks
    do (a TensorRT engine refuses a step longer than its max_chunk, which caps prefill_chunk; a
    failed step ends every running request). Here the backend refuses as TensorRT's does."""
    import runtime
    from runtime.errors import QmoeError

    engine = runtime.load(tiny_artifact, prefill_chunk=4)
    step = engine.backend.step

    def bounded(cache, ids, *rest):
        if ids.shape[1] > 4:
            raise QmoeError(f"a prefill chunk of {ids.shape[1]} tokens exceeds the engine's 4")
        return step(cache, ids, *rest)

    reqs = requests(engine)[:1] + requests(engine)[4:5]
    plain, _ = run(engine, reqs, None, 2)
    engine.backend.step = bounded
    spec, s = run(engine, reqs, NgramSpeculation(8, 3, 1), 2)
    assert_same(plain, spec)
    assert s.accepted_tokens > 0


def test_inter_token_latency_is_observed_once_per_step(engine):
    """Kept drafts arrive with their step's token: one inter-token latency per step (vLLM's), every
    token counted."""
    from starlette.testclient import TestClient

    from runtime.serve import create_app

    app = create_app(engine, "m", {"temperature": 0.0}, speculation=NgramSpeculation(4, 4, 1))
    body = {"prompt": f"Repeat exactly: {QUOTE}\nAnswer: ", "max_tokens": 40, "guided_choice": [QUOTE]}
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=body).json()
        metrics = client.get("/metrics").text
    values = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith(("qmoe:inter_token_latency_seconds_count", "qmoe:generation_tokens_total"))}
    steps = app.state.service.worker.scheduler.steps
    tokens = r["usage"]["completion_tokens"]
    assert values["qmoe:generation_tokens_total"] == tokens
    assert values["qmoe:inter_token_latency_seconds_count"] < tokens - 1  # drafts kept: fewer gaps than tokens
    assert values["qmoe:inter_token_latency_seconds_count"] <= steps - 1  # at most one per decode step
