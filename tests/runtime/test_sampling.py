"""runtime.sampling against transformers' logits processors, plus seeding and distribution checks."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from runtime.errors import QmoeError
from runtime.sampling import (
    Sampler,
    SamplingError,
    SamplingParams,
    choice_seed,
    find_stop,
    stop_holdback,
    token_logprob,
    token_probabilities,
    warp_logits,
)

from tests.helpers import hf_chain

VOCAB = 1000


def hf_probs(logits: np.ndarray, seen: np.ndarray, params: SamplingParams) -> np.ndarray:
    # in float64, as ours: a float32 min-p threshold can flip a token sitting right on it
    scores = hf_chain(params)(torch.from_numpy(seen[None].astype(np.int64)),
                              torch.from_numpy(logits[None].astype(np.float64)))
    return torch.softmax(scores, dim=-1)[0].double().numpy()


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(VOCAB) * rng.uniform(0.5, 4.0)).astype(np.float32)
    seen = rng.integers(0, VOCAB, size=rng.integers(1, 60))
    return logits, seen


PARAM_SETS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=50),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.75),
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.6, top_k=100, top_p=0.95, repetition_penalty=1.15),
    SamplingParams(temperature=1.0, top_p=0.3, repetition_penalty=0.8),  # < 1 encourages repeats
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.7, top_k=200, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    SamplingParams(temperature=1.5, min_p=0.9),
    SamplingParams(temperature=1.0, logit_bias={3: 5.0, 17: -100, 999: 2.5, 40: 0.5}),
    # the bias comes before the repetition penalty, which then divides a biased positive logit
    SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.4, logit_bias={"5": 7.0, "6": -3.0}),
]


def _param_id(p: SamplingParams) -> str:
    return f"T{p.temperature}-k{p.top_k}-p{p.top_p}-r{p.repetition_penalty}-m{p.min_p}-b{len(p.logit_bias)}"


@pytest.mark.parametrize("params", PARAM_SETS, ids=_param_id)
def test_distribution_matches_transformers(params: SamplingParams):
    for seed in range(20):
        logits, seen = random_case(seed)
        ours = token_probabilities(logits, seen, params)
        ref = hf_probs(logits, seen, params)
        np.testing.assert_array_equal(ours > 0, ref > 0)  # the same kept token set
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
        assert ours.sum() == pytest.approx(1.0, abs=1e-12)


def test_logit_bias_comes_before_the_repetition_penalty():
    """As in transformers and vLLM: a seen, biased token's logit is (x + bias) / penalty."""
    logits, seen = random_case(4)
    seen = np.append(seen, [5, 6])
    logits[5], logits[6] = 1.0, 0.5
    params = SamplingParams(temperature=1.0, repetition_penalty=1.4, logit_bias={"5": 7.0, "6": -3.0})
    x = warp_logits(logits, seen, params)
    assert x[5] == pytest.approx(8.0 / 1.4) and x[6] == pytest.approx(-2.5 * 1.4)
    np.testing.assert_allclose(token_probabilities(logits, seen, params), hf_probs(logits, seen, params), atol=1e-9)


