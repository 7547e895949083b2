"""OpenAI-compatible HTTP server for one artifact: /v1/models, /v1/chat/completions, /v1/completions,
/v1/responses (runtime/responses.py).

    request (event loop) -> [parse + validate -> Job] -> FIFO queue -> [worker thread: BatchScheduler
      steps] -> text deltas via loop.call_soon_threadsafe -> the job's asyncio.Queue -> JSON body or SSE chunks

One worker thread owns the engine (not thread-safe) and a continuous-batching scheduler
(runtime/batching.py): up to `max_batch` requests share each step over one preallocated KV cache,
a new request joins (its prefill rides along with the others' decode tokens) as soon as a slot is
free, and a finished one leaves at once. Between steps the worker moves newly queued jobs into the
scheduler, in arrival order; while nothing runs it sleeps on the queue. Each output comes from its
own slot and sampler, so it equals the request run alone up to floating-point batch variance (see
runtime/batching.py). The event loop stays free to accept
requests, stream deltas and notice clients that leave: a client that disconnects sets its job's
cancel flag, and the scheduler frees its slot before the next step (a queued job is dropped
unstarted). `max_batch=1` serves one request at a time, in arrival order.

The KV cache holds `capacity` tokens per request (prompt + max_tokens), default
min(the model's context for its rope mode, 32768): the server reports it as max_model_len and
rejects longer requests with a 400 before queueing.

`n` > 1 runs n generations of one prompt as n scheduler requests (they batch with each other);
with a seed, choice 0 uses it and choice i a seed derived from (seed, i), so each choice is
reproducible and the choices differ. Log-probabilities are the model's own (log-softmax of the raw
logits, before penalties and temperature: vLLM's default), for every generated token (an eos
token too: it counts in completion_tokens); a streamed chunk carries those of the tokens sampled
since the previous chunk.

Everything a request can get wrong is checked before it is queued and answered with OpenAI's error
shape, {"error": {"message", "type", "param", "code"}}, and a 4xx status. Unknown fields are
ignored (as vLLM does); fields whose non-default values would change the output in ways this
server cannot honour (best_of, suffix, legacy functions, some of vLLM's) are rejected rather than ignored.
Structured output (response_format, vLLM's structured_outputs and guided_*) is runtime/structured.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import request_json, structured, tools
from .batching import BatchScheduler, Generation
from .sampling import SAMPLING_FIELDS, generation_defaults
from .engine import Engine, GenerationResult, RequestError
from .errors import QmoeError
from .metrics import Metrics
from .speculative import NgramSpeculation
from .sampling import MAX_TOP_LOGPROBS, SamplingError, SamplingParams, TokenLogprob, chat_logprob, choice_seed
from .structured import StructuredOutputError
from .tokenizer import ChatMessageError, ChatTemplateError, Tokenizer, compile_chat_template
from .tools import ToolCall, ToolError, ToolParser
from .yarn import ContextLengthError

log = logging.getLogger("qmoe.serve")

# Non-default values of these fields would change the output in a way we do not implement.
UNSUPPORTED_FIELDS: Mapping[str, tuple[Any, ...]] = {
    "best_of": (1,), "suffix": ("",), "functions": ([],), "function_call": ("none", "auto"),
    # vLLM's, not implemented here
    "spaces_between_special_tokens": (True,), "logits_processors": ([],),
    "guided_whitespace_pattern": (), "structural_tag": (),
}
# Sampling fields a request may set (generation_config.json: SAMPLING_FIELDS)
REQUEST_SAMPLING_FIELDS = SAMPLING_FIELDS + ("presence_penalty", "frequency_penalty", "logit_bias")
SCORING_AT_ONCE = 2  # echo requests scoring their prompts at once (each holds a prompt-sized cache)
MAX_N = 128  # choices per prompt (each is a scheduler request; more than max_batch of them queue)
MAX_PROMPTS = 64  # prompts per /v1/completions request
BEAM_FIELDS = ("length_penalty", "early_stopping")  # vLLM's, with use_beam_search only
BEAMS_AT_ONCE = 2  # beam searches running at once (each holds n rows of K/V)


class APIError(QmoeError):
    """A request the server answers with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def _server_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, (StructuredOutputError, SamplingError, RequestError, ContextLengthError)):
        return APIError(message)  # the request's own fault, found while it ran (a grammar past llguidance's limits)
    # Requests are validated before they are queued: anything else is the server's fault.
    return APIError(message, status=500, type="server_error")


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    kind: str  # "chat" | "completion"
    prompt_ids: list[int]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1
    echo: str | None = None  # completions with echo: the prompt text each choice starts with
    generate: bool = True  # False: max_tokens 0 with echo (score the prompt, generate nothing)
    parse_tools: bool = False  # chat with tools (tool_choice not "none"): the output's calls become tool_calls
    tool_limit: int | None = None  # parallel_tool_calls false: 1
    named_tool: bool = False  # tool_choice names the function: finish_reason stays "stop", as OpenAI's
    arrived: float = 0.0  # time.monotonic() when the HTTP request came in (metrics: time to first token)
    priority: int = 0  # vLLM's: lower is served first (scheduling policy "priority")
    beam: Any = None  # vLLM's use_beam_search: runtime.beam.BeamSearchParams (n beams, the n best returned)

    def tool_parser(self) -> ToolParser | None:
        return ToolParser(self.tool_limit) if self.parse_tools else None

    def choices(self) -> list[SamplingParams]:
        """Each choice's parameters: the same but for the seed (see choice_seed)."""
        p = self.sampling
        return [p if i == 0 or p.seed is None else replace(p, seed=choice_seed(p.seed, i)) for i in range(self.n)]


