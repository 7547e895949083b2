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


# --- sharing with running requests ------------------------------------------------------------

SYSTEM = [{"role": "system", "content": "You are a careful assistant who answers in one short sentence, "
                                        "citing the experts that routed each token of the question."}]


def _submit_all(sched, prompts, params):
    texts = [[] for _ in prompts]
    results: dict[int, GenerationResult] = {}
    for i, (ids, p) in enumerate(zip(prompts, params)):
        sched.submit(ids, p, on_delta=texts[i].append, on_finish=lambda r, i=i: results.__setitem__(i, r))
    while sched.has_work():
        sched.step()
    return ["".join(t) for t in texts], [results[i].tokens for i in range(len(prompts))]


def test_same_prompt_submitted_together_is_prefilled_once(engine):
    """n choices of one prompt: the first computes it, the others wait one prefill and copy its rows."""
    assert engine.backend.can_copy_rows
    sched = BatchScheduler(engine, max_slots=4, capacity=512)
    ids = engine.tokenizer.encode_chat(SYSTEM + [{"role": "user", "content": "Which experts fired?"}])
    assert len(ids) >= 40  # several prefill chunks of 16
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s) for s in range(4)]
    texts, tokens = _submit_all(sched, [ids] * 4, params)
    for p, text, toks in zip(params, texts, tokens):
        assert (text, toks) == solo(engine, ids, p)
    assert sched.copied_tokens == 3 * (len(ids) - 1)
    assert len(set(map(tuple, tokens))) > 1  # the seeds differ, so do the choices
    assert sched.max_batch == 4  # and they decode together


def test_running_request_shares_a_system_prompt_with_a_newcomer(engine):
    """A request arriving while another decodes copies the common system prompt from it; the
    source keeps decoding unharmed; both equal their solo runs."""
    sched = BatchScheduler(engine, max_slots=2, capacity=512)
    a = engine.tokenizer.encode_chat(SYSTEM + [{"role": "user", "content": "First question about routing?"}])
    b = engine.tokenizer.encode_chat(SYSTEM + [{"role": "user", "content": "A different second one."}])
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common > 30
    texts: list[list[str]] = [[], []]
    done: dict[int, GenerationResult] = {}
    p = SamplingParams(max_new_tokens=12)
    sched.submit(a, p, on_delta=texts[0].append, on_finish=lambda r: done.__setitem__(0, r))
    while sched._slots[0] is None or sched._slots[0].next_token < 0:
        sched.step()  # a is prefilled and decoding
    sched.step()
    sched.submit(b, p, on_delta=texts[1].append, on_finish=lambda r: done.__setitem__(1, r))
    while sched.has_work():
        sched.step()
    assert sched.copied_tokens == common
    assert ("".join(texts[0]), done[0].tokens) == solo(engine, a, p)
    assert ("".join(texts[1]), done[1].tokens) == solo(engine, b, p)


def test_short_common_prefixes_are_recomputed_not_waited_for(engine):
    sched = BatchScheduler(engine, max_slots=2, capacity=512)
    a = engine.tokenizer.encode("Experts " * 20)
    b = a[:5] + engine.tokenizer.encode(" something else entirely here")
    texts, tokens = _submit_all(sched, [a, b], [P, P])
    assert sched.copied_tokens == 0 and sched.max_batch == 2
    assert (texts[1], tokens[1]) == solo(engine, b)


def test_a_request_waiting_for_a_prefix_keeps_its_slot(engine):
    """B waits for A's prefill of their common prompt; C, arriving after B, must not take the slot
    B waits for (else B would wait for a whole generation, not a few prefill steps)."""
    sched = BatchScheduler(engine, max_slots=2, capacity=512)
    shared = [int(t) for t in engine.tokenizer.encode("Experts and routers, " * 12)][:64]
    first: dict[str, int] = {}
    for name, ids, n in (("A", shared, 40), ("B", shared, 4), ("C", engine.tokenizer.encode("unrelated"), 60)):
        sched.submit(ids, SamplingParams(max_new_tokens=n, ignore_eos=True),
                     on_token=lambda t, name=name: first.setdefault(name, sched.steps))
    while sched.has_work():
        sched.step()
    assert sched.copied_tokens == len(shared) - 1
    assert first["B"] <= first["A"] + 1 and first["C"] > first["B"]
