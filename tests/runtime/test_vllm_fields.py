"""vLLM's min_tokens, allowed_token_ids, bad_words, include_stop_str_in_output, skip_special_tokens
and prompt_logprobs in the sampler, the engine and the continuous-batching scheduler (vLLM v1's
semantics: vllm/v1/sample/logits_processor, ops/bad_words.py, engine/detokenizer.py).

References: transformers' model stepped token by token (tests/helpers.hf_model) with the rule
written out over its logits; a `logit_bias` of -100 (a different mechanism) where a ban must equal
one; plain decoding of the greedy tokens for the text fields; transformers' tokenizer for the bad
words' tokenization; numpy over the engine's own logits for ranks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import runtime
from runtime.batching import BatchScheduler
from runtime.engine import GenerationResult, RequestError, TextStream
from runtime.sampling import (
    Sampler,
    SamplingError,
    SamplingParams,
    apply_masks,
    bad_word_sequences,
    banned_tokens,
    match_stop,
)
from runtime.structured import StructuredOutput
from tests.helpers import hf_model, prompt_logits, run_requests

HELLO = [{"role": "user", "content": "Write about experts and routers, 你好"}]
IM_START = 151644  # special, not an eos id


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return runtime.load(tiny_artifact, prefill_chunk=16)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return hf_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def chat(engine) -> list[int]:
    return engine.tokenizer.encode_chat(HELLO)


def hf_steps(model, prompt: list[int], steps: int, choose: Callable[[int, np.ndarray, list[int]], int],
             stop: frozenset[int] = frozenset()) -> list[int]:
    """transformers' incremental forward; `choose(step, raw logits float64, tokens so far)` picks
    each token; stops after a token in `stop`."""
    cache = DynamicCache(config=model.config)
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for i in range(steps):
            logits = model(ids, cache=cache, use_cache=True).logits[0, -1].double().numpy()
            tok = choose(i, logits, out)
            out.append(tok)
            if tok in stop:
                break
            ids = torch.tensor([[tok]])
    return out


def solo(engine, ids: list[int], p: SamplingParams) -> GenerationResult:
    result = GenerationResult(list(ids))
    result.text = "".join(engine.stream_text(ids, p, result=result))
    return result


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=2.0), "min_tokens must be an integer"),
    (dict(min_tokens=9, max_new_tokens=8), r"min_tokens must be at most the maximum number of new tokens \(8\)"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must not be empty"),
    (dict(allowed_token_ids=5), "allowed_token_ids must be a list"),
    (dict(allowed_token_ids=[1, -2]), "allowed_token_ids entry must be an integer >= 0"),
    (dict(allowed_token_ids=[True]), "allowed_token_ids entry must be an integer"),
    (dict(bad_words="word"), "bad_words must be a list of strings"),
    (dict(bad_words=[""]), "bad_words entries must be non-empty strings"),
    (dict(bad_words=["  \n"]), "bad_words entries must be non-empty strings"),
    (dict(bad_words=[3]), "bad_words entries must be non-empty strings"),
    (dict(bad_words_token_ids=[[]]), "bad_words_token_ids entries must be non-empty"),
    (dict(bad_words_token_ids=[5]), "bad_words_token_ids must be a list of token id lists"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output must be true or false"),
    (dict(skip_special_tokens="no"), "skip_special_tokens must be true or false"),
    (dict(prompt_logprobs=21), "prompt_logprobs must be at most 20"),
    (dict(prompt_logprobs=-1), "prompt_logprobs must be an integer >= 0"),
    (dict(prompt_logprobs=True), "prompt_logprobs must be an integer"),
])
def test_bad_values_are_one_line_errors_naming_the_field(kwargs, match):
    with pytest.raises(SamplingError, match=match) as e:
        SamplingParams(**kwargs)
    assert "\n" not in str(e.value) and str(e.value).split()[0] in kwargs


def test_params_stay_hashable_with_lists_given():
    p = SamplingParams(allowed_token_ids=[3, 1], bad_words=["a b"], bad_words_token_ids=[[1, 2]], min_tokens=2)
    assert p.allowed_token_ids == (3, 1) and p.bad_words == ("a b",) and p.bad_words_token_ids == ((1, 2),)
    assert hash(p) == hash(replace(p)) and p == replace(p)


def test_engine_checks_ids_against_the_vocabulary(engine):
    n = engine.tokenizer.vocab_size  # vLLM: the tokenizer's ids, not the padded head's
    with pytest.raises(RequestError, match=rf"allowed_token_ids must be token ids in \[0, {n}\), got {n}"):
        engine.generate([[1]], SamplingParams(allowed_token_ids=[5, n]))
    with pytest.raises(RequestError, match="bad_words_token_ids must be token ids in"):
        engine.generate([[1]], SamplingParams(bad_words_token_ids=[[10**6]]))
    eos = engine.tokenizer.eos_token_ids
    with pytest.raises(RequestError, match="min_tokens cannot be combined with allowed_token_ids that are all stop"):
        engine.generate([[1]], SamplingParams(allowed_token_ids=list(eos), min_tokens=1))
    engine.generate([[1]], SamplingParams(allowed_token_ids=list(eos), max_new_tokens=1))  # fine without min_tokens


# --- the masks on small vocabularies -----------------------------------------------------------


def test_bad_words_rule_against_a_brute_force_reading():
    """vLLM's rule: a sequence's last token is banned when the generated ids end with the rest."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        generated = rng.integers(0, 4, rng.integers(0, 6))
        sequences = [tuple(int(t) for t in rng.integers(0, 4, rng.integers(1, 4))) for _ in range(3)]
        expected = []
        for seq in sequences:
            prefix = list(seq[:-1])
            if len(prefix) <= len(generated) and list(generated[len(generated) - len(prefix):]) == prefix:
                expected.append(seq[-1])
        assert banned_tokens(sequences, generated) == expected