def _typed(body: Mapping[str, Any], name: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        raise APIError(f"{name} must be {what}, got {json.dumps(value)[:60]}", param=name)
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = request_json.loads(raw)
    except request_json.RequestJSONError as e:
        raise APIError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def chat_messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI messages -> the tokenizer's messages (text parts joined; developer = system; an
    assistant's tool_calls and a tool's tool_call_id kept)."""
    if not isinstance(value, list) or not value:
        raise APIError("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object with role and content", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text can reach this model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({**m, "role": role, "content": content})  # validate_messages keeps what templates read
    return out


class Service:
    """The model behind the routes: validates requests against it and owns the worker."""

    def __init__(self, engine: Engine, model_name: str, defaults: Mapping[str, Any] | None = None,
                 max_batch: int = 8, capacity: int | None = None, speculation: NgramSpeculation | None = None,
                 max_step_tokens: int | None = None, policy: str = "fcfs") -> None:
        self.engine, self.model_name = engine, model_name
        self.defaults = dict(defaults or {})
        self.worker = EngineWorker(engine, max_batch, capacity, speculation, max_step_tokens, policy)
        scheduler = self.worker.scheduler
        self.metrics = self.worker.metrics = Metrics(
            model_name, lambda: scheduler.running, lambda: scheduler.waiting + self.worker.queued,
            lambda: (scheduler.admitted_tokens, scheduler.reused_tokens, scheduler.copied_tokens),
            lambda: (scheduler.draft_tokens, scheduler.accepted_tokens), lambda: scheduler.cache_usage)
        # what one request may hold: the model's context for the rope mode, capped by the KV cache
        self.context_limit = self.worker.scheduler.capacity
        self.created = int(time.time())

    def parse_all(self, kind: str, body: Mapping[str, Any]) -> list[GenerationRequest]:
        """The request's prompts, each a GenerationRequest: /v1/completions takes a list of prompts
        (strings or token-id lists, at most MAX_PROMPTS); everything else one."""
        prompt = body.get("prompt") if kind == "completion" else None
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(x, (str, list)) for x in prompt):
            if len(prompt) > MAX_PROMPTS:
                raise APIError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", param="prompt")
            return [self.parse(kind, {**body, "prompt": x}) for x in prompt]
        return [self.parse(kind, body)]

    def _check_model(self, body: Mapping[str, Any]) -> None:
        model = _typed(body, "model", (str,), "a string")
        if model is not None and model != self.model_name:
            raise APIError(f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           status=404, param="model", code="model_not_found")

    def parse(self, kind: str, body: Mapping[str, Any]) -> GenerationRequest:
        self._check_model(body)
        for name, neutral in UNSUPPORTED_FIELDS.items():
            if body.get(name) is not None and body[name] not in neutral:
                raise APIError(f"{name}={json.dumps(body[name])[:60]} is not supported by this server", param=name)
        if _typed(body, "use_beam_search", (bool,), "true or false"):
            return self._beam_request(kind, body)
        for name in BEAM_FIELDS:
            if body.get(name) is not None:
                raise APIError(f"{name} needs use_beam_search: true", param=name)
        stream = bool(_typed(body, "stream", (bool,), "true or false"))
        options = _typed(body, "stream_options", (dict,), "an object") or {}
        if options and not stream:
            raise APIError("stream_options is only allowed with stream: true", param="stream_options")
        include_usage = bool(_typed(options, "include_usage", (bool,), "true or false"))
        if stream and body.get("prompt_logprobs") is not None:  # vLLM refuses it too (for values > 0)
            raise APIError("prompt_logprobs are not available with stream: true", param="prompt_logprobs")
        n = _typed(body, "n", (int,), "an integer")
        if n is not None and not 1 <= n <= MAX_N:
            raise APIError(f"n must be in [1, {MAX_N}], got {n}", param="n")
        tool_list, choice, parallel = self._tools(kind, body)
        ids = self._prompt_ids(kind, body, tool_list)
        keep = _typed(body, "truncate_prompt_tokens", (int,), "an integer >= 1")
        if keep is not None:  # vLLM's: keep the prompt's last `keep` tokens
            if keep < 1:
                raise APIError(f"truncate_prompt_tokens must be >= 1, got {keep}", param="truncate_prompt_tokens")
            truncated = len(ids) > keep
            ids = ids[-keep:]
        else:
            truncated = False
        echo = _typed(body, "echo", (bool,), "true or false")
        if echo and kind == "chat":
            raise APIError("echo is supported by /v1/completions only", param="echo")
        max_tokens = _typed(body, "max_tokens", (int,), "an integer")
        generate = not (echo and max_tokens == 0 and body.get("max_completion_tokens") is None)
        if not generate and len(ids) > self.context_limit:
            raise APIError(f"this server's context is {self.context_limit} tokens; the prompt has {len(ids)}",
                           param="prompt", code="context_length_exceeded")
        forced = None
        if tool_list and choice not in ("none", "auto"):
            try:  # each function's schema on its own first, so an error names the function
                tools.check_schemas(tool_list, choice, self.engine.tokenizer, self.engine.config.vocab_size)
            except ToolError as e:
                raise APIError(str(e), param="tools") from None
            forced = tools.forced_calls(tool_list, choice, parallel)
        sampling = self._sampling(body, len(ids), self._logprobs(kind, body), scoring_only=not generate, forced=forced)
        text = None
        if echo:  # the prompt as sent (a string, or a batch of one string), else its ids decoded
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            text = prompt if isinstance(prompt, str) and not truncated else self.engine.tokenizer.decode(ids, False)
        priority = _typed(body, "priority", (int,), "an integer") or 0
        if priority and self.worker.scheduler.policy != "priority":
            raise APIError("priority needs the server's scheduling policy 'priority' (qmoe serve --scheduling-policy "
                           "priority)", param="priority")
        return GenerationRequest(kind, ids, sampling, stream, include_usage, n or 1, text, generate, priority=priority,
                                 parse_tools=bool(tool_list) and choice != "none", tool_limit=None if parallel else 1,
                                 named_tool=choice not in ("none", "auto", "required"))

    def _beam_request(self, kind: str, body: Mapping[str, Any]) -> GenerationRequest:
        """vLLM's use_beam_search: n beams, the n best returned as the choices (runtime/beam.py,
        transformers' semantics). Deterministic and unconstrained: sampling, structured output,
        tools, logprobs, echo and streaming are refused rather than ignored."""
        from .beam import MAX_BEAMS, BeamSearchError, BeamSearchParams

        if not getattr(self.engine.backend, "can_copy_rows", False):
            raise APIError("beam search runs on ONNX Runtime's CPU provider; this server's backend cannot reorder "
                           "its K/V rows", param="use_beam_search")
        for name in ("stream", "echo", "logprobs", "top_logprobs", "prompt_logprobs", "tools", "tool_choice",
                     "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar", "min_tokens", "allowed_token_ids", "bad_words", "stop", "seed",
                     "logit_bias", "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "top_p",
                     "min_p", "truncate_prompt_tokens", "priority"):
            value = body.get(name)
            if value not in (None, False, "", [], {}):
                raise APIError(f"{name} cannot be combined with use_beam_search (beam search is deterministic and "
                               "unconstrained)", param=name)
        temperature = body.get("temperature")
        if temperature is not None and temperature not in (0, 0.0, 1, 1.0):
            raise APIError("temperature cannot be combined with use_beam_search (beam search ranks the model's own "
                           "log-probabilities)", param="temperature")
        n = _typed(body, "n", (int,), "an integer")
        n = 1 if n is None else n
        if not 1 <= n <= MAX_BEAMS:
            raise APIError(f"n (the beam width with use_beam_search) must be in [1, {MAX_BEAMS}], got {n}", param="n")
        ids = self._prompt_ids(kind, body)
        # required: not the rest of the context, which n beams would run for a very long time
        name, max_tokens = self._max_tokens(body, len(ids), required="use_beam_search")
        extra = _typed(body, "stop_token_ids", (list,), "a list of token ids") or []
        try:
            params = BeamSearchParams(
                num_beams=n, max_new_tokens=max_tokens, num_return_sequences=n,
                length_penalty=body["length_penalty"] if body.get("length_penalty") is not None else 1.0,
                early_stopping=body["early_stopping"] if body.get("early_stopping") is not None else False,
                stop_token_ids=(*self.engine.tokenizer.eos_token_ids, *extra) if extra else (),
                ignore_eos=bool(_typed(body, "ignore_eos", (bool,), "true or false")))
        except BeamSearchError as e:
            raise APIError(str(e), param=str(e).split()[0]) from None
        if any(t >= self.engine.config.vocab_size for t in params.stop_token_ids):
            raise APIError(f"stop_token_ids must be token ids in [0, {self.engine.config.vocab_size})",
                           param="stop_token_ids")
        from .yarn import check_context

        try:
            check_context(self.engine.config, self.engine.rope_mode, len(ids), max_tokens)
        except ContextLengthError as e:
            raise APIError(str(e), param=name, code="context_length_exceeded") from None
        return GenerationRequest(kind, ids, SamplingParams(max_new_tokens=max_tokens), False, False, n, beam=params)

    @staticmethod
    def _tools(kind: str, body: Mapping[str, Any]) -> tuple[list[dict[str, Any]] | None, str, bool]:
        """(tools for the template or None, tool_choice, parallel_tool_calls) of a request."""
        if kind != "chat":
            for name in ("tools", "tool_choice", "parallel_tool_calls"):
                if body.get(name) is not None:
                    raise APIError(f"{name} is supported by /v1/chat/completions only", param=name)
            return None, "none", True
        parallel = _typed(body, "parallel_tool_calls", (bool,), "true or false")
        try:
            tool_list = tools.validate_tools(body["tools"]) if body.get("tools") is not None else []
            choice = tools.validate_choice(body.get("tool_choice"), tool_list)
        except ToolError as e:
            raise APIError(str(e), param="tools" if str(e).startswith("tools") else "tool_choice") from None
        return tool_list or None, choice, parallel is not False

    @staticmethod
    def _logprobs(kind: str, body: Mapping[str, Any]) -> int | None:
        """SamplingParams.logprobs from OpenAI's fields: chat has logprobs (bool) + top_logprobs,
        completions an integer logprobs (the alternatives per token)."""
        if kind == "completion":
            k = _typed(body, "logprobs", (int,), f"an integer in [0, {MAX_TOP_LOGPROBS}]")
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise APIError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}", param="logprobs")
            return k
        wanted = _typed(body, "logprobs", (bool,), "true or false")
        top = _typed(body, "top_logprobs", (int,), f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise APIError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
        if top and not wanted:
            raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        return (top or 0) if wanted else None

    def tokenize(self, kind: str, body: Mapping[str, Any]) -> list[int]:
        """/tokenize: the ids a request with this prompt or these messages would run."""
        self._check_model(body)
        return self._prompt_ids(kind, body, self._tools(kind, body)[0], allow_empty=True)

    def _prompt_ids(self, kind: str, body: Mapping[str, Any], tool_list: list[dict[str, Any]] | None = None,
                    allow_empty: bool = False) -> list[int]:
        tokenizer = self.engine.tokenizer
        if kind == "chat":
            add = _typed(body, "add_generation_prompt", (bool,), "true or false")
            try:
                return tokenizer.encode_chat(chat_messages(body.get("messages")), add_generation_prompt=add is not False,
                                             tools=tool_list)
            except ChatTemplateError as e:
                raise APIError(str(e), param="tools" if tool_list and "render tools" in str(e) else "messages") from None
            except ChatMessageError as e:
                raise APIError(str(e), param="messages") from None
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.engine.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        else:
            raise APIError("prompt must be a string, a list of token ids, or a list of those", param="prompt")
        if not ids and not allow_empty:
            raise APIError("the prompt is empty", param="prompt")
        return ids

    def _max_tokens(self, body: Mapping[str, Any], prompt_len: int, scoring_only: bool = False,
                    required: str | None = None) -> tuple[str, int]:
        """(the field's name, the tokens to generate) from max_completion_tokens or max_tokens,
        checked against the context. Absent: OpenAI's default, whatever the context has left, or
        with `required` (the feature that needs it) a 400. scoring_only: 1, never over the context."""
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = 1 if scoring_only else _typed(body, name, (int,), "an integer")
        if max_tokens is None:
            if required is not None:
                raise APIError(f"{required} needs max_tokens (or max_completion_tokens)", param="max_tokens")
            max_tokens = max(self.context_limit - prompt_len, 1)
        if max_tokens < 1:
            raise APIError(f"{name} must be at least 1, got {max_tokens}", param=name)
        if prompt_len + max_tokens > self.context_limit and not scoring_only:
            raise APIError(f"this server's context is {self.context_limit} tokens; the prompt has {prompt_len} and "
                           f"{name} is {max_tokens}; shorten the prompt or lower {name}",
                           param=name, code="context_length_exceeded")
        return name, max_tokens

    def _sampling(self, body: Mapping[str, Any], prompt_len: int, logprobs: int | None,
                  scoring_only: bool = False, forced: structured.StructuredOutput | None = None) -> SamplingParams:
        """scoring_only: echo with max_tokens 0 (the prompt, checked by the caller, is all there is;
        the parameters still get checked, with one token to be valid). forced: the grammar of a
        tool_choice that forces calls."""
        name, max_tokens = self._max_tokens(body, prompt_len, scoring_only=scoring_only)
        _typed(body, "logit_bias", (dict,), "an object mapping token ids to biases")
        chosen = {k: body[k] for k in REQUEST_SAMPLING_FIELDS if body.get(k) is not None}
        try:
            constraint, field = structured.from_request(dict(body))
        except StructuredOutputError as e:  # the message starts with the field's name
            raise APIError(str(e), param=str(e).split()[0].rstrip(":")) from None
        if forced is not None:
            if constraint is not None:
                raise APIError(f"tool_choice {json.dumps(body.get('tool_choice'))} forces tool calls; it cannot be "
                               f"combined with {field}", param="tool_choice")
            constraint, field = forced, "tool_choice"
        # vLLM's: stop ids on top of the model's eos ids; ignore_eos generates max_tokens whatever comes
        extra_ids = _typed(body, "stop_token_ids", (list,), "a list of token ids") or []
        ignore_eos = bool(_typed(body, "ignore_eos", (bool,), "true or false"))
        vllm = {  # vLLM's other sampling fields, checked by SamplingParams (its messages name them)
            "min_tokens": 0 if scoring_only else _typed(body, "min_tokens", (int,), "an integer >= 0"),
            "allowed_token_ids": _typed(body, "allowed_token_ids", (list,), "a list of token ids"),
            "bad_words": _typed(body, "bad_words", (list,), "a list of strings"),
            "include_stop_str_in_output": _typed(body, "include_stop_str_in_output", (bool,), "true or false"),
            "skip_special_tokens": _typed(body, "skip_special_tokens", (bool,), "true or false"),
            "prompt_logprobs": _typed(body, "prompt_logprobs", (int,), f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
        }
        try:
            p = SamplingParams(**{**self.defaults, **chosen}, seed=body.get("seed"), max_new_tokens=max_tokens,
                               stop=() if body.get("stop") in (None, "") else body["stop"], logprobs=logprobs,
                               structured=constraint, ignore_eos=ignore_eos,
                               stop_token_ids=(*self.engine.tokenizer.eos_token_ids, *extra_ids) if extra_ids else (),
                               **{k: v for k, v in vllm.items() if v is not None})
            return self.engine._params(p)  # logit_bias ids against the vocabulary, the constraint compiled
        except StructuredOutputError as e:
            raise APIError(f"{field}: {e}", param=field) from None
        except (SamplingError, RequestError) as e:  # the message starts with the field's name
            param = str(e).split()[0]
            raise APIError(str(e), param=name if param == "max_new_tokens" else param) from None


# --- the worker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled" (nobody reads that response any more)
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (usage's cached_tokens)


@dataclass(eq=False)  # identity: the worker keeps running jobs in a set
class Job:
    """One choice of a request. Its events go to `events` as (index, event): the n choices of
    one request share the queue. A choice's events: text deltas and (if asked for) TokenLogprobs,
    then one Finished or one exception."""

    prompt_ids: list[int]
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    index: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)  # the HTTP request's arrival
    priority: int = 0

    def emit(self, item: "str | TokenLogprob | Finished | BaseException") -> None:
        """From any thread: hand one event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, item))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def fail(self, error: BaseException) -> None:
        self.cancelled.set()
        self.emit(error)