def openai_penalties(logits: np.ndarray, generated: list[int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's documented formula, token by token: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence."""
    out = logits.astype(np.float64).copy()
    for j in range(len(out)):
        c = generated.count(j)
        out[j] -= c * frequency + (1.0 if c > 0 else 0.0) * presence
    return out


@pytest.mark.parametrize("presence, frequency", [(0.8, 0.0), (0.0, 1.3), (-1.5, 2.0), (2.0, -0.7)])
def test_presence_and_frequency_penalties_follow_openai(presence, frequency):
    rng = np.random.default_rng(11)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    prompt = rng.integers(0, 50, 30)
    generated = [int(t) for t in rng.integers(0, 50, 25)] + [7, 7, 7, 80]  # 80 is past the head
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    seen = np.concatenate([prompt, generated])
    got = warp_logits(logits, seen, params, np.array(generated))
    np.testing.assert_allclose(got, openai_penalties(logits, generated, presence, frequency), rtol=0, atol=1e-12)
    # only generated tokens count (the prompt does not), and nothing generated means no change
    np.testing.assert_array_equal(warp_logits(logits, seen, params, np.array([], np.int64)), logits)
    np.testing.assert_array_equal(warp_logits(logits, seen, params), logits)
    # after the repetition penalty (vLLM's order): the penalty divides the raw logit
    both = replace(params, repetition_penalty=2.0)
    rep = RepetitionPenaltyLogitsProcessor(2.0)(torch.from_numpy(seen[None].astype(np.int64)),
                                                torch.from_numpy(logits[None].copy()))[0].double().numpy()
    np.testing.assert_allclose(warp_logits(logits, seen, both, np.array(generated)),
                               openai_penalties(rep, generated, presence, frequency), atol=1e-6)
    # greedy applies them too
    greedy = Sampler(params, 1).next(logits[None], [seen], [np.array(generated)])[0]
    assert greedy == int(np.argmax(openai_penalties(logits, generated, presence, frequency)))


def test_sampler_counts_generated_tokens_per_row():
    """Two rows, one with a frequency penalty: only that row's own generated tokens lower its logits."""
    logits = np.array([[1.0, 0.9, 0.0], [1.0, 0.9, 0.0]])
    s = Sampler([SamplingParams(frequency_penalty=0.2), SamplingParams()], 2)
    seen = [np.array([0, 0]), np.array([0, 0])]
    assert list(s.next(logits, seen, [np.array([0]), np.array([0])])) == [1, 0]
    assert list(s.next(logits, seen, [np.array([], np.int64), np.array([0])])) == [0, 0]
    with pytest.raises(SamplingError, match="generated must hold one id array per row"):
        s.next(logits, seen, [np.array([0])])


def test_token_logprob_is_log_softmax_of_the_raw_logits():
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float16):
        logits = (rng.standard_normal(VOCAB) * 4).astype(dtype)
        ref = torch.log_softmax(torch.from_numpy(logits.astype(np.float64)), dim=-1)
        values, ids = torch.topk(ref, 7)
        lp = token_logprob(logits, 123, top=7)
        assert lp.token == 123 and lp.logprob == pytest.approx(float(ref[123]), abs=1e-9)
        assert [t for t, _ in lp.top] == ids.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], values.numpy(), atol=1e-9)
        assert token_logprob(logits, 3).top == ()
    # ties: lower id first, including ties that straddle the k-th place
    tied = np.array([0.0, 2.0, 1.0, 2.0, 1.0, 1.0, -5.0])
    assert [t for t, _ in token_logprob(tied, 0, top=3).top] == [1, 3, 2]
    assert [t for t, _ in token_logprob(tied, 0, top=20).top] == [1, 3, 2, 4, 5, 0, 6]
    # huge logits do not overflow
    assert token_logprob(np.array([1e30, 1e30 - 1e15, 0.0]), 0).logprob == pytest.approx(-math.log(1 + math.exp(-1e15)))


def test_replacing_params_keeps_the_parsed_bias():
    """n choices are copies with other seeds: a 150k-entry bias is parsed once, not per copy."""
    p = SamplingParams(logit_bias={str(i): -1.0 for i in range(150000)})
    q = replace(p, seed=5)
    assert q.logit_bias is p.logit_bias and q == replace(p, seed=5)
    np.testing.assert_array_equal(q.logit_bias.ids[:3], [0, 1, 2])


def test_logit_bias_forms_and_padded_ids():
    a = SamplingParams(logit_bias={"12": 1, 3: -2.5})
    assert a.logit_bias == ((3, -2.5), (12, 1.0)) and hash(a) == hash(SamplingParams(logit_bias=[(12, 1.0), (3, -2.5)]))
    logits = np.zeros(10)
    assert warp_logits(logits, np.array([], np.int64), SamplingParams(logit_bias={9: 1, 50: 3}))[9] == 1.0  # 50: past the head


def test_choice_seeds_are_stable_and_distinct():
    assert choice_seed(42, 0) == 42
    seeds = [choice_seed(42, i) for i in range(64)]
    assert len(set(seeds)) == 64 and seeds == [choice_seed(42, i) for i in range(64)]
    assert choice_seed(43, 1) != choice_seed(42, 1) and all(s >= 0 for s in seeds)
    SamplingParams(seed=seeds[5])  # a valid seed