def test_masks_compose_and_leave_logprob_inputs_alone():
    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], np.float32)
    keep = logits.copy()
    p = SamplingParams(allowed_token_ids=[0, 2, 4], bad_words_token_ids=[[7, 2]], stop_token_ids=(0,), min_tokens=2)
    x = apply_masks(0, logits, p, np.array([7]), np.array([0, 2, 4]))
    assert np.isneginf(x).tolist() == [True, True, True, True, False, True]  # 2 after 7 banned, 0 a stop id
    np.testing.assert_array_equal(logits, keep)  # the raw row is untouched (log-probabilities use it)
    x = apply_masks(0, logits, p, np.array([7, 1]), np.array([0, 2, 4]))
    assert np.isfinite(x).tolist() == [True, False, True, False, True, False]  # min_tokens reached, 7 not last
    with pytest.raises(SamplingError, match="row 3: no token is left"):
        apply_masks(3, logits, replace(p, bad_words_token_ids=((0,), (2,), (4,))), None, np.array([0, 2, 4]))
    only_stops = SamplingParams(stop_token_ids=(1,), min_tokens=1)
    grammar_row = np.array([-np.inf, 1.0, -np.inf])  # a complete structured output: only the stop id
    with pytest.raises(SamplingError, match="min_tokens forbids the stop tokens"):
        apply_masks(0, grammar_row, only_stops, None)
    np.testing.assert_array_equal(apply_masks(0, grammar_row, only_stops, None, constrained=True), grammar_row)


def test_sampler_rows_apply_their_own_masks_greedy_and_sampled():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    allowed = [7, 19, 33]
    rows = [SamplingParams(allowed_token_ids=allowed),
            SamplingParams(temperature=1.0, seed=4, allowed_token_ids=allowed),
            SamplingParams(bad_words_token_ids=[[int(np.argmax(logits[2]))]])]
    s = Sampler(rows, 3)
    for _ in range(20):
        out = s.next(logits, [np.array([], np.int64)] * 3, [np.array([], np.int64)] * 3)
        assert out[0] == allowed[int(np.argmax(logits[0, allowed]))]
        assert out[1] in allowed
        assert out[2] == int(np.argsort(-logits[2], kind="stable")[1])  # the best one is banned: the second


def test_match_stop_respects_the_guard():
    assert match_stop("hello world hello", ("hello",)) == (0, "hello")
    assert match_stop("hello world hello", ("hello",), after=5) == (12, "hello")
    assert match_stop("hello world", ("lo wo",), after=5) == (3, "lo wo")  # starts inside, ends past it
    assert match_stop("abc", ("b", "abc")) == (0, "abc")
    assert match_stop("abc", ("zz",)) is None


# --- text: stop strings under min_tokens, include_stop_str_in_output, skip_special_tokens ------


