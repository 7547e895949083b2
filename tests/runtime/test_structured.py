"""Structured output (runtime/structured.py through llguidance) on the tiny artifact: every output
must match its constraint, checked by independent validators (jsonschema, Python's re, a parser
written here), for greedy and seeded sampling, alone and in the continuous-batching scheduler.

The tiny model has random weights: left alone it emits no JSON at all, so a valid output shows the
constraint at work, not the model.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

import runtime
from runtime.batching import BatchScheduler
from runtime.engine import GenerationResult, RequestError
from runtime.sampling import SamplingError, SamplingParams
from runtime.structured import StructuredOutput, StructuredOutputError, from_request

PROMPTS = [[9707, 11, 1879], [151644, 872, 198, 108386]]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "score": {"type": "integer", "minimum": -9, "maximum": 99},
    },
    "required": ["name", "age", "member", "tags"],
    "additionalProperties": False,
}
SAMPLING = [dict(), dict(temperature=1.0, seed=1), dict(temperature=0.8, top_p=0.9, top_k=50, seed=7)]


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return runtime.load(tiny_artifact)


def run(engine, spec: StructuredOutput, n: int = 64, **sampling) -> list[GenerationResult]:
    return engine.generate(PROMPTS, SamplingParams(max_new_tokens=n, structured=spec, **sampling))


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "T1", "T0.8-p0.9-k50"])
def test_json_schema_outputs_validate(engine, sampling):
    for r in run(engine, StructuredOutput.json_schema(PERSON), **sampling):
        assert r.finish_reason == "stop", r.text  # the grammar completes and then allows only eos
        value = json.loads(r.text)
        jsonschema.validate(value, PERSON)
        required = [k for k in PERSON["properties"] if k in PERSON["required"]]
        assert list(value)[: len(required)] == required  # the schema's order
        assert r.tokens[-1] in engine.tokenizer.eos_token_ids


def test_unconstrained_output_is_not_json(engine):
    for r in engine.generate(PROMPTS, SamplingParams(max_new_tokens=30)):
        with pytest.raises(ValueError):
            json.loads(r.text)


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[a-z]{2,5}", r"(yes|no), because [A-Z][a-z]{1,8}\.", r"-?[0-9]{1,4}\.[0-9]{2}"])
def test_regex_outputs_match(engine, pattern):
    for sampling in SAMPLING:
        for r in run(engine, StructuredOutput.regex(pattern), **sampling):
            assert r.finish_reason == "stop" and re.fullmatch(pattern, r.text), (pattern, r.text)


def test_choice_outputs_are_one_of_the_choices(engine):
    options = ["positive", "negative", "neutral", "中性"]
    seen = set()
    for seed in range(6):
        for r in run(engine, StructuredOutput.choice(options), temperature=1.5, seed=seed):
            assert r.text in options and r.finish_reason == "stop"
            seen.add(r.text)
    assert len(seen) > 1, "sampling should reach more than one choice"


def parse_sum(text: str) -> int:
    """The grammar below, parsed by hand: '(' N ('+' N)* ')' with 1-3 digit numbers."""
    m = re.fullmatch(r"\((\d{1,3}(?:\+\d{1,3})*)\)", text)
    assert m, text
    return sum(int(x) for x in m.group(1).split("+"))


@pytest.mark.parametrize("grammar", [
    'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/',  # Lark
    'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] | [0-9][0-9] | [0-9][0-9][0-9]',  # llama.cpp GBNF
], ids=["lark", "gbnf"])
def test_grammar_outputs_parse(engine, grammar):
    for sampling in SAMPLING:
        for r in run(engine, StructuredOutput.grammar(grammar), n=48, **sampling):
            if r.finish_reason == "stop":
                parse_sum(r.text)
            else:  # ran out of tokens inside a long sum: still a prefix of the language
                assert re.fullmatch(r"\((\d{1,3}\+)*\d{0,3}", r.text), r.text


def test_json_object_and_any_json(engine):
    for r in run(engine, StructuredOutput.json_object(), n=48, temperature=0.7, seed=3):
        if r.finish_reason == "stop":
            assert isinstance(json.loads(r.text), dict)
        else:
            assert r.text.startswith("{")


def test_logprobs_stay_the_models_and_scheduler_matches_solo(engine):
    """Constrained and unconstrained requests sharing steps: each equals its solo run; logprobs
    are the unmasked model's (the same as an unconstrained run where the tokens agree)."""
    spec = StructuredOutput.json_schema(PERSON)
    params = [SamplingParams(max_new_tokens=40, structured=spec, logprobs=2),
              SamplingParams(max_new_tokens=12, ignore_eos=True),
              SamplingParams(max_new_tokens=40, structured=StructuredOutput.regex(r"[a-z]{4} [0-9]{2}"),
                             temperature=1.0, seed=4)]
    prompts = PROMPTS + [[9707] * 5]
    scheduler = BatchScheduler(engine, max_slots=3, capacity=64)
    texts: list[list[str]] = [[] for _ in params]
    gens = [scheduler.submit(x, p, on_delta=texts[i].append) for i, (x, p) in enumerate(zip(prompts, params))]
    while scheduler.has_work():
        scheduler.step()
    for gen, text, x, p in zip(gens, texts, prompts, params):
        alone = GenerationResult(list(x))
        alone.text = "".join(engine.stream_text(x, p, result=alone))
        assert (gen.result.tokens, "".join(text)) == (alone.tokens, alone.text)
    jsonschema.validate(json.loads("".join(texts[0])), PERSON)
    assert re.fullmatch(r"[a-z]{4} [0-9]{2}", "".join(texts[2]))
    # raw logprobs: the first token of the JSON run has the unconstrained model's log-probability
    first = gens[0].result.logprobs[0]
    logits = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=1), output_logits=True)[0].logits[0]
    ref = logits.astype(np.float64) - logits.max() - np.log(np.exp(logits.astype(np.float64) - logits.max()).sum())
    assert abs(first.logprob - ref[first.token]) < 1e-6 and first.logprob < ref.max() - 1e-3


