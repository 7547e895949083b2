"""The scheduler's token budget per step (max_step_tokens, vLLM's max_num_batched_tokens):
decoding requests step every step while long prompts prefill in budget-sized pieces, no step
runs more tokens than the budget, and every output equals the run without a budget (the same
scheduler; tokens, text and finish reason; greedy and seeded; with speculation too)."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.batching import BatchScheduler
from runtime.engine import RequestError
from runtime.sampling import SamplingParams
from runtime.speculative import NgramSpeculation
from runtime.structured import StructuredOutput
from tests.helpers import run_requests

QUOTE = "Experts route every token, and the shared expert sees all of them."


@pytest.fixture
def engine(tiny_artifact):
    """A fresh engine whose backend records the tokens of every step."""
    e = runtime.load(tiny_artifact, prefill_chunk=64)
    step = e.backend.step
    e.step_tokens = []

    def recording(cache, ids, q, *rest):
        e.step_tokens.append(int(np.asarray(q).sum()))
        return step(cache, ids, q, *rest)

    e.backend.step = recording
    return e


def prompt(n: int, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(0, 150000, n)]


def workload(engine):
    copy = engine.tokenizer.encode(f"Repeat: {QUOTE}\n")
    return [
        (prompt(150, 1), SamplingParams(max_new_tokens=12)),
        (prompt(20, 2), SamplingParams(max_new_tokens=30, temperature=1.0, seed=3)),
        (prompt(300, 3), SamplingParams(max_new_tokens=8, temperature=0.7, top_k=40, seed=4)),
        (copy, SamplingParams(max_new_tokens=40, structured=StructuredOutput.choice([QUOTE]))),
        (prompt(90, 5), SamplingParams(max_new_tokens=6, logprobs=2)),
    ]


def run(engine, reqs, budget, speculation=None, slots: int = 3):
    s = BatchScheduler(engine, max_slots=slots, max_step_tokens=budget, speculation=speculation)
    return [(r.tokens, text, r.finish_reason) for r, text in run_requests(s, reqs)]


@pytest.mark.parametrize("budget", [3, 7, 40])
def test_outputs_equal_the_unlimited_run_and_no_step_exceeds_the_budget(engine, budget: int):
    reqs = workload(engine)
    free = run(engine, reqs, None)
    assert max(engine.step_tokens) > 128  # without a budget, prompt chunks of several requests share a step
    engine.step_tokens.clear()
    assert run(engine, reqs, budget) == free
    assert max(engine.step_tokens) <= budget
    engine.step_tokens.clear()
    spec = NgramSpeculation(4, 4, 1)
    assert run(engine, reqs, budget, spec) == free
    assert max(engine.step_tokens) <= budget


def test_decoding_requests_step_while_a_long_prompt_prefills(engine):
    s = BatchScheduler(engine, max_slots=2, max_step_tokens=16)
    tokens_at: list[int] = []
    short = s.submit(prompt(10, 7), SamplingParams(max_new_tokens=40, ignore_eos=True))
    s.step()  # its prefill
    assert len(short.result.tokens) == 1
    s.submit(prompt(400, 8), SamplingParams(max_new_tokens=2))
    for _ in range(25):  # 400 prompt tokens at 15 a step: 27 steps of prefill
        s.step()
        tokens_at.append(len(short.result.tokens))
    assert tokens_at == list(range(2, 27))  # one token every step: the prefill never stalled it
    assert max(engine.step_tokens) <= 16


def test_a_budget_below_the_slots_is_refused(tiny_artifact):
    e = runtime.load(tiny_artifact)
    with pytest.raises(RequestError, match=r"max_num_batched_tokens \(tokens per step\) must be an integer >= the batch slots \(4\), got 3"):
        BatchScheduler(e, max_slots=4, max_step_tokens=3)


def test_the_server_passes_its_budget_to_the_scheduler(tiny_artifact):
    from starlette.testclient import TestClient

    from runtime.serve import create_app

    app = create_app(runtime.load(tiny_artifact), "m", {"temperature": 0.0}, max_batch=2, max_step_tokens=5)
    assert app.state.service.worker.scheduler.max_step_tokens == 5
    with TestClient(app) as client:  # a 40-token prompt in 5-token steps: the same reply as unlimited
        r = client.post("/v1/completions", json={"prompt": prompt(40, 9), "max_tokens": 6})
        want = run(runtime.load(tiny_artifact), [(prompt(40, 9), SamplingParams(max_new_tokens=6))], None)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[0][1]


def test_draft_tokens_do_not_starve_a_prefill(engine):
    """A small budget and a request whose drafts are accepted every step (two allowed tokens,
    1-gram lookups): its drafts must leave the prefilling request at least one token a step, or
    it waits until the drafting request finishes (here all its 200 tokens)."""
    spec = NgramSpeculation(4, 1, 1)
    looping = (prompt(8, 10), SamplingParams(max_new_tokens=200, ignore_eos=True, allowed_token_ids=[11, 22]))
    late = (prompt(40, 11), SamplingParams(max_new_tokens=3))
    s = BatchScheduler(engine, max_slots=2, max_step_tokens=3, speculation=spec)
    a = s.submit(*looping)
    while not a.result.tokens:
        s.step()
    b = s.submit(*late)
    steps, drafts = 0, s.draft_tokens
    while not b.result.tokens:
        s.step()
        steps += 1
    assert s.draft_tokens > drafts and steps <= 40, steps  # 40 prompt tokens, at least one a step
    assert len(a.result.tokens) < 200
    while s.has_work():
        s.step()
    ref = BatchScheduler(engine, max_slots=2)
    ra, rb = ref.submit(*looping), ref.submit(*late)
    while ref.has_work():
        ref.step()
    assert (a.result.tokens, b.result.tokens) == (ra.result.tokens, rb.result.tokens)