def push_all(engine, ids: list[int], p: SamplingParams) -> tuple[list[str], GenerationResult]:
    stream = TextStream(engine.tokenizer, engine._params(p), GenerationResult([1]))
    deltas = []
    for t in ids:
        deltas.append(stream.push(t))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return deltas, stream.result


@pytest.mark.parametrize("text, stop, min_tokens, include, expected", [
    ("hello world hello there", ["hello"], 0, False, ""),
    ("hello world hello there", ["hello"], 1, False, "hello world "),  # the first token's text cannot stop it
    ("hello world hello there", ["hello"], 1, True, "hello world hello"),
    ("hello world hello there", [" there", "world"], 0, True, "hello world"),
    ("hello world hello there", ["lo wor"], 1, False, "hel"),  # starts in the guarded text, ends past it
    ("hello world hello there", ["lo wor"], 2, False, "hello world hello there"),
    ("hello world hello there", ["o w"], 0, True, "hello w"),
])
def test_stop_strings_with_min_tokens_and_include(engine, text, stop, min_tokens, include, expected):
    ids = engine.tokenizer.encode(text)
    assert engine.tokenizer.decode(ids[:1]) == "hello" and engine.tokenizer.decode(ids[1:2]) == " world"
    p = SamplingParams(stop=stop, min_tokens=min_tokens, include_stop_str_in_output=include, max_new_tokens=20)
    deltas, result = push_all(engine, ids, p)
    assert "".join(deltas) == expected
    assert result.finish_reason == ("stop" if expected != text else "length")
    if include:  # nothing is held back: each token's text goes out with it
        assert deltas[0] == "hello"


def test_skip_special_tokens_false_renders_them(engine):
    ids = engine.tokenizer.encode("<|im_start|>user\nhi")
    assert ids[0] == IM_START
    assert "".join(push_all(engine, ids, SamplingParams())[0]) == "user\nhi"
    assert "".join(push_all(engine, ids, SamplingParams(skip_special_tokens=False))[0]) == "<|im_start|>user\nhi"


def test_greedy_text_fields_against_the_decoded_tokens(engine, chat):
    """The greedy tokens decoded by the tokenizer are the reference text."""
    decode = engine.tokenizer.decode
    base = solo(engine, chat, SamplingParams(max_new_tokens=12))
    assert base.finish_reason == "length" and base.text == decode(base.tokens)
    stop = decode(base.tokens[4:6])[1:4]
    assert base.text.count(stop) == 1
    cut = base.text.index(stop)
    r = solo(engine, chat, SamplingParams(max_new_tokens=12, stop=[stop]))
    assert (r.text, r.finish_reason) == (base.text[:cut], "stop")
    r = solo(engine, chat, SamplingParams(max_new_tokens=12, stop=[stop], include_stop_str_in_output=True))
    assert (r.text, r.finish_reason) == (base.text[: cut + len(stop)], "stop") and r.tokens == base.tokens[:6]
    # min_tokens past the stop string's tokens: the string is not checked there, generation runs on
    r = solo(engine, chat, SamplingParams(max_new_tokens=12, stop=[stop], min_tokens=6))
    assert (r.text, r.finish_reason, r.tokens) == (base.text, "length", base.tokens)
    # a stop token id that is an ordinary token: its text stays with include_stop_str_in_output
    third = base.tokens[2]
    r = solo(engine, chat, SamplingParams(max_new_tokens=12, stop_token_ids=[third]))
    assert r.text == decode(base.tokens[:2]) and r.tokens == base.tokens[:3]
    r = solo(engine, chat, SamplingParams(max_new_tokens=12, stop_token_ids=[third], include_stop_str_in_output=True))
    assert r.text == decode(base.tokens[:3]) and r.finish_reason == "stop"
    # special tokens: forced <|im_start|> renders only without skip_special_tokens; a forced eos renders only
    # with include_stop_str_in_output and skip_special_tokens false (vLLM's detokenizer)
    forced = SamplingParams(max_new_tokens=3, logit_bias={IM_START: 100})
    assert solo(engine, chat, forced).text == ""
    assert solo(engine, chat, replace(forced, skip_special_tokens=False)).text == "<|im_start|>" * 3
    eos = engine.tokenizer.eos_token_ids[0]
    forced = SamplingParams(max_new_tokens=3, logit_bias={eos: 100}, skip_special_tokens=False)
    assert solo(engine, chat, forced).text == ""
    assert solo(engine, chat, replace(forced, include_stop_str_in_output=True)).text == "<|im_end|>"
    results = engine.generate([chat], replace(forced, include_stop_str_in_output=True))  # generate's text too
    assert results[0].text == "<|im_end|>" and results[0].tokens == [eos]