def stable_full_sort_probs(logits: np.ndarray, seen: np.ndarray, params: SamplingParams) -> np.ndarray:
    """transformers' processors written out over the whole vocabulary with a stable sort: torch's
    sort is not stable, so among tied logits at the top-p boundary transformers keeps arbitrary
    ones; ours keep the higher ids (the lower ones count as smaller, as a stable ascending sort has it)."""
    scores = hf_chain(replace(params, top_p=1.0, min_p=0.0))(
        torch.from_numpy(seen[None].astype(np.int64)), torch.from_numpy(logits[None].astype(np.float64)))[0].numpy()
    if params.top_p < 1.0:
        order = np.argsort(scores, kind="stable")
        probs = np.exp(scores[order] - scores.max())
        remove = np.cumsum(probs / probs.sum()) <= 1 - params.top_p
        remove[-1] = False
        scores[order[remove]] = -np.inf
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.min_p > 0:
        probs[probs < params.min_p * probs.max()] = 0
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0], ids=["flat", "normal", "peaked"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),  # Qwen2-Instruct's defaults
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.999),
    SamplingParams(temperature=0.8, top_k=3000, min_p=0.01),
], ids=["qwen", "p0.9", "p0.999", "k3000-minp"])
def test_full_vocabulary_rows_match_transformers(params, scale):
    """Qwen2's 151936 logits: the filters select from a strided sample and the nucleus from the head
    of the distribution (a flat one needs more than the first candidate sets): the same tokens and
    probabilities as transformers' full sorts. Rounded logits tie at every boundary: transformers'
    unstable sort keeps the same number of tokens with the same probabilities, and a stable full
    sort the very same tokens."""
    rng = np.random.default_rng(int(scale * 100))
    for rounded in (False, True):
        logits = (rng.standard_normal(151936) * scale).astype(np.float32)
        if rounded:
            logits = np.round(logits * 4) / 4
        seen = rng.integers(0, 151936, 300)
        ours, ref = token_probabilities(logits, seen, params), hf_probs(logits, seen, params)
        if rounded:
            np.testing.assert_allclose(np.sort(ours), np.sort(ref), atol=1e-9, rtol=0)
            ref = stable_full_sort_probs(logits, seen, params)
        np.testing.assert_array_equal(np.flatnonzero(ours), np.flatnonzero(ref))
        np.testing.assert_allclose(ours, ref, atol=1e-9, rtol=0)


def test_top_p_exactly_on_a_tie_boundary_counts_like_transformers():
    """N equal logits and top_p = j/N: the cumulative sums hit 1 - top_p exactly, so rounding
    decides how many stay; ours must round as transformers' ascending sums do (a sum from the top
    keeps one token too few or too many), and agree with exact arithmetic. With a tail below the tie group, over a head and a full
    vocabulary."""
    none = np.array([], np.int64)
    for n in range(2, 30):
        for j in range(1, n):
            for vocab in (n, 1000, 20000):
                x = np.full(vocab, -60.0)
                x[:n] = 1.0
                p = SamplingParams(temperature=1.0, top_p=j / n)
                np.testing.assert_array_equal(np.flatnonzero(token_probabilities(x, none, p)),
                                              np.flatnonzero(stable_full_sort_probs(x, none, p)))
    a = np.full(1000, -40.0)
    a[100:104] = 2.0
    b = np.linspace(-5, 0, 1000)
    b[100:128] = 2.0
    for x, p in ((a, SamplingParams(temperature=1.0, top_p=0.5)), (b, SamplingParams(temperature=1.0, top_k=28, top_p=0.5))):
        ours = int((token_probabilities(x, none, p) > 0).sum())
        assert ours == exact_top_p_count(x, p)
        # transformers itself lands within one token: its count at an exact tie follows torch's
        # softmax rounding of the sorted row, which moved in torch 2.13 (case a: 2, where exact
        # arithmetic and the torch of stop 19's CI keep 3).
        assert abs(ours - int((hf_probs(x, none, p) > 0).sum())) <= 1


def exact_top_p_count(logits: np.ndarray, params: SamplingParams) -> int:
    """How many tokens top-k then top-p keep, in 60-digit decimal arithmetic (ascending sums, as
    transformers' warper; a token stays while the sum up to it exceeds 1 - top_p; at least one)."""
    from decimal import Decimal, localcontext

    with localcontext() as ctx:
        ctx.prec = 60
        xs = [Decimal(float(v)) for v in logits]
        order = sorted(range(len(xs)), key=lambda i: (xs[i], i))
        if params.top_k:
            order = order[-params.top_k:]
        top = max(xs[i] for i in order)
        weights = [(xs[i] - top).exp() for i in order]
        total = sum(weights)
        floor = 1 - Decimal(params.top_p)
        kept, running = 0, Decimal(0)
        for w in weights:
            running += w / total
            kept += running > floor
        return max(kept, 1)