def test_thousands_of_choices_and_any_json(engine):
    options = [f"option {i} (a+b)*[c] ~ & # - é 你" for i in range(5000)]
    r = run(engine, StructuredOutput.choice(options), n=60, temperature=1.0, seed=2)
    assert all(x.text in options and x.finish_reason == "stop" for x in r)
    outputs = run(engine, StructuredOutput.json_schema(True), n=40) + \
        run(engine, StructuredOutput.json_schema(True), n=40, temperature=1.0, seed=5)
    finished = [x for x in outputs if x.finish_reason == "stop"]
    assert finished  # some complete within 40 tokens (short values); long strings run out of tokens
    for x in finished:
        json.loads(x.text)
    for x in outputs:
        assert x.text[:1] in '[{"-0123456789tfn'  # every one starts a JSON value


def test_a_request_whose_every_allowed_token_is_penalised_away_ends_alone(engine):
    """A grammar allowing one token, which a bias and penalty send to -inf: that request fails with
    a SamplingError; a request sharing its steps finishes as it would alone."""
    first = engine.tokenizer.encode("b")[0]
    bad = SamplingParams(max_new_tokens=3, structured=StructuredOutput.choice(["b"]), temperature=1.0,
                         top_p=0.9, repetition_penalty=1e308, logit_bias={first: -100})
    good = SamplingParams(max_new_tokens=6)
    scheduler = BatchScheduler(engine, max_slots=2, capacity=64)
    errors: list[BaseException] = []
    texts: list[str] = []
    scheduler.submit([first, 9707], bad, on_error=errors.append)
    gen = scheduler.submit(PROMPTS[0], good, on_delta=texts.append)
    while scheduler.has_work():
        scheduler.step()
    assert len(errors) == 1 and isinstance(errors[0], SamplingError) and "probability 0" in str(errors[0])
    alone = GenerationResult(list(PROMPTS[0]))
    assert ("".join(texts), gen.result.tokens) == ("".join(engine.stream_text(PROMPTS[0], good, result=alone)),
                                                  alone.tokens)