# --- min_tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_holds_the_stop_ids_back_like_transformers_with_them_banned(engine, hf, chat, ignore_eos):
    """eos forced by a bias of 100: with min_tokens m the first m tokens are the model's best
    non-stop tokens (every eos id and stop_token_ids entry banned, eos too under ignore_eos, as
    vLLM's all_stop_token_ids), then eos; it stops there unless ignore_eos."""
    eos = engine.tokenizer.eos_token_ids
    m, extra = 4, 220
    p = SamplingParams(max_new_tokens=7, min_tokens=m, logit_bias={eos[0]: 100, extra: 90}, ignore_eos=ignore_eos,
                       stop_token_ids=(*eos, extra))
    without = engine.generate([chat], replace(p, min_tokens=0))[0].tokens
    assert without == ([eos[0]] * 7 if ignore_eos else [eos[0]])

    def choose(i: int, x: np.ndarray, out: list[int]) -> int:
        x = x.copy()
        x[eos[0]] += 100
        x[extra] += 90
        if i < m:
            x[[*eos, extra]] = -np.inf
        return int(np.argmax(x))

    expected = hf_steps(hf, chat, 7, choose, stop=frozenset({extra} if ignore_eos else {*eos, extra}))
    r = engine.generate([chat], p)[0]
    assert r.tokens == expected
    assert not set(r.tokens[:m]) & {*eos, extra}
    if ignore_eos:
        assert r.tokens[m:] == [eos[0]] * 3 and r.finish_reason == "length"
    else:
        assert len(r.tokens) == m + 1 and r.tokens[m] == eos[0] and r.finish_reason == "stop"


def test_min_tokens_yields_to_a_complete_structured_output(engine, chat):
    """The constraint wins: once "alpha" is complete only eos is allowed, min_tokens or not."""
    spec = StructuredOutput.choice(["alpha"])
    r = engine.generate([chat], SamplingParams(max_new_tokens=20, min_tokens=15, structured=spec))[0]
    assert r.text == "alpha" and r.finish_reason == "stop"
    # while the grammar allows more than eos, min_tokens holds eos back
    regex = StructuredOutput.regex("[ab]+")
    free = engine.generate([chat], SamplingParams(max_new_tokens=12, structured=regex,
                                                  logit_bias={engine.tokenizer.eos_token_ids[0]: 100}))[0]
    held = engine.generate([chat], SamplingParams(max_new_tokens=12, structured=regex, min_tokens=6,
                                                  logit_bias={engine.tokenizer.eos_token_ids[0]: 100}))[0]
    assert len(free.tokens) < 6 and len(held.tokens) == 7 and held.finish_reason == "stop"
    assert set(held.text) <= {"a", "b"}


# --- allowed_token_ids and bad_words -------------------------------------------------------------


def test_allowed_token_ids_are_the_argmax_over_the_set(engine, hf, chat):
    allowed = [int(t) for t in np.random.default_rng(7).choice(150000, 40, replace=False)]
    p = SamplingParams(max_new_tokens=8, allowed_token_ids=allowed, logit_bias={11: 100})  # 11 is not allowed
    r = engine.generate([chat], p)[0]
    expected = hf_steps(hf, chat, 8, lambda i, x, out: allowed[int(np.argmax(x[allowed]))])
    assert r.tokens == expected and set(r.tokens) <= set(allowed)
    sampled = engine.generate([chat], replace(p, temperature=1.5, seed=3))[0]
    assert set(sampled.tokens) <= set(allowed) and sampled.tokens != r.tokens


