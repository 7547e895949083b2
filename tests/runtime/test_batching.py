"""The continuous-batching scheduler on real artifacts: every request, whatever shares its steps,
must give exactly what `Engine.stream_text` gives it alone (tokens, text deltas joined,
finish_reason)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import runtime
from exporter.export import export
from exporter.tiny import tiny_config, write_checkpoint
from runtime.batching import BatchScheduler, Generation
from runtime.engine import GenerationResult
from runtime.sampling import SamplingParams
from runtime.yarn import ContextLengthError

YARN = dict(max_position_embeddings=128,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    # A small prefill chunk: long prompts take several steps, riding along with others' decode steps.
    return runtime.load(tiny_artifact, prefill_chunk=16)


@pytest.fixture(scope="module")
def yarn_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("yarn_batching")
    ck = write_checkpoint(root / "ck", tiny_config(**YARN), seed=5)
    return runtime.load(export(ck, root / "art"))


def _prompt(n: int, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(0, 150000, n)]


def solo(engine, ids: list[int], p: SamplingParams) -> GenerationResult:
    result = GenerationResult(list(ids))
    result.text = "".join(engine.stream_text(ids, p, result=result))
    return result


@dataclass
class Tracked:
    """One submitted request and what its callbacks saw, with the step each event came at."""

    gen: Generation
    deltas: list[str] = field(default_factory=list)
    first_step: int | None = None
    finished_step: int | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def submit(sched: BatchScheduler, ids: list[int], p: SamplingParams) -> Tracked:
    t: Tracked

    def delta(d: str) -> None:
        t.deltas.append(d)
        if t.first_step is None:
            t.first_step = sched.steps

    def finish(result: GenerationResult) -> None:
        t.finished_step = sched.steps

    t = Tracked(sched.submit(ids, p, on_delta=delta, on_finish=finish))
    return t


def run(sched: BatchScheduler, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> list[Tracked]:
    """Submits each arrival before step number `key`, then steps until nothing is left."""
    out: list[Tracked] = []
    step = 0
    while step <= max(arrivals) or sched.has_work():
        out += [submit(sched, ids, p) for ids, p in arrivals.get(step, [])]
        sched.step()
        step += 1
    return out


def assert_same_as_solo(engine, tracked: list[Tracked]) -> None:
    for i, t in enumerate(tracked):
        ref = solo(engine, t.gen.prompt_ids, t.gen.params)
        got = t.gen.result
        assert got.tokens == ref.tokens, f"request {i}"
        assert (t.text, got.finish_reason) == (ref.text, ref.finish_reason), f"request {i}"


def test_greedy_requests_joining_and_leaving_equal_solo_runs(engine) -> None:
    sched = BatchScheduler(engine, max_slots=3, capacity=256)
    greedy = lambda n: SamplingParams(max_new_tokens=n)  # noqa: E731
    chat = engine.tokenizer.encode_chat([{"role": "user", "content": "Hello! What is a mixture of experts?"}])
    arrivals = {
        0: [(_prompt(5, 0), greedy(12)), (chat, greedy(6))],
        3: [(_prompt(40, 1), greedy(9))],  # prefills in 3 chunks while the first two decode
        4: [(_prompt(3, 2), greedy(7))],  # waits for a free slot: reuses the first one to finish
        10: [(_prompt(17, 3), greedy(15))],
    }
    tracked = run(sched, arrivals)
    assert_same_as_solo(engine, tracked)
    assert all(len(t.gen.result.tokens) >= 1 for t in tracked)
    assert sched.max_batch == 3
    # the fourth request started only once a slot had been freed, and shared steps after that
    assert tracked[3].first_step >= min(t.finished_step for t in tracked[:3])
    assert tracked[3].first_step < max(t.finished_step for t in tracked[:3])


def test_seeded_sampling_equals_solo_runs(engine) -> None:
    sched = BatchScheduler(engine, max_slots=4, capacity=256)
    sampled = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=s, max_new_tokens=n, ignore_eos=True)
               for s, n in [(1, 10), (2, 14), (3, 8), (1234, 12)]]
    arrivals = {0: [(_prompt(6, 10), sampled[0]), (_prompt(11, 11), sampled[1])],
                2: [(_prompt(4, 12), sampled[2])], 5: [(_prompt(20, 13), sampled[3])]}
    tracked = run(sched, arrivals)
    assert_same_as_solo(engine, tracked)
    greedy = solo(engine, _prompt(6, 10), SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert tracked[0].gen.result.tokens != greedy.tokens, "pick seeds whose draws are not greedy"


def test_stop_strings_and_eos_behave_as_solo(engine) -> None:
    ids = _prompt(8, 20)
    full = solo(engine, ids, SamplingParams(max_new_tokens=16, ignore_eos=True))
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    eos = full.tokens[5]  # a token the greedy run produces: as a stop id it ends the reply there
    cases = [SamplingParams(max_new_tokens=16, stop=("never-appears", stop)),
             SamplingParams(max_new_tokens=16, stop_token_ids=(eos,)),
             SamplingParams(max_new_tokens=16, stop_token_ids=(eos,), ignore_eos=True)]
    sched = BatchScheduler(engine, max_slots=4, capacity=256)
    tracked = run(sched, {0: [(ids, p) for p in cases] + [(_prompt(13, 21), SamplingParams(max_new_tokens=16))]})
    assert_same_as_solo(engine, tracked)
    by_stop, by_eos, ignoring = (t.gen.result for t in tracked[:3])
    assert by_stop.finish_reason == "stop" and tracked[0].text == full.text[: full.text.index(stop)]
    assert by_eos.finish_reason == "stop" and by_eos.tokens == full.tokens[: full.tokens.index(eos) + 1]
    # ignore_eos ignores the model's eos ids only; a stop id of the request's own still stops (vLLM)
    assert ignoring.finish_reason == "stop" and ignoring.tokens == by_eos.tokens


def test_cancelled_request_frees_its_slot_and_others_are_unaffected(engine) -> None:
    sched = BatchScheduler(engine, max_slots=2, capacity=256)
    p = SamplingParams(max_new_tokens=12, ignore_eos=True)
    a, b, c = (submit(sched, _prompt(n, 30 + n), p) for n in (5, 9, 7))
    reasons: list[str] = []
    b.gen.on_finish = lambda r: reasons.append(r.finish_reason)
    for _ in range(3):
        sched.step()
    assert sched.running == 2 and c.first_step is None  # c waits for a slot
    b.gen.cancelled.set()
    sched.step()  # b leaves before this step runs; c takes its slot and prefills in the same step
    assert reasons == ["cancelled"] and sched.running == 2 and len(c.gen.result.tokens) == 1
    assert len(b.gen.result.tokens) == 3
    while sched.has_work():
        sched.step()
    assert_same_as_solo(engine, [a, c])
    assert len(a.gen.result.tokens) == len(c.gen.result.tokens) == 12


def test_a_request_with_another_rope_plan_waits_and_both_equal_solo(yarn_engine) -> None:
    sched = BatchScheduler(yarn_engine)  # capacity: the model's 128 positions
    assert yarn_engine.rope_mode == "dynamic" and sched.capacity == 128
    short = SamplingParams(max_new_tokens=10, ignore_eos=True)  # 5 + 10 <= 32: unscaled
    long = SamplingParams(max_new_tokens=10, ignore_eos=True)  # 30 + 10 > 32: YaRN
    tracked = run(sched, {0: [(_prompt(5, 40), short)], 2: [(_prompt(30, 41), long), (_prompt(6, 42), short)]})
    first, waiting, behind = tracked
    assert first.gen.plan != waiting.gen.plan and first.gen.plan == behind.gen.plan
    # the long one starts after the short one ends; the short one queued behind it waits too (FIFO)
    assert waiting.first_step > first.finished_step
    assert behind.first_step >= waiting.first_step
    assert_same_as_solo(yarn_engine, tracked)


def test_one_slot_serves_requests_one_after_another(engine) -> None:
    sched = BatchScheduler(engine, max_slots=1, capacity=256)
    tracked = run(sched, {0: [(_prompt(n, 50 + n), SamplingParams(max_new_tokens=5, ignore_eos=True))
                              for n in (4, 7, 3)]})
    assert sched.max_batch == 1
    assert [t.first_step for t in tracked] == sorted(t.first_step for t in tracked)
    assert tracked[1].first_step > tracked[0].finished_step
    assert_same_as_solo(engine, tracked)


def test_requests_over_the_capacity_are_rejected_before_queueing(engine) -> None:
    sched = BatchScheduler(engine, max_slots=2, capacity=64)
    with pytest.raises(ContextLengthError, match="60 tokens and max_new_tokens is 5 .*capacity of 64"):
        sched.submit(_prompt(60, 60), SamplingParams(max_new_tokens=5))
    assert not sched.has_work()
    sched.submit(_prompt(60, 60), SamplingParams(max_new_tokens=4))
    assert sched.has_work()


def test_rows_near_the_capacity_share_steps_with_prefill_chunks(engine) -> None:
    """Every row of a step, idle or running, must have room for the step's padded chunk: a slot that
    ran up to the capacity (idle now, its K/V kept) or a request decoding near it shares steps with
    another request's 16-token prefill chunks. All equal their solo runs."""
    sched = BatchScheduler(engine, max_slots=2, capacity=64)
    full = SamplingParams(max_new_tokens=62, ignore_eos=True)
    # 1: fills its slot to the capacity alone, then 2 and 3 prefill while that slot is idle.
    # 4: decodes up to the capacity while 5 arrives with a 40-token prompt (3 chunks) near its end.
    arrivals = {0: [(_prompt(2, 70), full)], 70: [(_prompt(20, 71), SamplingParams(max_new_tokens=4)),
                                                  (_prompt(33, 72), SamplingParams(max_new_tokens=3))],
                80: [(_prompt(2, 73), full)], 135: [(_prompt(40, 74), SamplingParams(max_new_tokens=5))]}
    tracked = run(sched, arrivals)
    assert_same_as_solo(engine, tracked)
    assert [len(t.gen.result.tokens) for t in tracked] == [62, 4, 3, 62, 5]
    # 5 prefilled (in chunks cut to the room 4 had left) while 4 was still decoding
    assert tracked[4].first_step is not None and tracked[4].first_step <= tracked[3].finished_step


def test_kept_rows_of_an_idle_slot_survive_other_requests_chunks(engine) -> None:
    """A slot that went idle near the capacity keeps the K/V rows the padded chunks of other
    requests' steps cannot reach: a later request that re-sends its tokens reuses what is left
    and still equals its solo run."""
    sched = BatchScheduler(engine, max_slots=2, capacity=64)
    first = _prompt(2, 80)
    a = run(sched, {0: [(first, SamplingParams(max_new_tokens=60, ignore_eos=True))]})[0]
    history = first + a.gen.result.tokens[:-1]  # the rows slot 0 holds
    run(sched, {0: [(_prompt(30, 81), SamplingParams(max_new_tokens=2))]})
    again = history + [5]
    before = sched.reused_tokens
    tracked = run(sched, {0: [(again, SamplingParams(max_new_tokens=2))]})
    assert_same_as_solo(engine, tracked)
    assert 0 < sched.reused_tokens - before <= len(history)
