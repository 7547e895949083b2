"""Prefix reuse in the batch scheduler: a request that starts with a finished request's tokens
prefills only the rest, and its output equals a solo run from scratch."""

from __future__ import annotations

import pytest

import runtime
from runtime.batching import BatchScheduler, stream
from runtime.engine import GenerationResult
from runtime.sampling import SamplingParams

P = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return runtime.load(tiny_artifact, prefill_chunk=16)


def solo(engine, ids, p=P):
    result = GenerationResult(list(ids))
    text = "".join(engine.stream_text(ids, p, result=result))
    return text, result.tokens


def run(sched, ids, p=P):
    done: list[GenerationResult] = []
    deltas: list[str] = []
    sched.submit(ids, p, on_delta=deltas.append, on_finish=done.append)
    while sched.has_work():
        sched.step()
    return "".join(deltas), done[0].tokens


def test_multi_turn_chat_prefills_only_the_new_turn(engine):
    sched = BatchScheduler(engine, max_slots=2, capacity=512)
    msgs = [{"role": "user", "content": "你好，请介绍一下你自己。"}]
    ids1 = engine.tokenizer.encode_chat(msgs)
    text1, toks1 = run(sched, ids1)
    assert (text1, toks1) == solo(engine, ids1)
    msgs += [{"role": "assistant", "content": text1}, {"role": "user", "content": "再说一遍"}]
    ids2 = engine.tokenizer.encode_chat(msgs)
    before = sched.reused_tokens
    assert run(sched, ids2) == solo(engine, ids2)
    # at least the whole first prompt came from the kept K/V
    assert sched.reused_tokens - before >= len(ids1)


def test_identical_prompt_reuses_all_but_the_last_token(engine):
    sched = BatchScheduler(engine, max_slots=1, capacity=512)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    first = run(sched, ids)
    before = sched.reused_tokens
    assert run(sched, ids) == first == solo(engine, ids)
    assert sched.reused_tokens - before == len(ids) - 1


def test_diverging_prompt_reuses_the_common_part_only(engine):
    sched = BatchScheduler(engine, max_slots=1, capacity=512)
    a = engine.tokenizer.encode("one two three four five six seven")
    b = a[:4] + engine.tokenizer.encode(" apples and pears")
    run(sched, a)
    before = sched.reused_tokens
    assert run(sched, b) == solo(engine, b)
    assert sched.reused_tokens - before == 4


def test_stream_helper_and_early_stop_free_the_slot(engine):
    sched = BatchScheduler(engine, max_slots=1, capacity=512)
    ids = engine.tokenizer.encode("Hello")
    p = SamplingParams(max_new_tokens=20, ignore_eos=True)
    assert "".join(stream(sched, ids, p)) == solo(engine, ids, p)[0]
    it = stream(sched, ids, p)
    next(it)
    it.close()  # consumer gone: the request is cancelled and its slot freed
    assert not sched.has_work()
    assert "".join(stream(sched, ids, p)) == solo(engine, ids, p)[0]