def test_bad_words_tokenized_as_vllm_with_transformers_tokenizer(engine, tokenizer_dir):
    """vLLM's update_from_tokenizer run on transformers' tokenizer of the same files."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    words = ["hello", " world", "experts", "  router s", "你好", "<|im_start|>x"]
    expected: list[list[int]] = []
    for word in words:
        for space in ("", " "):
            ids = hf_tok.encode(space + word.lstrip(), add_special_tokens=False)
            if not space or (ids[0] != expected[-1][0] and len(ids) == len(expected[-1])):
                expected.append(ids)
    got = bad_word_sequences(words, engine.tokenizer.encode)
    assert [list(x) for x in got] == expected
    assert len(got) > len(words)  # some words are banned in both forms ("hello" / " hello")
    p = engine._params(SamplingParams(bad_words=words))
    assert p.bad_words_token_ids == got and engine._params(p) == p  # filled once, idempotent


def test_a_one_token_bad_word_equals_a_bias_of_minus_100(engine, chat):
    """bad_words=["hello"] bans " hello" too; the ban holds against a +100 bias (masks come first)."""
    bare, spaced = engine.tokenizer.encode("hello")[0], engine.tokenizer.encode(" hello")[0]
    banned = engine.generate([chat], SamplingParams(max_new_tokens=8, bad_words=["hello"],
                                                    logit_bias={bare: 100, spaced: 99}))[0]
    reference = engine.generate([chat], SamplingParams(max_new_tokens=8, logit_bias={bare: -100, spaced: -100}))[0]
    assert banned.tokens == reference.tokens and not {bare, spaced} & set(banned.tokens)
    assert engine.generate([chat], SamplingParams(max_new_tokens=3, logit_bias={bare: 100}))[0].tokens == [bare] * 3


def test_a_two_token_bad_word_bans_its_last_token_after_the_first(engine, chat):
    """The greedy run has tokens g1 g2 that a word's text tokenizes to: banning the word changes the
    step after g1 only (reference: greedy up to g1, then a -100 bias on g2 for that one step, then
    greedy again), and the prompt's tokens do not count."""
    decode, encode = engine.tokenizer.decode, engine.tokenizer.encode
    base = engine.generate([chat], SamplingParams(max_new_tokens=10))[0].tokens
    i, word = next((i, decode(base[i: i + 2])) for i in range(1, 8)
                   if tuple(base[i: i + 2]) in bad_word_sequences([decode(base[i: i + 2])], encode))
    g1, g2 = base[i], base[i + 1]
    r = engine.generate([chat], SamplingParams(max_new_tokens=10, bad_words=[word]))[0]
    head = base[: i + 1]
    step = engine.generate([chat + head], SamplingParams(max_new_tokens=1, logit_bias={g2: -100}))[0].tokens
    rest = engine.generate([chat + head + step], SamplingParams(max_new_tokens=10 - len(head) - 1))[0].tokens
    assert g1 not in step + rest  # so the rule never fires again in this case
    assert r.tokens == head + step + rest and r.tokens != base
    # the prompt ending with g1 does not ban g2 as the first generated token
    first = engine.generate([chat + [g1]], SamplingParams(max_new_tokens=1))[0].tokens[0]
    assert engine.generate([chat + [g1]], SamplingParams(max_new_tokens=1, bad_words_token_ids=[[g1, first]])
                           )[0].tokens == [first]


# --- prompt_logprobs -----------------------------------------------------------------------------


def test_prompt_logprobs_against_transformers_and_numpy_ranks(engine, hf):
    ids = engine.tokenizer.encode("Routers send tokens to experts; 专家 choose") + [IM_START]
    results = engine.generate([ids, ids[:1]], SamplingParams(max_new_tokens=2, prompt_logprobs=3))
    got, single = results[0].prompt_logprobs, results[1].prompt_logprobs
    assert single == [None]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
    own = prompt_logits(engine, ids).astype(np.float64)  # the engine's own logits, for exact ranks
    assert got is not None and got[0] is None and len(got) == len(ids)
    for i in range(1, len(ids)):
        e = got[i]
        assert e is not None and e.token == ids[i] and abs(e.logprob - ref[i - 1, ids[i]]) < 1e-4
        assert e.rank == int(np.count_nonzero(own[i - 1] > own[i - 1, ids[i]])) + 1
        near = ref[i - 1, ids[i]]  # against transformers: up to ties closer than the tolerance
        assert np.count_nonzero(ref[i - 1] > near + 1e-4) < e.rank <= np.count_nonzero(ref[i - 1] > near - 1e-4) + 1
        np.testing.assert_allclose([v for _, v in e.top], np.sort(ref[i - 1])[::-1][:3], atol=1e-4)
    assert any(e.rank > 1 for e in got[1:] if e is not None)
    # stream_text fills the result before its first delta
    result = GenerationResult(list(ids))
    stream = engine.stream_text(ids, SamplingParams(max_new_tokens=2, prompt_logprobs=0), result=result)
    next(stream, None)
    assert [e.logprob if e else None for e in result.prompt_logprobs] == \
        pytest.approx([e.logprob if e else None for e in got], abs=1e-6)
    assert all(e.top == () for e in result.prompt_logprobs[1:])


