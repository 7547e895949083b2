"""The request contract (runtime/triton/protocol.py) against the engine's own tokenizer and limits."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from runtime.errors import QmoeError
from runtime.sampling import SamplingParams
from runtime.triton import protocol
from runtime.triton.protocol import parse_request
from runtime.yarn import context_limit

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def request(**inputs):
    return {name: [value if isinstance(value, bytes) else value.encode()] for name, value in inputs.items()}


def test_prompt_is_tokenized_like_complete(embedded):
    req = parse_request(request(prompt="Hello world", sampling_parameters=json.dumps(
        {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["\n"],
         "repetition_penalty": 1.1})), embedded)
    assert list(req.prompt_ids) == embedded.tokenizer.encode("Hello world")
    assert req.sampling == SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=3,
                                          stop=("\n",), repetition_penalty=1.1)


def test_penalties_bias_and_min_p_pass_through(embedded):
    req = parse_request(request(prompt="Hello", sampling_parameters=json.dumps(
        {"max_tokens": 3, "temperature": 1.0, "min_p": 0.2, "presence_penalty": -0.5, "frequency_penalty": 1.5,
         "logit_bias": {"11": -100, "9707": 2.5}})), embedded)
    assert req.sampling == SamplingParams(max_new_tokens=3, temperature=1.0, min_p=0.2, presence_penalty=-0.5,
                                          frequency_penalty=1.5, logit_bias={11: -100.0, 9707: 2.5})


def test_structured_output_parameters(embedded):
    from runtime.structured import StructuredOutput

    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    req = parse_request(request(prompt="Hello", sampling_parameters=json.dumps(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})), embedded)
    assert req.sampling.structured == StructuredOutput.json_schema(schema)
    req = parse_request(request(prompt="Hello", sampling_parameters='{"guided_choice": ["a", "b"]}'), embedded)
    assert req.sampling.structured == StructuredOutput.choice(["a", "b"])


def test_vllm_fields_pass_through(embedded):
    req = parse_request(request(prompt="Hello", sampling_parameters=json.dumps(
        {"max_tokens": 6, "min_tokens": 2, "allowed_token_ids": [11, 220], "bad_words": ["hi"],
         "include_stop_str_in_output": True, "skip_special_tokens": False, "stop": "x"})), embedded)
    assert req.sampling == SamplingParams(max_new_tokens=6, min_tokens=2, allowed_token_ids=(11, 220),
                                          bad_words=("hi",), include_stop_str_in_output=True,
                                          skip_special_tokens=False, stop=("x",))
    # the model's generation honours them (stream_text, as model.py runs it): only 11 and 220 (",", " ")
    out = "".join(embedded.stream_text(list(req.prompt_ids), req.sampling))
    assert set(out) <= {",", " "} and len(out) == 6


def test_messages_use_the_chat_template(embedded):
    req = parse_request(request(messages=json.dumps(MESSAGES)), embedded)
    assert list(req.prompt_ids) == embedded.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)


def test_default_max_tokens_fits_the_context(embedded):
    limit = context_limit(embedded.config, embedded.rope_mode)
    assert parse_request(request(prompt="Hello"), embedded).sampling.max_new_tokens == protocol.DEFAULT_MAX_TOKENS
    assert parse_request(request(prompt="Hello"), embedded, default_max_tokens=7).sampling.max_new_tokens == 7
    near_full = "hello " * (limit - 3)  # "hello" tokens: one per word after the first
    req = parse_request(request(prompt=near_full), embedded)
    assert len(req.prompt_ids) + req.sampling.max_new_tokens == limit


@pytest.mark.parametrize("inputs, message", [
    (request(prompt="hi", sampling_parameters="{bad"), "input 'sampling_parameters' is not valid JSON"),
    (request(prompt="hi", sampling_parameters="[1]"), "parameters must be a JSON object"),
    (request(prompt="hi", sampling_parameters='{"foo": 1}'), "unknown parameter 'foo'"),
    (request(prompt="hi", sampling_parameters='{"n": 2}'), "unknown parameter 'n'"),
    (request(prompt="hi", sampling_parameters='{"temperature": -1}'), "temperature must be >= 0"),
    (request(prompt="hi", sampling_parameters='{"top_p": 0}'), "top_p must be in (0, 1]"),
    (request(prompt="hi", sampling_parameters='{"top_k": 1.5}'), "top_k"),
    (request(prompt="hi", sampling_parameters='{"seed": -2}'), "seed"),
    (request(prompt="hi", sampling_parameters='{"stop": 5}'), "stop must be a string or a list of strings"),
    (request(prompt="hi", sampling_parameters='{"min_p": 2}'), "min_p must be in [0, 1]"),
    (request(prompt="hi", sampling_parameters='{"guided_regex": "(x"}'), "invalid regex"),
    (request(prompt="hi", sampling_parameters='{"response_format": {"type": "xml"}}'), "response_format must be"),
    (request(prompt="hi", sampling_parameters='{"presence_penalty": -3}'), "presence_penalty must be in [-2, 2]"),
    (request(prompt="hi", sampling_parameters='{"logit_bias": [[11, 1]]}'), "logit_bias must be a JSON object"),
    (request(prompt="hi", sampling_parameters='{"logit_bias": {"x": 1}}'), "logit_bias keys must be token ids"),
    (request(prompt="hi", sampling_parameters='{"logit_bias": {"151936": 1}}'), "logit_bias keys must be token ids in"),
    (request(prompt="hi", sampling_parameters='{"max_tokens": 0}'), "max_tokens must be an integer >= 1"),
    (request(prompt="hi", sampling_parameters='{"max_tokens": true}'), "max_tokens must be an integer >= 1"),
    (request(prompt="hi", sampling_parameters='{"max_tokens": 40000}'), "over the limit"),
    (request(prompt="hi " * 33000), "over the limit"),
    (request(prompt=""), "the prompt is empty"),
    (request(prompt=b"\xff"), "input 'prompt' is not valid UTF-8"),
    (request(), "send exactly one of the inputs 'prompt'"),
    (request(prompt="hi", messages=json.dumps(MESSAGES)), "send exactly one of the inputs 'prompt'"),
    (request(messages="{}"), "messages must be a non-empty list"),
    (request(messages='[{"role": "robot", "content": "x"}]'), "messages[0].role is 'robot'"),
    (request(messages="nope"), "input 'messages' is not valid JSON"),
    (request(messages='[{"role": "user", "content": "a\\ud800b"}]'), "lone surrogate (\\ud800)"),
    (request(prompt="hi", sampling_parameters="[" * 100000 + "]" * 100000), "nested too deeply"),
    (request(prompt="hi", sampling_parameters='{"seed": ' + "7" * 5000 + "}"), "input 'sampling_parameters' is not valid JSON"),
    (request(prompt="hi", sampling_parameters='{"stop": 0}'), "stop must be a string or a list of strings"),
    (request(prompt="hi", extra="x"), "unknown input 'extra'"),
    (request(prompt="hi", sampling_parameters='{"prompt_logprobs": 1}'), "unknown parameter 'prompt_logprobs'"),
    (request(prompt="hi", sampling_parameters='{"min_tokens": 300}'), "min_tokens must be at most"),
    (request(prompt="hi", sampling_parameters='{"allowed_token_ids": [151646]}'), "allowed_token_ids must be token ids in"),
    (request(prompt="hi", sampling_parameters='{"bad_words": [""]}'), "bad_words entries must be non-empty"),
    (request(prompt="hi", sampling_parameters='{"skip_special_tokens": "no"}'), "skip_special_tokens must be true or false"),
    ({"prompt": [b"a", b"b"]}, "input 'prompt' must hold exactly one string, got 2 elements"),
])
def test_bad_requests_name_the_problem(embedded, inputs, message):
    with pytest.raises(QmoeError) as e:
        parse_request(inputs, embedded)
    assert isinstance(e.value, ValueError)  # the backend answers these as INVALID_ARG
    assert message in str(e.value) and "\n" not in str(e.value)


def test_parameters_are_sampling_fields():
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(protocol.PARAMETERS) - {"max_tokens"} - set(protocol.STRUCTURED) <= fields and "structured" in fields
    names = [t.name for t in protocol.INPUTS + protocol.OUTPUTS]
    assert len(names) == len(set(names))


def test_the_vllm_backend_interface(embedded):
    """text_input / sampling_parameters / stream / exclude_input_in_output, as Triton's vLLM backend
    names them: not streamed and with the prompt in text_output by default, like that backend."""
    req = parse_request({"text_input": [b"Hello world"], "sampling_parameters": [json.dumps(
        {"max_tokens": 5, "temperature": 0, "ignore_eos": True, "stop_token_ids": [11]}).encode()]}, embedded)
    assert list(req.prompt_ids) == embedded.tokenizer.encode("Hello world")
    assert req.sampling == SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True,
                                          stop_token_ids=(*embedded.tokenizer.eos_token_ids, 11))
    assert (req.stream, req.prefix) == (False, "Hello world")
    req = parse_request({"text_input": [b"Hi"], "stream": [True]}, embedded)
    assert (req.stream, req.prefix) == (True, "")  # streaming never repeats the prompt unless asked
    req = parse_request({"text_input": [b"Hi"], "exclude_input_in_output": [True]}, embedded)
    assert (req.stream, req.prefix) == (False, "")
    # qmoe's own inputs keep their defaults: streamed, the prompt left out; both can be switched
    req = parse_request(request(prompt="Hi"), embedded)
    assert (req.stream, req.prefix) == (True, "")
    req = parse_request({"messages": [json.dumps(MESSAGES).encode()], "stream": [False],
                         "exclude_input_in_output": [False]}, embedded)
    assert (req.stream, req.prefix) == (False, embedded.tokenizer.apply_chat_template(MESSAGES, True))
    # request parameters (the generate endpoint's "parameters"): switches and sampling fields
    req = parse_request({"text_input": [b"Hi"]}, embedded,
                        request_parameters={"stream": True, "max_tokens": 3, "temperature": 0.5, "seed": 1})
    assert req.stream and req.sampling == SamplingParams(max_new_tokens=3, temperature=0.5, seed=1)
    req = parse_request({"text_input": [b"Hi"], "sampling_parameters": [b'{"max_tokens": 4}']}, embedded,
                        request_parameters={"max_tokens": 3})
    assert req.sampling.max_new_tokens == 4  # the input tensor wins


@pytest.mark.parametrize("inputs,params,message", [
    ({"text_input": [b"Hi"], "prompt": [b"Hi"]}, None, "send exactly one of the inputs"),
    ({"text_input": [b"Hi"], "parameters": [b"{}"]}, None, "unknown input 'parameters'"),
    ({"text_input": [b"Hi"], "stream": [b"yes"]}, None, "input 'stream' must be a boolean"),
    ({"text_input": [b"Hi"], "stream": [True, False]}, None, "exactly one boolean"),
    ({"text_input": [b"Hi"]}, {"stream": "no"}, "request parameter 'stream' must be true or false"),
    ({"text_input": [b"Hi"]}, {"temprature": 0.5}, "unknown request parameter 'temprature'"),
    ({"text_input": [b"Hi"], "sampling_parameters": [b'{"stop_token_ids": 5}']}, None, "stop_token_ids must be a list"),
    ({"text_input": [b"Hi"], "sampling_parameters": [b"[1]"]}, None, "sampling_parameters must be a JSON object"),
])
def test_vllm_interface_errors(embedded, inputs, params, message):
    with pytest.raises(QmoeError, match=re.escape(message)):
        parse_request(inputs, embedded, request_parameters=params)
