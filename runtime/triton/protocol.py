"""The request/response contract of the qmoe Triton model, in one place.

`repository.py` writes config.pbtxt from INPUTS/OUTPUTS and `model.py` (the python-backend model)
reads requests through `parse_request`, so the two cannot drift apart.

    request:  prompt | messages    TYPE_STRING [1]  exactly one: raw text, or a JSON list of
              | text_input                          {"role", "content"} chat messages; text_input is
                                                    prompt under the name Triton's vLLM and
                                                    TensorRT-LLM backends use
              sampling_parameters  TYPE_STRING [1]  optional JSON object with PARAMETERS keys (the vLLM
                                                    backend's name; not "parameters", which Triton's
                                                    generate endpoint reserves)
              stream               TYPE_BOOL   [1]  optional: false sends one response with the whole
                                                    reply (default: true, but false with text_input,
                                                    as the vLLM backend)
              exclude_input_in_output TYPE_BOOL [1] optional: false puts the prompt before the reply in
                                                    text_output (default: true, but false for a
                                                    text_input request that does not stream, as the
                                                    vLLM backend)
              Triton request parameters (the JSON "parameters" of the generate endpoint) may carry
              PARAMETERS keys, "stream" and "exclude_input_in_output" too.
    responses (decoupled stream):
              text_delta           TYPE_STRING [1]  every response; the concatenation is the reply
              text_output          TYPE_STRING [1]  every response: text_delta, after the prompt in the
                                                    first response when the input is not excluded (the
                                                    vLLM backend's output)
              finish_reason        TYPE_STRING [1]  final response only: "stop" | "length"
              prompt_tokens        TYPE_INT32  [1]  final response only
              completion_tokens    TYPE_INT32  [1]  final response only (eos included, as counted
                                                    by the engine)
              logprobs             TYPE_STRING [1]  with parameters.logprobs = k: JSON list, one entry
                                                    per token sampled since the previous response,
                                                    OpenAI chat's shape ({token, logprob, bytes,
                                                    top_logprobs: k x {token, logprob, bytes}})

Everything here is pure (no Triton imports), so it is tested without a server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .. import request_json
from ..errors import QmoeError
from ..sampling import SamplingParams, chat_logprob
from ..structured import VLLM_FIELDS, from_request
from ..tokenizer import validate_messages
from ..yarn import check_context, context_limit

if TYPE_CHECKING:
    from ..engine import Engine
    from ..sampling import TokenLogprob
    from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # a Triton DataType name, e.g. "TYPE_STRING"
    optional: bool = False


INPUTS = (
    TensorSpec("prompt", "TYPE_STRING", optional=True),
    TensorSpec("messages", "TYPE_STRING", optional=True),
    TensorSpec("text_input", "TYPE_STRING", optional=True),
    TensorSpec("sampling_parameters", "TYPE_STRING", optional=True),
    TensorSpec("stream", "TYPE_BOOL", optional=True),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", optional=True),
)
OUTPUTS = (
    TensorSpec("text_delta", "TYPE_STRING"),
    TensorSpec("text_output", "TYPE_STRING"),
    TensorSpec("finish_reason", "TYPE_STRING"),
    TensorSpec("prompt_tokens", "TYPE_INT32"),
    TensorSpec("completion_tokens", "TYPE_INT32"),
    TensorSpec("logprobs", "TYPE_STRING"),
)
# Keys of the `sampling_parameters` JSON object (OpenAI's names; the rest keep SamplingParams' names).
PARAMETERS = ("max_tokens", "logprobs", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "logit_bias", "seed", "stop", "stop_token_ids", "ignore_eos", "response_format",
              "structured_outputs",
              *VLLM_FIELDS, "min_tokens", "allowed_token_ids", "bad_words", "include_stop_str_in_output",
              "skip_special_tokens")  # no prompt_logprobs: the logprobs output covers generated tokens only
STRUCTURED = ("response_format", "structured_outputs", *VLLM_FIELDS)  # read by structured.from_request

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BATCH = 8  # requests that share a step (the model's continuous-batching slots)


class RequestError(QmoeError, ValueError):
    """A request the model refuses; the message names the input or parameter."""


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stream: bool = True  # False: one response with the whole reply
    prefix: str = ""  # text_output's start: the prompt, unless the input is excluded


BOOL_INPUTS = tuple(s.name for s in INPUTS if s.data_type == "TYPE_BOOL")
SWITCHES = ("stream", "exclude_input_in_output")  # also taken from Triton request parameters


def parse_request(inputs: Mapping[str, Sequence[Any]], engine: "Engine",
                  default_max_tokens: int = DEFAULT_MAX_TOKENS,
                  request_parameters: Mapping[str, Any] | None = None) -> Request:
    """Validates one request and tokenizes it, before any compute.

    `inputs` maps input names to their flattened elements (bytes or str for strings, bools for
    TYPE_BOOL, as Triton gives them); inputs the client did not send are absent.
    `request_parameters`: the Triton request's own parameters (the generate endpoint's
    "parameters"). Raises a QmoeError subclass with a one-line message for anything the client got
    wrong (bad JSON, unknown fields, out-of-range values, a prompt that does not fit the context).
    """
    unknown = sorted(set(inputs) - {s.name for s in INPUTS})
    if unknown:
        raise RequestError(f"unknown input {unknown[0]!r}; expected: {', '.join(s.name for s in INPUTS)}")
    texts = {name: _one_string(name, values) for name, values in inputs.items() if name not in BOOL_INPUTS}
    extra = dict(request_parameters or {})
    switches = {name: _one_bool(name, inputs[name]) for name in BOOL_INPUTS if name in inputs}
    for name in SWITCHES:
        if name in extra:
            value = extra.pop(name)
            if not isinstance(value, bool):
                raise RequestError(f"request parameter {name!r} must be true or false, got {value!r}")
            switches.setdefault(name, value)
    sources = [name for name in ("prompt", "messages", "text_input") if name in texts]
    if len(sources) != 1:
        raise RequestError("send exactly one of the inputs 'prompt' or 'text_input' (text) and 'messages' (JSON chat "
                           "messages)")
    if "messages" in texts:
        messages = validate_messages(_json("messages", texts["messages"]))
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = texts[sources[0]]
    ids = engine.tokenizer.encode(prompt)
    if not ids:
        raise RequestError("the prompt is empty")
    vllm_style = "text_input" in texts
    stream = switches.get("stream", not vllm_style)
    exclude = switches.get("exclude_input_in_output", not (vllm_style and not stream))

    name = "sampling_parameters"
    params = _json(name, texts.get(name, "{}"))
    if not isinstance(params, dict):
        raise RequestError(f"{name} must be a JSON object, got {type(params).__name__}")
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise RequestError(f"unknown parameter {unknown[0]!r}; expected some of: {', '.join(PARAMETERS)}")
    unknown = sorted(set(extra) - set(PARAMETERS))
    if unknown:
        raise RequestError(f"unknown request parameter {unknown[0]!r}; expected some of: "
                           f"{', '.join((*PARAMETERS, *SWITCHES))}")
    params = {**extra, **params}  # the input tensor's values win
    if "stop_token_ids" in params:  # vLLM's: stop ids on top of the model's eos ids
        extra_ids = params.pop("stop_token_ids")
        if not isinstance(extra_ids, list):
            raise RequestError(f"stop_token_ids must be a list of token ids, got {extra_ids!r}")
        if extra_ids:
            params["stop_token_ids"] = (*engine.tokenizer.eos_token_ids, *extra_ids)
    limit = context_limit(engine.config, engine.rope_mode)
    if "max_tokens" in params:
        max_tokens = params.pop("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    else:  # the default never overflows the context on its own; a prompt that fills it still fails below
        max_tokens = max(1, min(default_max_tokens, limit - len(ids)))
    check_context(engine.config, engine.rope_mode, len(ids), max_tokens)
    if not isinstance(params.get("logit_bias", {}), dict):
        raise RequestError("logit_bias must be a JSON object mapping token ids to biases")
    constraint, _ = from_request({k: params.pop(k) for k in STRUCTURED if k in params})
    sampling = SamplingParams(max_new_tokens=max_tokens, structured=constraint, **params)  # names bad fields
    engine._params(sampling)  # checks logit_bias and allowed_token_ids ids against the vocabulary, bad_words
    return Request(tuple(ids), sampling, stream, "" if exclude else prompt)


def render_logprobs(entries: Sequence["TokenLogprob"], tokenizer: "Tokenizer", skip_special_tokens: bool = True) -> str:
    """TokenLogprobs as a JSON list in OpenAI chat's shape (runtime.sampling.chat_logprob, as `qmoe
    serve` sends them)."""
    return json.dumps([chat_logprob(e, tokenizer, skip_special_tokens) for e in entries], ensure_ascii=False)


def _one_string(name: str, values: Sequence[Any]) -> str:
    if len(values) != 1:
        raise RequestError(f"input {name!r} must hold exactly one string, got {len(values)} elements")
    value = values[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"input {name!r} is not valid UTF-8 (byte {e.start})") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"input {name!r} must be a string, got {type(value).__name__}")


def _one_bool(name: str, values: Sequence[Any]) -> bool:
    if len(values) != 1:
        raise RequestError(f"input {name!r} must hold exactly one boolean, got {len(values)} elements")
    value = values[0]
    if not isinstance(value, (bool, np.bool_)):
        raise RequestError(f"input {name!r} must be a boolean, got {type(value).__name__}")
    return bool(value)


def _json(name: str, text: str) -> Any:
    try:
        return request_json.loads(text)
    except request_json.RequestJSONError as e:
        raise RequestError(f"input {name!r} is not valid JSON: {e}") from None
