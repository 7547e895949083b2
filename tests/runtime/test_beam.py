"""Beam search (runtime/beam.py) against transformers' own `generate(num_beams=K, do_sample=False)`
on the tiny checkpoint: the same sequences in the same order, scores within 1e-4 (transformers
scores in float32). Stop ids are picked from tokens the beams actually produce, so hypotheses
finish at different steps and the finishing, length-penalty and early-stopping rules all act."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from runtime.beam import BeamSearchError, BeamSearchParams, beam_search
from tests.helpers import hf_model

PROMPT = [9707, 11, 1879, 0, 220]


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return runtime.load(tiny_artifact)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return hf_model(tiny_checkpoint)


def hf_beams(model, prompt, K, N, length_penalty, early_stopping, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=K, do_sample=False, max_new_tokens=N,
                             length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=K,
                             output_scores=True, return_dict_in_generate=True, repetition_penalty=1.0,
                             temperature=None, top_p=None, top_k=None, eos_token_id=list(eos), pad_token_id=eos[0])
    seqs = []
    for s in out.sequences.tolist():
        gen = s[len(prompt):]
        for i, t in enumerate(gen):  # what follows a finishing eos is padding
            if t in eos:
                gen = gen[: i + 1]
                break
        seqs.append(gen)
    # one beam: transformers runs greedy search, which reports no sequence scores
    return seqs, out.sequences_scores.tolist() if K > 1 else None


def frequent_tokens(engine, K, N, every: bool = False) -> list[int]:
    """Tokens the unconstrained beams produce at their 3rd and 5th steps (every: at any step): as
    stop ids they end hypotheses early, at different steps (every: most candidates stop, so the
    finished set fills early and the early-stopping rules decide)."""
    free = beam_search(engine, PROMPT, BeamSearchParams(num_beams=K, max_new_tokens=N, num_return_sequences=K,
                                                        ignore_eos=True))
    if every:
        return list(dict.fromkeys(t for b in free for t in b.tokens[1:]))
    picks = [b.tokens[2] for b in free[:2]] + [free[-1].tokens[4]]
    return list(dict.fromkeys(picks))


@pytest.mark.parametrize("K,N,length_penalty,early_stopping", [
    (4, 12, 1.0, False), (3, 10, 0.0, "never"), (2, 8, 2.0, True), (5, 9, -0.5, False), (1, 6, 1.0, False),
    (4, 10, 1.0, True), (3, 8, 1.5, "never"),
])
@pytest.mark.parametrize("stops", ["eos", "hit", "many"])
def test_beams_equal_transformers(engine, hf, K, N, length_penalty, early_stopping, stops):
    eos = tuple(engine.tokenizer.eos_token_ids) if stops == "eos" else \
        tuple(frequent_tokens(engine, max(K, 2), N, every=stops == "many"))
    ours = beam_search(engine, PROMPT, BeamSearchParams(num_beams=K, max_new_tokens=N, length_penalty=length_penalty,
                                                        early_stopping=early_stopping, num_return_sequences=K,
                                                        stop_token_ids=eos))
    seqs, scores = hf_beams(hf, PROMPT, K, N, length_penalty, early_stopping, eos)
    assert [b.tokens for b in ours] == seqs
    if scores is not None:
        assert np.allclose([b.score for b in ours], scores, atol=1e-4, rtol=0)
    assert [b.finish_reason for b in ours] == ["stop" if s[-1] in eos else "length" for s in seqs]
    if stops == "hit" and length_penalty <= 1.0 and K > 1:  # (a penalty > 1 favours the longer, unstopped ones)
        assert any(b.finish_reason == "stop" for b in ours)  # the stop ids did end hypotheses
    assert all(b.text == engine.tokenizer.decode(b.tokens, skip_special_tokens=True) for b in ours)


def test_one_beam_is_greedy(engine):
    from runtime.sampling import SamplingParams

    greedy = engine.generate([PROMPT], SamplingParams(max_new_tokens=10, ignore_eos=True))[0].tokens
    (beam,) = beam_search(engine, PROMPT, BeamSearchParams(num_beams=1, max_new_tokens=10, ignore_eos=True))
    assert beam.tokens == greedy


def test_best_first_and_num_return_sequences(engine):
    beams = beam_search(engine, PROMPT, BeamSearchParams(num_beams=4, max_new_tokens=6, num_return_sequences=3))
    assert len(beams) == 3 and [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    assert len({tuple(b.tokens) for b in beams}) == 3


@pytest.mark.parametrize("kw,match", [
    (dict(num_beams=0), "num_beams must be an integer in"),
    (dict(num_beams=17), "num_beams must be an integer in"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences must be an integer in"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(early_stopping="sometimes"), "early_stopping must be"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_bad_parameters(kw, match):
    with pytest.raises(BeamSearchError, match=match):
        BeamSearchParams(**kw)


def test_bad_prompts_and_context(engine):
    from runtime.engine import RequestError
    from runtime.yarn import ContextLengthError

    with pytest.raises(RequestError):
        beam_search(engine, [], BeamSearchParams())
    with pytest.raises(ContextLengthError):
        beam_search(engine, PROMPT, BeamSearchParams(max_new_tokens=10**6))


def first_tokens(engine, prompt, n: int) -> list[int]:
    """The n most likely first tokens after the prompt, most likely first."""
    return [b.tokens[0] for b in beam_search(engine, prompt, BeamSearchParams(
        num_beams=n, max_new_tokens=1, num_return_sequences=n, ignore_eos=True))]


def assert_equal_transformers(engine, hf, K, N, length_penalty, early_stopping, eos, **kw):
    ours = beam_search(engine, PROMPT, BeamSearchParams(num_beams=K, max_new_tokens=N, length_penalty=length_penalty,
                                                        early_stopping=early_stopping, num_return_sequences=K,
                                                        stop_token_ids=kw.pop("stop_token_ids", eos), **kw))
    seqs, scores = hf_beams(hf, PROMPT, K, N, length_penalty, early_stopping, eos)
    assert [b.tokens for b in ours] == seqs
    if scores is not None:
        assert np.allclose([b.score for b in ours], scores, atol=1e-4, rtol=0)
    return ours


@pytest.mark.parametrize("K,n_stops,N,length_penalty", [(2, 3, 3, 2.0), (3, 5, 3, 1.0)])
def test_more_stop_tokens_than_beams_among_the_best_candidates(engine, hf, K, n_stops, N, length_penalty):
    """The n_stops most likely first tokens stop: more than K of the best 2K candidates finish, so
    only the (1 + #eos) * K candidates transformers keeps leave K beams running (with 2K, the
    last one would be a dead beam and the search would lose the candidate ranked 2K + 1)."""
    stops = tuple(first_tokens(engine, PROMPT, n_stops))
    assert_equal_transformers(engine, hf, K, N, length_penalty, "never", stops)


@pytest.mark.parametrize("K,N,length_penalty", [(2, 4, 3.0), (3, 4, 1.5), (4, 5, 2.0)])
def test_the_early_stop_heuristic_ends_the_search(engine, hf, K, N, length_penalty):
    """The K most likely first tokens stop: all K hypotheses finish at the first step, the best
    running beam cannot beat them at its current length, so transformers' heuristic
    (early_stopping False) ends the search there, though longer beams would score better under a
    length penalty > 1."""
    stops = tuple(first_tokens(engine, PROMPT, K))
    ours = assert_equal_transformers(engine, hf, K, N, length_penalty, False, stops)
    assert all(len(b.tokens) == 1 and b.finish_reason == "stop" for b in ours)


@pytest.mark.parametrize("kw", [dict(length_penalty=1e308, max_new_tokens=4), dict(length_penalty=-1e308),
                                dict(length_penalty=400.0, max_new_tokens=10**4), dict(length_penalty=10**400)])
def test_length_penalties_past_float_range_are_refused(engine, kw):
    """length ** length_penalty must stay a float: Python's ** raised OverflowError mid-search."""
    with pytest.raises(BeamSearchError, match="length_penalty must be"):
        beam_search(engine, PROMPT, BeamSearchParams(num_beams=2, **kw))
    BeamSearchParams(num_beams=2, max_new_tokens=4, length_penalty=400.0)  # 4 ** 400 is a float


