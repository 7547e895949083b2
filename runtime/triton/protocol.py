"""The request/response contract of the qmoe Triton model, in one place.

`repository.py` writes config.pbtxt from INPUTS/OUTPUTS and `model.py` (the python-backend model)
reads requests through `parse_request`, so the two cannot drift apart.

    request:  prompt | messages    TYPE_STRING [1]  exactly one: raw text, or a JSON list of
                                                    {"role", "content"} chat messages
              parameters           TYPE_STRING [1]  optional JSON object with PARAMETERS keys
    responses (decoupled stream):
              text_delta           TYPE_STRING [1]  every response; the concatenation is the reply
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
    TensorSpec("parameters", "TYPE_STRING", optional=True),
)
OUTPUTS = (
    TensorSpec("text_delta", "TYPE_STRING"),
    TensorSpec("finish_reason", "TYPE_STRING"),
    TensorSpec("prompt_tokens", "TYPE_INT32"),
    TensorSpec("completion_tokens", "TYPE_INT32"),
    TensorSpec("logprobs", "TYPE_STRING"),
)
# Keys of the `parameters` JSON object (OpenAI's names; the rest keep SamplingParams' names).
PARAMETERS = ("max_tokens", "logprobs", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "logit_bias", "seed", "stop", "response_format", "structured_outputs",
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


def parse_request(inputs: Mapping[str, Sequence[Any]], engine: "Engine",
                  default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Request:
    """Validates one request and tokenizes it, before any compute.

    `inputs` maps input names to their flattened elements (bytes or str, as Triton gives them);
    inputs the client did not send are absent. Raises a QmoeError subclass with a one-line message
    for anything the client got wrong (bad JSON, unknown fields, out-of-range values, a prompt
    that does not fit the context).
    """
    texts = {name: _one_string(name, values) for name, values in inputs.items()}
    unknown = sorted(set(texts) - {s.name for s in INPUTS})
    if unknown:
        raise RequestError(f"unknown input {unknown[0]!r}; expected: {', '.join(s.name for s in INPUTS)}")
    if ("prompt" in texts) == ("messages" in texts):
        raise RequestError("send exactly one of the inputs 'prompt' (text) and 'messages' (JSON chat messages)")

    if "prompt" in texts:
        ids = engine.tokenizer.encode(texts["prompt"])
        if not ids:
            raise RequestError("the prompt is empty")
    else:
        messages = validate_messages(_json("messages", texts["messages"]))
        ids = engine.tokenizer.encode_chat(messages, add_generation_prompt=True)

    params = _json("parameters", texts.get("parameters", "{}"))
    if not isinstance(params, dict):
        raise RequestError(f"parameters must be a JSON object, got {type(params).__name__}")
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise RequestError(f"unknown parameter {unknown[0]!r}; expected some of: {', '.join(PARAMETERS)}")
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
    return Request(tuple(ids), sampling)


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


def _json(name: str, text: str) -> Any:
    try:
        return request_json.loads(text)
    except request_json.RequestJSONError as e:
        raise RequestError(f"input {name!r} is not valid JSON: {e}") from None