async def results(jobs: list[Job]) -> AsyncIterator[tuple[int, "str | TokenLogprob | Finished"]]:
    """The choices' events as (index, event) in arrival order, until every choice has Finished;
    raises the first error. Leaving early (or an error) cancels every choice."""
    try:
        running = len(jobs)
        while running:
            index, item = await jobs[0].events.get()
            if isinstance(item, BaseException):
                raise item
            yield index, item
            running -= isinstance(item, Finished)
    finally:
        for job in jobs:
            job.cancelled.set()


@dataclass(eq=False)
class _Call:
    """A function for the worker thread to run between steps, its result for an event loop."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def run(self) -> None:
        try:
            result, error = self.fn(), None
        except Exception as e:  # noqa: BLE001  (handed to the awaiting request)
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody awaits it any more
            self.loop.call_soon_threadsafe(self._settle, result, error)

    def _settle(self, result: Any, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._settle, None, error)


def _shutting_down() -> APIError:
    return APIError("the server is shutting down", status=503, type="server_error")


class EngineWorker:
    """The one thread that owns the engine: it feeds submitted jobs to a continuous-batching
    scheduler in arrival order and runs its steps while there is work."""

    def __init__(self, engine: Engine, max_batch: int = 8, capacity: int | None = None,
                 speculation: NgramSpeculation | None = None, max_step_tokens: int | None = None,
                 policy: str = "fcfs") -> None:
        self.engine = engine
        self.scheduler = BatchScheduler(engine, max_slots=max_batch, capacity=capacity, speculation=speculation,
                                        max_step_tokens=max_step_tokens, policy=policy)
        self._jobs: queue.Queue[Job | _Call | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="qmoe-engine-worker", daemon=True)
        self._lock = threading.Lock()  # orders taking a job against shutting down
        self._closed = False
        self._running: set[Job] = set()  # handed to the scheduler, not finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics: Metrics | None = None  # set by Service
        # echo + logprobs scores a prompt through a cache of its own: at most this many at once
        self.scoring = asyncio.Semaphore(SCORING_AT_ONCE)
        self.beams = asyncio.Semaphore(BEAMS_AT_ONCE)

    @property
    def queued(self) -> int:
        """Jobs submitted that the worker has not handed to the scheduler yet."""
        return self._jobs.qsize()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def check_open(self) -> None:
        if self._closed:
            raise _shutting_down()

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, events: asyncio.Queue | None = None,
               index: int = 0, arrived: float | None = None, priority: int = 0) -> Job:
        self.check_open()
        job = Job(prompt_ids, sampling, asyncio.get_running_loop(), asyncio.Queue() if events is None else events, index,
                  priority=priority)
        if arrived is not None:
            job.arrived = arrived
        self._jobs.put(job)
        return job

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Runs fn on the worker thread between two steps (it owns the engine); returns its result."""
        self.check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._jobs.put(_Call(fn, loop, future))
        return await future

    def submit_all(self, reqs: list[GenerationRequest]) -> list[Job]:
        """Every prompt's n choices, queued in order, sharing one event queue; choice i of prompt
        k has index k * n + i, as OpenAI numbers a batch's choices."""
        events: asyncio.Queue = asyncio.Queue()
        return [self.submit(req.prompt_ids, p, events, k * req.n + i, req.arrived or None, req.priority)
                for k, req in enumerate(reqs) if req.generate for i, p in enumerate(req.choices())]

    def shutdown(self) -> None:
        """Refuse new jobs and end the running and queued ones with a 503, so their responses
        finish now instead of holding the server's shutdown."""
        with self._lock:
            self._closed = True
            ending: list[Job | _Call | None] = list(self._running)
            with contextlib.suppress(queue.Empty):
                while True:
                    ending.append(self._jobs.get_nowait())
        for job in ending:
            if job is not None:
                job.fail(_shutting_down())

    def shutdown_soon(self) -> None:
        """shutdown() from a signal handler: run on the event loop, never inside the handler."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.shutdown)

    def close(self, timeout: float = 10.0) -> None:
        self.shutdown()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            # Between steps: take every job that arrived; wait for one only when there is no work.
            try:
                job = self._jobs.get(block=not self.scheduler.has_work())
            except queue.Empty:
                job = None
            else:
                if job is None:
                    return
                if isinstance(job, _Call):
                    job.run()
                else:
                    self._start(job)
                continue
            try:
                self.scheduler.step()
            except Exception:  # noqa: BLE001  (reported to its requests by on_error; the worker keeps serving)
                log.exception("generation step failed")

    def _start(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                job.fail(_shutting_down())
                return
            if job.cancelled.is_set():  # its client left while it waited: end its response too
                if self.metrics is not None:
                    self.metrics.requests.labels(self.metrics.model_name, "cancelled").inc()
                job.emit(Finished("cancelled", 0))
                return
            self._running.add(job)

        timer = self.metrics.request(len(job.prompt_ids), job.arrived) if self.metrics is not None else None
        gen: list[Generation] = []

        def finished(result: GenerationResult) -> None:
            self._done(job)
            if timer is not None:
                timer.finished(result.finish_reason, gen[0].admitted_at if gen else None)
            job.emit(Finished(result.finish_reason, len(result.tokens), gen[0].cached_tokens if gen else 0))

        def failed(error: BaseException) -> None:  # counted by its response's status (Metrics.error)
            self._done(job)
            job.emit(error)

        try:
            on_token = (lambda token: timer.token(token, self.scheduler.steps)) if timer is not None \
                else (lambda token: None)
            gen.append(self.scheduler.submit(job.prompt_ids, job.sampling, on_delta=job.emit, on_logprob=job.emit,
                                             on_token=on_token, on_finish=finished, on_error=failed,
                                             cancelled=job.cancelled, priority=job.priority))
        except Exception as e:  # noqa: BLE001  (requests are checked before queueing; report, keep serving)
            log.exception("cannot schedule a request")
            failed(e)

    def _done(self, job: Job) -> None:
        with self._lock:
            self._running.discard(job)


# --- responses ------------------------------------------------------------------------------


class _Logprobs:
    """One choice's TokenLogprobs in OpenAI's shapes: chat {"content": [{token, logprob, bytes,
    top_logprobs}]}; completions {tokens, token_logprobs, top_logprobs: [{token: logprob}] (the
    alternatives and the chosen token, as vLLM gives them), text_offset}. Token strings are the ids
    decoded alone (a piece of a UTF-8 character decodes to U+FFFD; `bytes` has its real bytes)."""

    def __init__(self, req: GenerationRequest, tokenizer: Tokenizer) -> None:
        self.kind, self.tokenizer = req.kind, tokenizer
        self.offset = 0  # completions: characters of the choice's text before the next token
        self.prompt_len = len(req.prompt_ids) if req.echo is not None else 0  # leading entries: the echoed prompt
        self.rendered = 0
        self.keep_special = not req.sampling.skip_special_tokens  # generated special tokens render as in the text

    def _text(self, token: int, keep_special: bool) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=not keep_special)

    def _next(self) -> bool:
        """Whether the next entry keeps special tokens: as in the generated text ("" unless
        skip_special_tokens is false; an eos token too), and always in an echoed prompt, whose text has them."""
        self.rendered += 1
        return self.rendered <= self.prompt_len or self.keep_special

    def render(self, entries: list[TokenLogprob | int]) -> dict[str, Any]:
        """entries: TokenLogprobs; a bare id is an echoed prompt's first token (no log-probability)."""
        if self.kind == "chat":
            content = []
            for e in entries:
                keep = self._next()
                if isinstance(e, TokenLogprob):
                    content.append(chat_logprob(e, self.tokenizer, skip_special_tokens=not keep))
            return {"content": content}
        tokens, tops, offsets = [], [], []
        for e in entries:
            keep = self._next()
            tokens.append(self._text(e if isinstance(e, int) else e.token, keep))
            tops.append(None if isinstance(e, int) else
                        {**{self._text(t, keep): lp for t, lp in e.top}, tokens[-1]: e.logprob})
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [None if isinstance(e, int) else e.logprob for e in entries],
                "top_logprobs": tops, "text_offset": offsets}