def test_penalties_that_remove_every_token_fail_the_row():
    params = SamplingParams(temperature=1.0, repetition_penalty=1e308, seed=0)
    with pytest.raises(SamplingError, match="row 0: every token has probability 0"):
        Sampler(params, 1).next(np.array([[-2.0, -3.0, -4.0]]), [np.array([0, 1, 2])])


def test_head_selection_equals_a_full_partition():
    from runtime.sampling import _head

    rng = np.random.default_rng(2)
    for trial in range(300):
        n = int(rng.integers(2, 200000))
        k = int(rng.integers(1, min(n, 5000)))
        x = rng.standard_normal(n) if trial % 3 else np.round(rng.standard_normal(n) * 2)
        np.testing.assert_array_equal(_head(x, k), np.flatnonzero(x >= np.partition(x, -k)[-k]))


def test_filters_really_remove_tokens():
    logits, seen = random_case(3)
    kept = np.isfinite(warp_logits(logits, seen, SamplingParams(temperature=1.0, top_k=40, top_p=0.5)))
    assert 1 <= kept.sum() < 40
    assert np.isfinite(warp_logits(logits, seen, SamplingParams(temperature=1.0, top_k=40))).sum() == 40


def test_top_k_keeps_ties_like_transformers():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.5], dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_k=3)
    np.testing.assert_allclose(token_probabilities(logits, np.array([], np.int64), params),
                               hf_probs(logits, np.array([], np.int64), params), atol=1e-7)


def test_greedy_is_first_argmax_after_repetition_penalty():
    for seed in range(10):
        logits, seen = random_case(seed)
        params = SamplingParams(repetition_penalty=1.5)
        scores = RepetitionPenaltyLogitsProcessor(1.5)(torch.from_numpy(seen[None]), torch.from_numpy(logits[None].copy()))
        assert Sampler(params, 1).next(logits[None], [seen])[0] == int(torch.argmax(scores[0]))
    tie = np.array([[0.0, 5.0, 1.0, 5.0]], dtype=np.float32)
    assert Sampler(SamplingParams(), 1).next(tie, [np.array([], np.int64)])[0] == 1


def test_repetition_penalty_uses_prompt_and_ignores_out_of_vocab_ids():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    seen = np.array([0, 1, 1, 7])  # 7 is past the lm_head
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0)
    np.testing.assert_allclose(warp_logits(logits, seen, params), [1.0, -4.0, 1.0, 0.5])
    np.testing.assert_allclose(token_probabilities(logits, seen, params), hf_probs(logits, seen, params), atol=1e-7)


def run(sampler: Sampler, logits: np.ndarray, steps: int) -> np.ndarray:
    seen = [np.array([], np.int64) for _ in range(logits.shape[0])]
    return np.stack([sampler.next(logits, seen) for _ in range(steps)], axis=1)  # [B, steps]


def test_same_seed_same_tokens_independent_of_batch():
    logits = np.stack([random_case(s)[0] for s in range(3)])
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    alone = run(Sampler(p, 1), logits[:1], 40)[0]
    assert np.array_equal(alone, run(Sampler(p, 1), logits[:1], 40)[0])
    # Row 0 keeps its tokens when other requests (other seeds, greedy, unseeded) share the batch.
    mixed = Sampler([p, SamplingParams(temperature=1.0, seed=7), SamplingParams()], 3)
    assert np.array_equal(run(mixed, logits, 40)[0], alone)
    other = run(Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=43), 1), logits[:1], 40)[0]
    assert not np.array_equal(alone, other)