@pytest.mark.parametrize("spec, match", [
    (StructuredOutput.json_schema({"type": "nonsense"}), "invalid json_schema"),
    (StructuredOutput.grammar('start: a\na: a "x"'), "invalid grammar"),  # no finite string: no first token
    (StructuredOutput.json_schema({"$ref": "#"}), "invalid json_schema"),
    (StructuredOutput.regex("(unclosed"), "invalid regex"),
    (StructuredOutput.grammar("start: undefined_rule"), "invalid grammar"),
    (StructuredOutput.grammar("this is not a grammar ::= ::="), "invalid grammar"),
])
def test_bad_constraints_fail_before_any_compute(engine, spec, match):
    steps = []
    engine.backend.step, original = (lambda *a, **k: steps.append(1)), engine.backend.step
    try:
        with pytest.raises(StructuredOutputError, match=match) as e:
            engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, structured=spec))
    finally:
        engine.backend.step = original
    assert not steps and "\n" not in str(e.value)


def test_constructor_and_params_errors(engine):
    with pytest.raises(StructuredOutputError, match="kind must be one of"):
        StructuredOutput("xml", "<a/>")
    with pytest.raises(StructuredOutputError, match="not valid JSON"):
        StructuredOutput.json_schema("{bad")
    with pytest.raises(StructuredOutputError, match="must be an object"):
        StructuredOutput.json_schema([1, 2])
    for bad in ([], [""], "abc", [1], {"yes": 1}):
        with pytest.raises(StructuredOutputError, match="non-empty list"):
            StructuredOutput.choice(bad)
    with pytest.raises(SamplingError, match="ignore_eos cannot be combined"):
        SamplingParams(structured=StructuredOutput.regex("a"), ignore_eos=True)
    with pytest.raises(SamplingError, match="structured must be"):
        SamplingParams(structured={"type": "json_object"})
    with pytest.raises(RequestError, match="stop_token_ids must all include"):
        engine.generate(PROMPTS, SamplingParams(structured=StructuredOutput.regex("a"), stop_token_ids=(5,)))
    with pytest.raises(StructuredOutputError, match="false matches nothing"):
        StructuredOutput.json_schema(False)
    assert StructuredOutput.choice(["a", "b", "a"]) == StructuredOutput.choice(["a", "b"])


def test_from_request_maps_openai_and_vllm_fields():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    got, field = from_request({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert field == "response_format" and got == StructuredOutput.json_schema(schema)
    assert list(json.loads(got.spec)["properties"]) == ["b", "a"]  # order kept
    assert from_request({"response_format": {"type": "json_object"}})[0] == StructuredOutput.json_object()
    assert from_request({"response_format": {"type": "text"}}) == (None, None)
    assert from_request({}) == (None, None)
    assert from_request({"guided_regex": "a+"}) == (StructuredOutput.regex("a+"), "guided_regex")
    assert from_request({"guided_choice": ["a", "b"]})[0] == StructuredOutput.choice(["a", "b"])
    assert from_request({"guided_json": '{"type": "integer"}'})[0] == StructuredOutput.json_schema({"type": "integer"})
    assert from_request({"structured_outputs": {"grammar": "start: /x/"}}) == (
        StructuredOutput.grammar("start: /x/"), "structured_outputs")
    assert from_request({"structured_outputs": {"json_object": True}})[0] == StructuredOutput.json_object()
    assert from_request({"response_format": {"type": "json_schema", "json_schema": {"schema": True}}})[0] == \
        StructuredOutput.json_schema({})
    for body, match in [
        ({"response_format": {"type": "yaml"}}, "^response_format must be"),
        ({"response_format": "json"}, "^response_format must be"),
        ({"response_format": {"type": "json_schema"}}, "^response_format json_schema needs"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "^response_format json_schema"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "^guided_regex: only one structured output"),
        ({"structured_outputs": ["json"]}, "^structured_outputs must be"),
        ({"structured_outputs": {"structural_tag": "x"}}, "^structured_outputs: structural_tag is not supported"),
        ({"guided_choice": {"yes": 1}}, "^guided_choice: choice must be a non-empty list"),
        ({"guided_choice": "ab"}, "^guided_choice: choice must be a non-empty list"),
        ({"guided_regex": 5}, "^guided_regex: a regex must be a non-empty string"),
        ({"guided_json": "{nope"}, "^guided_json: the JSON schema is not valid JSON"),
    ]:
        with pytest.raises(StructuredOutputError, match=match):
            from_request(body)