def _choice(req: GenerationRequest, index: int, text: str | None, finish_reason: str | None,
            logprobs: dict[str, Any] | None = None, first: bool = False,
            calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One choice of a body or chunk. calls: OpenAI tool_calls (a message's, or a chunk's with their
    index); with calls, a stop is finish_reason "tool_calls" (but for a named tool_choice, as OpenAI)."""
    if calls and finish_reason == "stop" and not req.named_tool:
        finish_reason = "tool_calls"
    if req.kind == "completion":
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    if not req.stream:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    if first:
        delta: dict[str, Any] = {"role": "assistant", "content": ""}
    elif calls:
        delta = {"tool_calls": calls}
    else:
        delta = {"content": text or ""} if text or logprobs is not None else {}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _usage(reqs: list[GenerationRequest], completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; cached_tokens: prompt tokens whose K/V came from the prefix cache (each
    prompt's first choice's, as the prompt is counted once)."""
    n = sum(len(req.prompt_ids) for req in reqs)  # each prompt once, whatever its n
    return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _first_choices(reqs: list[GenerationRequest]) -> set[int]:
    """Each prompt's first choice index (k * n)."""
    return {k * req.n for k, req in enumerate(reqs)}


class _Envelope:
    """id, object, created and model shared by every body or chunk of one response."""

    def __init__(self, req: GenerationRequest, model: str) -> None:
        prefix, obj = ("chatcmpl", "chat.completion") if req.kind == "chat" else ("cmpl", "text_completion")
        if req.kind == "chat" and req.stream:
            obj += ".chunk"
        self.req, self.head = req, {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj,
                                    "created": int(time.time()), "model": model}

    def body(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        out = {**self.head, "choices": choices}
        if not self.req.stream or self.req.include_usage:
            out["usage"] = usage
        return out

    def sse(self, choice: dict[str, Any]) -> str:
        return _sse(self.body([choice]))


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _until_disconnected(request: Request, jobs: list[Job]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for job in jobs:
        job.cancelled.set()


async def _score(worker: EngineWorker, req: GenerationRequest) -> list[TokenLogprob | None]:
    """The prompt's log-probability entries (None for its first token) with as many alternatives
    as echo's logprobs and prompt_logprobs ask for (ranks with prompt_logprobs): one pass serves
    both. [] when neither is asked for."""
    p = req.sampling
    wanted = [k for k in (p.logprobs if req.echo is not None else None, p.prompt_logprobs) if k is not None]
    if not wanted:
        return []
    engine, k = worker.engine, max(wanted)
    n = p.max_new_tokens if req.generate else 0
    entries: list[TokenLogprob | None] = []
    async with worker.scoring:
        chunks = engine.iter_prompt_logprobs(req.prompt_ids, k, n, rank=p.prompt_logprobs is not None)
        while (part := await worker.call(lambda: next(chunks, None))) is not None:
            entries.extend(part)  # one chunk per worker call: other requests' steps run in between
    return entries


def _top(entry: TokenLogprob, k: int) -> TokenLogprob:
    return entry if len(entry.top) <= k else replace(entry, top=entry.top[:k])


def _echoed(req: GenerationRequest, scored: list[TokenLogprob | None]) -> list[TokenLogprob | int]:
    """An echoed prompt's log-probability entries (its first token has none); [] without logprobs."""
    k = req.sampling.logprobs
    if req.echo is None or k is None:
        return []
    return [req.prompt_ids[0], *(_top(e, k) for e in scored[1:] if e is not None)]


async def _echo(worker: EngineWorker, req: GenerationRequest) -> list[TokenLogprob | int]:
    return _echoed(req, await _score(worker, req))


def _prompt_logprobs(req: GenerationRequest, scored: list[TokenLogprob | None],
                     tokenizer: Tokenizer) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt_logprobs: None for the first token, then {token id: {logprob, rank,
    decoded_token}} with the prompt's token (its rank: 1 + the tokens strictly likelier) and the k
    likeliest (ranks 1..k, which win for the prompt's token if it is among them, as in vLLM);
    -inf clamped to -9999.0 as vLLM does. None when not asked for."""
    k = req.sampling.prompt_logprobs
    if k is None:
        return None

    def entry(token: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": max(logprob, -9999.0), "rank": rank,
                "decoded_token": tokenizer.decode([token], skip_special_tokens=False)}

    out: list[dict[str, Any] | None] = [None]
    for e in scored[1:]:
        assert e is not None
        d = {str(e.token): entry(e.token, e.logprob, e.rank)}
        d.update({str(t): entry(t, v, i) for i, (t, v) in enumerate(e.top[:k], start=1)})
        out.append(d)
    return out


def _per_choice(reqs: list[GenerationRequest]) -> list[GenerationRequest]:
    """The prompt request each choice index belongs to."""
    return [req for req in reqs for _ in range(req.n)]


async def _whole(worker: EngineWorker, reqs: list[GenerationRequest], env: _Envelope, request: Request,
                 tokenizer: Tokenizer) -> Response:
    owner = _per_choice(reqs)
    scored = [await _score(worker, req) for req in reqs]
    prompts = [_echoed(req, x) for req, x in zip(reqs, scored)]
    prompt_logprobs = [_prompt_logprobs(req, x, tokenizer) for req, x in zip(reqs, scored)]
    jobs = worker.submit_all(reqs)
    watcher = asyncio.ensure_future(_until_disconnected(request, jobs))
    texts: list[list[str]] = [[req.echo or ""] for req in owner]
    logprobs: list[list[TokenLogprob | int]] = [list(prompts[k]) for k, req in enumerate(reqs) for _ in range(req.n)]
    done: dict[int, Finished] = {i: Finished("length", 0) for i, req in enumerate(owner) if not req.generate}
    try:
        async for i, item in results(jobs):
            if isinstance(item, Finished):
                done[i] = item
            elif isinstance(item, TokenLogprob):
                logprobs[i].append(item)
            else:
                texts[i].append(item)
    finally:
        watcher.cancel()
    wanted = reqs[0].sampling.logprobs is not None
    choices = []
    for i, req in enumerate(owner):
        text: str | None = "".join(texts[i])
        calls: list[ToolCall] = []
        if req.parse_tools:
            text, calls = tools.parse(text or "", req.tool_limit)
        choices.append(_choice(req, i, text, done[i].finish_reason,
                               _Logprobs(req, tokenizer).render(logprobs[i]) if wanted else None,
                               calls=[c.openai() for c in calls]))
    firsts = _first_choices(reqs)
    body = env.body(choices, _usage(reqs, sum(d.completion_tokens for d in done.values()),
                                    sum(d.cached_tokens for i, d in done.items() if i in firsts)))
    if reqs[0].sampling.prompt_logprobs is not None:  # vLLM's places: each completion choice, chat's top level
        if env.req.kind == "chat":
            body["prompt_logprobs"] = prompt_logprobs[0]
        else:
            for choice, k in zip(choices, [k for k, req in enumerate(reqs) for _ in range(req.n)]):
                choice["prompt_logprobs"] = prompt_logprobs[k]
    return JSONResponse(body)


async def _beam_whole(worker: EngineWorker, reqs: list[GenerationRequest], env: _Envelope,
                      request: Request) -> Response:
    """use_beam_search: each prompt's beam search, one model step per worker call (other requests
    step in between); its n best beams are the prompt's choices, best first."""
    from .beam import beam_steps

    done = object()
    choices, completion = [], 0
    for k, req in enumerate(reqs):
        async with worker.beams:
            steps = beam_steps(worker.engine, req.prompt_ids, req.beam)
            while await worker.call(lambda: next(steps, done)) is not done:
                if await request.is_disconnected():
                    return Response(status_code=499)
        for i, beam in enumerate(steps.result):
            choices.append(_choice(req, k * req.n + i, beam.text, beam.finish_reason))
            completion += len(beam.tokens)
    return JSONResponse(env.body(choices, _usage(reqs, completion)))


async def _chunks(worker: EngineWorker, reqs: list[GenerationRequest], env: _Envelope,
                  tokenizer: Tokenizer) -> AsyncIterator[str]:
    # The jobs are queued only once the response streams, and whatever ends the stream early (a
    # client that left cancels the response task; the generator is then closed) cancels them.
    jobs: list[Job] = []
    owner = _per_choice(reqs)
    wanted = reqs[0].sampling.logprobs is not None
    render = [_Logprobs(req, tokenizer) for req in owner]
    pending: list[list[TokenLogprob | int]] = [[] for _ in owner]  # sampled since the last chunk

    def flush(i: int) -> dict[str, Any] | None:
        if not wanted or not pending[i]:
            return None
        out, pending[i] = render[i].render(pending[i]), []
        return out

    try:
        first = 0
        for req in reqs:  # each echoed prompt first, with its log-probabilities
            if req.echo is not None:
                prompt = await _echo(worker, req)
                for i in range(first, first + req.n):
                    pending[i] = list(prompt)
                    yield env.sse(_choice(req, i, req.echo, None if req.generate else "length", flush(i)))
            first += req.n
        jobs = worker.submit_all(reqs)
        if env.req.kind == "chat":
            for i, req in enumerate(owner):  # the role comes first, as OpenAI sends it
                yield env.sse(_choice(req, i, None, None, first=True))
        completion_tokens = cached_tokens = 0
        firsts = _first_choices(reqs)
        parsers = [req.tool_parser() for req in owner]
        called = [0] * len(owner)  # tool calls sent, per choice

        def pieces(i: int, items: list[str | ToolCall]) -> Iterator[str]:
            """Chunks of parsed output: text as content, each call whole in its own delta."""
            for piece in items:
                if isinstance(piece, str):
                    yield env.sse(_choice(owner[i], i, piece, None, flush(i)))
                else:
                    yield env.sse(_choice(owner[i], i, None, None, flush(i), calls=[piece.openai(called[i])]))
                    called[i] += 1

        async for i, item in results(jobs):
            parser = parsers[i]
            if isinstance(item, TokenLogprob):
                pending[i].append(item)
            elif isinstance(item, Finished):
                completion_tokens += item.completion_tokens
                cached_tokens += item.cached_tokens if i in firsts else 0
                if parser is not None:
                    for chunk in pieces(i, parser.finish()):
                        yield chunk
                reason = "tool_calls" if called[i] and item.finish_reason == "stop" and not owner[i].named_tool \
                    else item.finish_reason
                yield env.sse(_choice(owner[i], i, None if env.req.kind == "chat" else "", reason, flush(i)))
            elif parser is not None:
                for chunk in pieces(i, parser.push(item)):
                    yield chunk
            else:
                yield env.sse(_choice(owner[i], i, item, None, flush(i)))
        if env.req.include_usage:
            yield _sse({**env.head, "choices": [], "usage": _usage(reqs, completion_tokens, cached_tokens)})
    except Exception as e:  # noqa: BLE001  (headers are sent: report in-band, as OpenAI does)
        err = _server_error(e)
        if worker.metrics is not None:
            worker.metrics.error(err.status)
        yield _sse(err.body())
    finally:
        for job in jobs:
            job.cancelled.set()
    yield "data: [DONE]\n\n"


# --- the app --------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str, defaults: Mapping[str, Any] | None = None, max_batch: int = 8,
               capacity: int | None = None, speculation: NgramSpeculation | None = None,
               max_step_tokens: int | None = None, api_key: str | None = None, policy: str = "fcfs") -> Starlette:
    """The ASGI app; its lifespan starts and stops the engine's worker thread. max_batch: requests
    that share decode steps (1: one at a time); capacity: tokens per request (prompt + max_tokens;
    default min(model context, runtime.batching.DEFAULT_CAPACITY)); speculation: n-gram drafts
    (runtime/speculative.py); max_step_tokens: the most tokens one step runs (vLLM's
    max_num_batched_tokens); api_key: requests must carry it as a bearer token (RequireAPIKey)."""
    if api_key is not None and not api_key:
        raise QmoeError("the API key is empty")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable() and api_key == api_key.strip()):
        # clients send header values as ASCII (httpx) or latin-1 (urllib), and strip surrounding spaces
        raise QmoeError("the API key must be printable ASCII without surrounding spaces")
    service = Service(engine, model_name, defaults, max_batch, capacity, speculation, max_step_tokens, policy)

    async def generate(request: Request, kind: str) -> Response:
        arrived = time.monotonic()
        body = parse_body(await request.body())
        reqs = await run_in_threadpool(service.parse_all, kind, body)  # tokenizing can take a while
        reqs = [replace(req, arrived=arrived) for req in reqs]
        env = _Envelope(reqs[0], service.model_name)
        service.worker.check_open()  # before a stream's headers go out
        if reqs[0].beam is not None:
            return await _beam_whole(service.worker, reqs, env, request)
        if reqs[0].stream:
            return StreamingResponse(_chunks(service.worker, reqs, env, engine.tokenizer),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        return await _whole(service.worker, reqs, env, request, engine.tokenizer)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    def model_card() -> dict[str, Any]:
        return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "qmoe",
                "max_model_len": service.context_limit}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        if request.path_params["model"] != service.model_name:
            raise APIError(f"the model {request.path_params['model']!r} does not exist", 404, "model",
                           "model_not_found")
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: {"prompt": text} or {"messages": [...], "add_generation_prompt": true}."""
        body = parse_body(await request.body())
        kind = "chat" if "messages" in body else "completion"
        ids = await run_in_threadpool(service.tokenize, kind, body)
        return JSONResponse({"count": len(ids), "max_model_len": service.context_limit, "tokens": ids})

    async def detokenize(request: Request) -> Response:
        body = parse_body(await request.body())
        ids = body.get("tokens")
        vocab = engine.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise APIError(f"tokens must be a list of token ids in [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(ids, skip_special_tokens=False)})

    async def api_error(request: Request, e: Exception) -> Response:
        err = _server_error(e)
        service.metrics.error(err.status)
        return JSONResponse(err.body(), status_code=err.status)

    async def http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        err = APIError(f"{request.method} {request.url.path}: {e.detail}", e.status_code,
                       code="not_found" if e.status_code == 404 else None)
        service.metrics.error(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=e.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.worker.start()
        try:
            yield
        finally:
            service.worker.close()

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    from . import responses  # imports this module: loaded here, not at the top

    routes += responses.routes(service, engine.tokenizer)
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: api_error})
    app.state.service = service
    if api_key is not None:
        app.add_middleware(RequireAPIKey, key=api_key, on_refused=lambda: service.metrics.error(401))
    return app


OPEN_PATHS = ("/health", "/metrics")  # load balancers and Prometheus reach these without the key


class RequireAPIKey:
    """ASGI middleware: every HTTP request but OPEN_PATHS needs `Authorization: Bearer <key>`
    (vLLM's --api-key; OpenAI's 401 body otherwise). Pure ASGI, so streams pass through untouched."""

    def __init__(self, app: Any, key: str, on_refused: Callable[[], None] = lambda: None) -> None:
        self.app, self.expected, self.on_refused = app, key.encode(), on_refused

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        # the scheme is case-insensitive (RFC 7235), the key exact and compared in constant time
        if hmac.compare_digest(token, self.expected) and scheme.lower() == b"bearer":
            return await self.app(scope, receive, send)
        self.on_refused()
        err = APIError("a valid API key is required: send the header 'Authorization: Bearer <key>'", status=401,
                       code="invalid_api_key")
        await JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def read_chat_template(value: str) -> str:
    """--chat-template: a file's text, or the value itself when it is a Jinja template (as vLLM
    takes it); checked to compile."""
    path = Path(value)
    if "{{" in value or "{%" in value:
        text = value
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise QmoeError(f"--chat-template {value}: cannot read it ({type(e).__name__}: {reason})") from None
    try:
        compile_chat_template(text)
    except ChatTemplateError as e:
        raise QmoeError(f"--chat-template {value[:60]}: {e}") from None
    return text


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          backend: str = "auto", device: str = "auto", rope_mode: Any = None, log_level: str = "info",
          max_batch: int = 8, capacity: int | None = None, chat_template: str | None = None,
          speculation: NgramSpeculation | None = None, max_step_tokens: int | None = None,
          api_key: str | None = None, policy: str = "fcfs") -> None:
    """Load the artifact and serve it until interrupted (Ctrl-C / SIGTERM). chat_template: a
    template file, or the template itself, used instead of the artifact's."""
    import uvicorn

    from .engine import load

    template = read_chat_template(chat_template) if chat_template is not None else None  # before the long load
    engine = load(artifact, backend=backend, device=device, rope_mode=rope_mode)
    if template is not None:
        engine.tokenizer = engine.tokenizer.with_chat_template(template)
    defaults = generation_defaults(artifact)
    name = served_model_name or Path(artifact).resolve().name
    app = create_app(engine, name, defaults, max_batch, capacity, speculation, max_step_tokens, api_key, policy)
    worker = app.state.service.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            worker.shutdown_soon()  # running streams end now (503 in-band) instead of at the timeout
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
    logging.getLogger("uvicorn.error").info("serving %s as %r; sampling defaults %s", artifact, name, defaults)
    # Ctrl-C ends a graceful shutdown as with `uvicorn.run`; a failed bind exits, said in one line below.
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        server.run()
    if not server.started:
        raise QmoeError(f"could not serve on {host}:{port} (see the log above)")