def test_sampled_frequencies_follow_the_distribution():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(12).astype(np.float32) * 1.5
    params = SamplingParams(temperature=0.7, top_k=9, top_p=0.9, seed=0)
    expected = hf_probs(logits, np.array([], np.int64), params)
    draws = 20000
    sampler = Sampler(params, 1)
    row = logits[None]
    counts = np.bincount([int(sampler.next(row, [()])[0]) for _ in range(draws)], minlength=len(logits))
    assert np.all(counts[expected == 0] == 0)
    kept = expected > 0
    chi2 = float(np.sum((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])))
    # With <= 8 degrees of freedom the 99.99% quantile is about 31; a wrong temperature or a
    # missing filter shifts 20000 draws far beyond that.
    assert chi2 < 40, (chi2, counts, draws * expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "temperature must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"stop": [""]}, "stop entries must be non-empty strings"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids entry must be an integer >= 0"),
        ({"temperature": True}, "temperature must be a finite number"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ({"min_p": 1.01}, r"min_p must be in \[0, 1\]"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -2.01}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": "1"}, "frequency_penalty must be a finite number"),
        ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {"²": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {"٣": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {" 3": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {"1" * 5000: 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {-1: 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {True: 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {"5": 101}}, r"logit_bias values must be in \[-100, 100\]"),
        ({"logit_bias": {"5": math.nan}}, "logit_bias value must be a finite number"),
        ({"logit_bias": {"5": None}}, "logit_bias value must be a finite number"),
        ({"logit_bias": 5}, "logit_bias must map token ids to numbers"),
        ({"logit_bias": [1, 2]}, "logit_bias must map token ids to numbers"),
        ({"logprobs": -1}, "logprobs must be an integer >= 0"),
        ({"logprobs": 21}, "logprobs must be at most 20"),
        ({"logprobs": True}, "logprobs must be an integer >= 0"),
    ],
)
def test_invalid_params_are_rejected(kwargs, match):
    with pytest.raises(SamplingError, match=match) as e:
        SamplingParams(**kwargs)
    assert "\n" not in str(e.value) and isinstance(e.value, QmoeError) and isinstance(e.value, ValueError)


def test_params_normalise_json_values():
    p = SamplingParams(temperature=1, stop="###", stop_token_ids=[151645])
    assert p.temperature == 1.0 and p.stop == ("###",) and p.stop_token_ids == (151645,)
    assert hash(p) == hash(SamplingParams(temperature=1.0, stop=("###",), stop_token_ids=(151645,)))


def test_sampler_rejects_bad_shapes_and_logits():
    s = Sampler(SamplingParams(), 2)
    with pytest.raises(SamplingError, match=r"shape \[2, vocab\]"):
        s.next(np.zeros((3, 5), np.float32), [(), (), ()])
    with pytest.raises(SamplingError, match="one id array per row"):
        s.next(np.zeros((2, 5), np.float32), [()])
    bad = np.zeros((2, 5), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(SamplingError, match="row 1"):
        s.next(bad, [(), ()])
    with pytest.raises(SamplingError, match="3 sampling parameter sets for a batch of 2"):
        Sampler([SamplingParams()] * 3, 2)


def test_stop_helpers():
    assert find_stop("hello world###more", ("###", "world")) == 6
    assert find_stop("hello", ("###",)) is None
    assert stop_holdback("answer: ##", ("###",)) == 2
    assert stop_holdback("answer: #x", ("###",)) == 0
    assert stop_holdback("abc", ("cde", "bcz")) == 2


@pytest.mark.parametrize("temperature", [1e-300, 1e-310, 5e-324])
def test_tiny_temperatures_sample_the_best_tokens(temperature):
    """logits / 1e-310 overflows float64: the distribution is still all mass on the maximum (split
    evenly between tied maxima), never NaN or a fallback to the last vocabulary id."""
    logits = np.array([1.5, 30.0, -2.0, 29.0, 30.0, -np.inf])
    probs = token_probabilities(logits, np.array([], np.int64), SamplingParams(temperature=temperature))
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [0, 0.5, 0, 0, 0.5, 0], atol=0)
    rows = Sampler(SamplingParams(temperature=temperature, seed=3), 1)
    assert rows.next(logits[None, :], [np.array([], np.int64)])[0] in (1, 4)


def test_a_tiny_repetition_penalty_samples_the_penalised_tokens_it_blew_up():
    """penalty 1e-310 divides positive logits of seen tokens past float64 (+inf): those share the
    mass (transformers would give NaN); never the last vocabulary id."""
    logits = np.array([[2.0, -1.0, 3.0, 0.5, 1.0]])
    seen = [np.array([0, 3], np.int64)]
    params = SamplingParams(temperature=1.0, repetition_penalty=1e-310, top_k=3, seed=1)
    probs = token_probabilities(logits[0], seen[0], params)
    np.testing.assert_allclose(probs, [0.5, 0, 0, 0.5, 0], atol=0)
    assert Sampler(params, 1).next(logits, seen)[0] in (0, 3)


def test_numpy_scalars_are_numbers():
    p = SamplingParams(temperature=np.float32(0.5), top_p=np.float16(0.5), repetition_penalty=np.float64(1.1),
                       top_k=np.int64(3), max_new_tokens=np.int32(4))
    assert (p.temperature, p.top_p, p.repetition_penalty) == (0.5, 0.5, 1.1) and type(p.temperature) is float
    with pytest.raises(SamplingError, match="temperature must be a finite number"):
        SamplingParams(temperature=np.bool_(True))