# --- the scheduler ------------------------------------------------------------------------------


def test_scheduler_requests_with_different_fields_equal_their_solo_runs(engine, chat):
    eos = engine.tokenizer.eos_token_ids[0]
    base = solo(engine, chat, SamplingParams(max_new_tokens=10))
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 2]
    prompts = [chat, chat, engine.tokenizer.encode("Experts are"), chat, engine.tokenizer.encode("Routers")]
    params = [
        SamplingParams(max_new_tokens=8, min_tokens=5, logit_bias={eos: 100}),
        SamplingParams(max_new_tokens=10, stop=[stop], include_stop_str_in_output=True),
        SamplingParams(max_new_tokens=9, temperature=1.0, seed=5, allowed_token_ids=list(range(1000, 1400))),
        SamplingParams(max_new_tokens=6, bad_words=["hello", base.text[:3]], skip_special_tokens=False,
                       logit_bias={IM_START: 5}),
        SamplingParams(max_new_tokens=8, min_tokens=8, stop=["e"], temperature=0.8, seed=1),
    ]
    sched = BatchScheduler(engine, max_slots=5, capacity=128)
    done = run_requests(sched, list(zip(prompts, params)))
    assert sched.max_batch == 5
    for i, ((result, text), x, p) in enumerate(zip(done, prompts, params)):
        alone = solo(engine, x, p)
        assert (result.tokens, text, result.finish_reason) == \
            (alone.tokens, alone.text, alone.finish_reason), f"request {i}"
    assert len(done[0][0].tokens) == 6 and done[1][0].finish_reason == "stop"
    assert done[1][1].endswith(stop)
    assert set(done[2][0].tokens) <= set(range(1000, 1400))
    assert len(done[4][0].tokens) == 8


def test_a_request_left_with_no_token_ends_alone(engine, chat):
    sched = BatchScheduler(engine, max_slots=2, capacity=64)
    errors: list[BaseException] = []
    sched.submit(chat, SamplingParams(max_new_tokens=4, allowed_token_ids=[9707], bad_words_token_ids=[[9707]]),
                 on_error=errors.append)
    good = SamplingParams(max_new_tokens=5)
    gen = sched.submit(chat, good)
    while sched.has_work():
        sched.step()
    assert len(errors) == 1 and isinstance(errors[0], SamplingError) and "no token is left" in str(errors[0])
    assert gen.result.tokens == solo(engine, chat, good).tokens


def test_speculative_drafts_keep_the_masks(engine, chat):
    """n-gram drafts (runtime/speculative.py) are verified token by token through the same
    sampler: with the output confined to a few tokens (repeats, so drafts happen) each request
    equals the scheduler without speculation, and the masks hold."""
    from runtime.speculative import NgramSpeculation

    eos = engine.tokenizer.eos_token_ids[0]
    few = [11, 220, 9707, 1879, eos]
    params = [
        SamplingParams(max_new_tokens=30, allowed_token_ids=few, min_tokens=12, bad_words_token_ids=[[11, 220], [1879]],
                       logit_bias={eos: 2}),
        SamplingParams(max_new_tokens=30, allowed_token_ids=few[:4], temperature=1.0, seed=2, min_tokens=10,
                       stop=[", "], include_stop_str_in_output=True),
    ]

    def run(speculation):
        sched = BatchScheduler(engine, max_slots=2, capacity=128, speculation=speculation)
        done = run_requests(sched, [(chat, p) for p in params])
        return [(r.tokens, text, r.finish_reason) for r, text in done], sched

    plain, _ = run(None)
    drafted, sched = run(NgramSpeculation(4, 3, 1))
    assert drafted == plain and sched.accepted_tokens > 0
    tokens = plain[0][0]
    assert eos not in tokens[:12] and 1879 not in tokens
    assert all((a, b) != (11, 220) for a, b in zip(tokens, tokens[1:]))
    assert len(plain[1][0]) >= 10 and set(plain[1][0]) <= set(few[:4])