@pytest.mark.parametrize("length_penalty,early_stopping", [(2.0, "never"), (1.0, "never"), (2.0, False)])
def test_one_beam_stops_at_the_first_eos_as_greedy_search(engine, hf, length_penalty, early_stopping):
    """num_beams=1 is greedy search in transformers: the first stop token ends it, whatever the
    length penalty would make of a longer beam."""
    greedy = beam_search(engine, PROMPT, BeamSearchParams(num_beams=1, max_new_tokens=8, ignore_eos=True))[0].tokens
    (beam,) = assert_equal_transformers(engine, hf, 1, 8, length_penalty, early_stopping, (greedy[2],))
    assert beam.tokens == greedy[:3] and beam.finish_reason == "stop"


def test_ignore_eos_keeps_the_other_stop_ids(engine, hf):
    """As in sampling (SamplingParams.stop_ids, vLLM): ignore_eos drops the model's eos ids only;
    the other stop_token_ids still end beams."""
    eos = tuple(engine.tokenizer.eos_token_ids)
    extra = tuple(t for t in frequent_tokens(engine, 3, 8) if t not in eos)
    ours = assert_equal_transformers(engine, hf, 3, 8, 1.0, False, extra, stop_token_ids=(*eos, *extra),
                                     ignore_eos=True)
    assert any(b.finish_reason == "stop" for b in ours)
    assert all(len(b.tokens) == 8 for b in beam_search(engine, PROMPT, BeamSearchParams(
        num_beams=3, max_new_tokens=8, num_return_sequences=3, stop_token_ids=eos, ignore_eos=True)))
