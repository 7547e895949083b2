"""logit_bias, presence/frequency penalties, min_p and logprobs end to end: the engine (and the
continuous-batching scheduler) on the tiny artifact against transformers' model driven step by
step with transformers' own processors where it has them (SequenceBiasLogitsProcessor,
RepetitionPenaltyLogitsProcessor) and OpenAI's formula for the presence/frequency penalties.

Tolerances: ONNX Runtime's fp32 logits match transformers' to ~1e-5 on this model (test_parity
bounds them at 1e-4), so log-probabilities are compared at 1e-4 and greedy tokens exactly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

import runtime
from runtime.batching import BatchScheduler
from runtime.engine import GenerationResult, RequestError
from runtime.sampling import SamplingParams
from tests.helpers import hf_model

STEPS = 12
PROMPTS = [[9707, 11, 1879, 0, 220], [151644, 872, 198, 108386, 11, 3555, 30]]


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return runtime.load(tiny_artifact, prefill_chunk=4)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return hf_model(tiny_checkpoint)


def hf_penalised_greedy(model, prompt: list[int], params: SamplingParams, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy through transformers' incremental forward: its processors for bias and repetition
    penalty, then OpenAI's presence/frequency formula over the generated ids. Returns the tokens
    and each step's raw log-softmax (float64)."""
    chain = LogitsProcessorList()
    if params.logit_bias:
        chain.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in params.logit_bias]))
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    cache = DynamicCache(config=model.config)
    ids, seen, out, logprobs = torch.tensor([prompt]), list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            raw = model(ids, cache=cache, use_cache=True).logits[0, -1].double()
            logprobs.append(torch.log_softmax(raw, -1).numpy())
            scores = chain(torch.tensor([seen]), raw[None].clone())[0].numpy()
            for t in set(out):
                scores[t] -= params.frequency_penalty * out.count(t) + params.presence_penalty
            tok = int(np.argmax(scores))
            out.append(tok)
            seen.append(tok)
            ids = torch.tensor([[tok]])
    return out, logprobs


# The random tiny model never repeats a token in 12 greedy steps, so penalties that discourage
# repeats would change nothing: negative ones (encouraging repeats) and a mix show the effect.
PENALISED = [
    SamplingParams(frequency_penalty=-2.0, logprobs=5),
    SamplingParams(presence_penalty=-2.0, repetition_penalty=0.9, logprobs=0),
    SamplingParams(presence_penalty=-1.0, frequency_penalty=0.7, logit_bias={"1879": 40, 100: -100}, logprobs=3),
]


@pytest.mark.parametrize("params", PENALISED, ids=["frequency", "presence+repetition", "bias+both"])
def test_penalties_bias_and_logprobs_match_transformers(engine, hf, params):
    params = replace(params, max_new_tokens=STEPS, ignore_eos=True)
    plain = engine.generate(PROMPTS, replace(params, presence_penalty=0, frequency_penalty=0, logit_bias={},
                                              repetition_penalty=1.0))
    results = engine.generate(PROMPTS, params)
    for prompt, r, base in zip(PROMPTS, results, plain):
        tokens, ref = hf_penalised_greedy(hf, prompt, params, STEPS)
        assert r.tokens == tokens
        assert r.tokens != base.tokens, "the penalties should change this greedy output"
        assert r.logprobs is not None and len(r.logprobs) == STEPS
        for lp, ref_row, tok in zip(r.logprobs, ref, tokens):
            assert lp.token == tok and abs(lp.logprob - ref_row[tok]) < 1e-4
            assert len(lp.top) == params.logprobs
            np.testing.assert_allclose([v for _, v in lp.top], np.sort(ref_row)[::-1][: params.logprobs], atol=1e-4)
            for t, v in lp.top:  # the ids: each one's reference value is its reported one
                assert abs(ref_row[t] - v) < 1e-4
        # logprobs are those of the raw model, not of the penalised distribution: the same whatever the penalty
        if params.logit_bias:
            assert 1879 in r.tokens
            assert max(lp.logprob for lp in r.logprobs if lp.token == 1879) < -5  # forced by the bias alone


def test_min_p_keeps_only_the_likely_tokens(engine):
    """min_p 1.0 keeps only the likeliest token (ties aside): sampling at any temperature is greedy."""
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=STEPS, ignore_eos=True))
    for seed in (1, 2):
        sampled = engine.generate(PROMPTS, SamplingParams(max_new_tokens=STEPS, ignore_eos=True, temperature=1.5,
                                                          min_p=1.0, seed=seed))
        assert [r.tokens for r in sampled] == [r.tokens for r in greedy]
    loose = engine.generate(PROMPTS, SamplingParams(max_new_tokens=STEPS, ignore_eos=True, temperature=1.5, seed=1))
    assert [r.tokens for r in loose] != [r.tokens for r in greedy]


def test_logit_bias_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(RequestError, match=r"logit_bias keys must be token ids in \[0, 151936\), got 151936"):
        engine.generate([[1]], SamplingParams(logit_bias={151936: 1.0}))


def test_scheduler_gives_each_request_its_solo_logprobs_and_penalties(engine):
    """Mixed requests sharing steps: each one's tokens and logprobs equal its run alone."""
    params = [
        SamplingParams(max_new_tokens=10, ignore_eos=True, frequency_penalty=1.0, logprobs=4),
        SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.9, min_p=0.2, presence_penalty=0.5,
                       seed=3, logprobs=0),
        SamplingParams(max_new_tokens=9, ignore_eos=True, logit_bias={"11": 30}),
    ]
    prompts = PROMPTS + [[9707] * 9]
    scheduler = BatchScheduler(engine, max_slots=3, capacity=64)
    seen_logprobs: list[list] = [[] for _ in params]
    gens = [scheduler.submit(x, p, on_logprob=seen_logprobs[i].append) for i, (x, p) in enumerate(zip(prompts, params))]
    while scheduler.has_work():
        scheduler.step()
    assert scheduler.max_batch == 3
    for i, (gen, x, p) in enumerate(zip(gens, prompts, params)):
        alone = GenerationResult(list(x))
        "".join(engine.stream_text(x, p, result=alone))
        assert gen.result.tokens == alone.tokens
        if p.logprobs is None:
            assert gen.result.logprobs is None and seen_logprobs[i] == []
            continue
        assert seen_logprobs[i] == gen.result.logprobs and len(gen.result.logprobs) == len(alone.tokens)
        for a, b in zip(gen.result.logprobs, alone.logprobs or []):
            assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_prompt_logprobs_over_several_chunks_match_transformers(engine, hf):
    """Engine.prompt_logprobs (what echo scores) in chunks of 128 positions over a 300-token
    prompt: every token's log-probability and its top 3 against transformers' one forward."""
    ids = [int(x) for x in np.random.default_rng(3).integers(0, 150000, 300)]
    got = engine.prompt_logprobs(ids, top=3, chunk=128)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    assert got[0] is None and len(got) == len(ids)
    for i in range(1, len(ids)):
        lp = got[i]
        assert lp is not None and lp.token == ids[i] and abs(lp.logprob - ref[i - 1, ids[i]]) < 1e-4
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(ref[i - 1])[::-1][:3], atol=1e-4)
