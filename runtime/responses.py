"""OpenAI's Responses API for `qmoe serve`: POST /v1/responses, GET and DELETE /v1/responses/{id},
GET /v1/responses/{id}/input_items.

    Responses body -> translate() -> a chat body -> Service.parse("chat") (the same validation,
    template, tools, structured output and sampling as /v1/chat/completions) -> the worker
    -> text and tool calls -> _Output: output items (message / function_call) and, streaming,
    OpenAI's typed events (response.created ... response.completed)

Inputs: a string, or items: messages (roles user / system / developer / assistant; text parts),
function_call and function_call_output items (a tool conversation). `instructions` is a system
message first; with `previous_response_id` the stored conversation of that response (its input
and output, not its instructions, as OpenAI documents) comes before the new input. Tools are
function tools; `text.format` is json_object / json_schema; `top_logprobs` with
include ["message.output_text.logprobs"] gives output_text.logprobs in chat's entry shape.

Stored responses (`store`, default true) live in this process, the newest `STORE_LIMIT` of them:
a server restart forgets them, as vLLM's in-memory store does. Not supported (a 400 rather than
ignored): background mode, built-in tools (web search, files, computer use, MCP ...), reasoning
effort (Qwen2 does not reason), prompt templates, conversations, item references, images and files.
"""

from __future__ import annotations

import asyncio
import json
import threading
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import request_json
from .sampling import MAX_TOP_LOGPROBS, TokenLogprob, chat_logprob
from .serve import (REQUEST_SAMPLING_FIELDS, APIError, Finished, GenerationRequest, _server_error, _typed,
                    _until_disconnected, parse_body, results)
from .tools import ToolCall, ToolParser

if TYPE_CHECKING:
    from .serve import Service
    from .tokenizer import Tokenizer

STORE_LIMIT = 1000  # stored responses kept (the oldest go first)
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# Chat / vLLM fields a Responses request may also carry (vLLM takes its sampling extensions here too).
PASSED_THROUGH = (*REQUEST_SAMPLING_FIELDS, "seed", "stop", "stop_token_ids", "ignore_eos", "min_tokens",
                  "allowed_token_ids", "bad_words", "include_stop_str_in_output", "skip_special_tokens", "priority",
                  "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
# Responses fields whose non-default values this server cannot honour.
UNSUPPORTED = {"background": (False,), "conversation": (), "prompt": (), "max_tool_calls": ()}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- request translation ----------------------------------------------------------------------

def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (input_text / output_text) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
                raise APIError(f"{where}.content[{j}]: only text parts (input_text, output_text) are supported, got "
                               f"{json.dumps(kind if kind is not None else part)[:60]}", param="input")
            out.append(part["text"])
        return "".join(out)
    raise APIError(f"{where}.content must be a string or a list of text parts", param="input")


def input_messages(value: Any) -> list[dict[str, Any]]:
    """Responses input -> chat messages (function calls become an assistant message's tool_calls,
    their outputs tool messages)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise APIError("input must be a string or a non-empty list of input items", param="input")
    out: list[dict[str, Any]] = []
    ids: set[str] = set()
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(f"{where} must be an object", param="input")
        item_id = item.get("id")
        if item_id is not None:  # /input_items pages by id: each must be a string, and only once
            if not isinstance(item_id, str) or not item_id:
                raise APIError(f"{where}.id must be a non-empty string", param="input")
            if item_id in ids:
                raise APIError(f"{where}: duplicate item found with id {item_id!r}", param="input")
            ids.add(item_id)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(f"{where}.role must be user, system, developer or assistant, got "
                               f"{json.dumps(role)[:40]}", param="input")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str) or (name == "name" and not item[name]):
                    what = "a non-empty string" if name == "name" else "a string"
                    raise APIError(f"{where}.{name} must be {what}", param="input")
            try:  # as the chat template reads them ("" is {})
                arguments = request_json.loads(item["arguments"] or "{}")
            except request_json.RequestJSONError as e:
                raise APIError(f"{where}.arguments is not valid JSON ({e})", param="input") from None
            if not isinstance(arguments, dict):
                raise APIError(f"{where}.arguments must be a JSON object", param="input")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls of one turn: one assistant message
            elif last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
                last["tool_calls"] = [call]  # the turn's text, then its calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(f"{where}.call_id must be a string", param="input")
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _text_of(output, where)})
        else:
            raise APIError(f"{where}: input items of type {json.dumps(kind)[:40]} are not supported (messages, "
                           "function_call and function_call_output are)", param="input")
    return out


def _tools(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    """Responses function tools and tool_choice -> chat's."""
    value = body.get("tools")
    chat_tools = None
    if value is not None:
        if not isinstance(value, list):
            raise APIError("tools must be a list of function tools", param="tools")
        chat_tools = []
        for i, t in enumerate(value):
            kind = t.get("type") if isinstance(t, dict) else None
            if kind != "function":
                raise APIError(f"tools[{i}]: only function tools are supported, got type {json.dumps(kind)[:40]}",
                               param="tools")
            fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
            chat_tools.append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError("tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                           param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return chat_tools or None, choice


def _format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """text.format -> chat's response_format."""
    text = _typed(body, "text", (dict,), "an object")
    if not text:
        return None
    verbosity = text.get("verbosity")
    if verbosity not in (None, "medium"):
        raise APIError(f"text.verbosity {json.dumps(verbosity)[:40]} is not supported", param="text.verbosity")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        assert isinstance(fmt, dict)
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                        if k in fmt}}
    raise APIError("text.format must be of type text, json_object or json_schema", param="text.format")


@dataclass
class Translated:
    chat: dict[str, Any]  # the body /v1/chat/completions would get
    history: list[dict[str, Any]]  # the conversation without instructions (what a follow-up continues)
    input_items: list[dict[str, Any]]  # this request's input as Responses items, with ids
    logprobs: bool


def _items(value: Any) -> list[dict[str, Any]]:
    """The input as Responses items with ids (for /input_items), as OpenAI lists them: message
    content as parts (input_text, or output_text for the assistant's), each item with a status."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
    out = []
    for item in value:
        kind = item.get("type", "message")
        entry = {"type": kind, "status": "completed", **{k: v for k, v in item.items() if v is not None}}
        entry.setdefault("id", _id(prefix.get(kind, "item")))
        if kind == "message" and isinstance(item.get("content"), str):
            entry["content"] = [{"type": "output_text", "text": item["content"], "annotations": []}
                                if item.get("role") == "assistant" else {"type": "input_text", "text": item["content"]}]
        out.append(entry)
    return out


def translate(body: Mapping[str, Any], store: "ResponseStore") -> Translated:
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise APIError(f"{name}={json.dumps(body[name])[:60]} is not supported by this server", param=name)
    reasoning = _typed(body, "reasoning", (dict,), "an object")
    if reasoning and reasoning.get("effort") is not None:
        raise APIError("reasoning.effort is not supported: this model does not reason", param="reasoning.effort")
    instructions = _typed(body, "instructions", (str,), "a string")
    history: list[dict[str, Any]] = []
    previous = _typed(body, "previous_response_id", (str,), "a string")
    if previous is not None:
        stored = store.get(previous)
        if stored is None:
            raise APIError(f"Previous response with id '{previous}' not found.", status=404,
                           param="previous_response_id", code="previous_response_not_found")
        history = [dict(m) for m in stored.conversation]
    if body.get("input") is None:
        raise APIError("input is required", param="input")
    history += input_messages(body["input"])
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + history
    include = _typed(body, "include", (list,), "a list of strings") or []
    if not all(isinstance(x, str) for x in include):
        raise APIError("include must be a list of strings", param="include")
    _typed(body, "store", (bool,), "true or false")
    _typed(body, "user", (str,), "a string")
    top = _typed(body, "top_logprobs", (int,), f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    logprobs = LOGPROBS_INCLUDE in include or top is not None
    chat: dict[str, Any] = {"messages": messages, "stream": bool(_typed(body, "stream", (bool,), "true or false"))}
    options = _typed(body, "stream_options", (dict,), "an object")
    if options is not None:  # no obfuscation is sent: only asking for none can be honoured
        if not chat["stream"]:
            raise APIError("stream_options is only allowed with stream: true", param="stream_options")
        if set(options) - {"include_obfuscation"} or options.get("include_obfuscation") not in (None, False):
            raise APIError("stream_options: only {\"include_obfuscation\": false} is supported (this server sends no "
                           "obfuscation)", param="stream_options")
    if body.get("model") is not None:
        chat["model"] = body["model"]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    tools, choice = _tools(body)
    if tools is not None:
        chat["tools"] = tools
    if choice is not None:
        chat["tool_choice"] = choice
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    fmt = _format(body)
    if fmt is not None:
        chat["response_format"] = fmt
    if logprobs:
        chat["logprobs"] = True
        if top:
            chat["top_logprobs"] = top
    chat.update({k: body[k] for k in PASSED_THROUGH if body.get(k) is not None})
    return Translated(chat, history, _items(body["input"]), logprobs)


# --- the store --------------------------------------------------------------------------------

@dataclass
class Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # chat messages: the input (no instructions) and the output
    input_items: list[dict[str, Any]]


class ResponseStore:
    """The newest `limit` stored responses, by id (the event loop writes; request parsing in the
    thread pool reads)."""

    def __init__(self, limit: int = STORE_LIMIT) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, resp_id: str, entry: Stored) -> None:
        with self._lock:
            self._items[resp_id] = entry
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def get(self, resp_id: str) -> Stored | None:
        with self._lock:
            return self._items.get(resp_id)

    def delete(self, resp_id: str) -> bool:
        with self._lock:
            return self._items.pop(resp_id, None) is not None


# --- output -----------------------------------------------------------------------------------

@dataclass
class _Output:
    """Output items built from a generation's pieces (text, tool calls, log-probabilities) in
    order; `events` collects the stream's typed events (sequence numbers are the caller's)."""

    tokenizer: "Tokenizer"
    skip_special_tokens: bool = True
    items: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    _message: dict[str, Any] | None = None  # the open message item
    _pending: list[dict[str, Any]] = field(default_factory=list)  # log-probabilities not sent yet

    def _emit(self, kind: str, **payload: Any) -> None:
        self.events.append({"type": kind, **payload})

    def logprob(self, entry: TokenLogprob) -> None:
        self._pending.append(chat_logprob(entry, self.tokenizer, self.skip_special_tokens))

    def _open(self) -> dict[str, Any]:
        if self._message is None:
            self._message = {"id": _id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                             "content": []}
            self.items.append(self._message)
            index = len(self.items) - 1
            self._emit("response.output_item.added", output_index=index, item=_copy(self._message))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self._message["content"].append(part)
            self._emit("response.content_part.added", item_id=self._message["id"], output_index=index,
                       content_index=0, part=_copy(part))
        return self._message

    def text(self, piece: str, flush: bool = False) -> None:
        if not piece and not (flush and self._pending):
            return
        message = self._open()
        part = message["content"][0]
        part["text"] += piece
        lps, self._pending = self._pending, []
        part["logprobs"] += lps
        self._emit("response.output_text.delta", item_id=message["id"], output_index=len(self.items) - 1,
                   content_index=0, delta=piece, logprobs=lps)

    def _close(self, status: str) -> None:
        message, self._message = self._message, None
        if message is None:
            return
        index = self.items.index(message)
        part = message["content"][0]
        message["status"] = status
        self._emit("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                   text=part["text"], logprobs=part["logprobs"])
        self._emit("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                   part=_copy(part))
        self._emit("response.output_item.done", output_index=index, item=_copy(message))

    def call(self, c: ToolCall) -> None:
        self._close("completed")
        self._pending = []  # the call's own tokens: no text carries them
        item = {"id": _id("fc"), "type": "function_call", "status": "completed", "call_id": c.id, "name": c.name,
                "arguments": c.arguments}
        self.items.append(item)
        index = len(self.items) - 1
        self._emit("response.output_item.added", output_index=index,
                   item={**item, "status": "in_progress", "arguments": ""})
        self._emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                   delta=c.arguments)
        self._emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                   name=c.name, arguments=c.arguments)
        self._emit("response.output_item.done", output_index=index, item=_copy(item))

    def finish(self, status: str) -> None:
        """status: the message's, "completed" or "incomplete"; an output with nothing in it gets an
        empty message, as OpenAI's does."""
        if self._pending and self._message is not None:
            self.text("", flush=True)
        if not self.items:
            self._open()
        self._close(status)

    def conversation(self) -> dict[str, Any]:
        """The output as one chat assistant message (what a follow-up request continues)."""
        text = "".join(p["text"] for it in self.items if it["type"] == "message" for p in it["content"])
        calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"],
                                                                       "arguments": it["arguments"]}}
                 for it in self.items if it["type"] == "function_call"]
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        return message


def _copy(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def _response(resp_id: str, created: float, body: Mapping[str, Any], model: str, req: GenerationRequest,
              status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """The response object: the request's settings as applied, and the output so far."""
    p = req.sampling
    fmt = (body.get("text") or {}).get("format") or {"type": "text"}
    return {
        "id": resp_id, "object": "response", "created_at": created, "status": status, "background": False,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": model, "output": output, "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": body.get("previous_response_id"), "reasoning": None,
        "store": body.get("store") is not False, "temperature": p.temperature, "top_p": p.top_p,
        "text": {"format": fmt}, "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "top_logprobs": body.get("top_logprobs"), "truncation": body.get("truncation") or "disabled",
        "usage": usage, "user": body.get("user"), "metadata": body.get("metadata") or {},
        **({"completed_at": time.time()} if status in ("completed", "incomplete") else {}),
    }


def _check_metadata(body: Mapping[str, Any]) -> None:
    meta = _typed(body, "metadata", (dict,), "an object of strings")
    if meta is not None and (len(meta) > 16 or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                                                       and len(v) <= 512 for k, v in meta.items())):
        raise APIError("metadata holds at most 16 string keys (<= 64 characters) with string values "
                       "(<= 512 characters)", param="metadata")
    truncation = body.get("truncation")
    if truncation not in (None, "auto", "disabled"):
        raise APIError("truncation must be auto or disabled", param="truncation")


# The chat request's fields an error from Service.parse can name -> the Responses fields they came from.
CHAT_FIELDS = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
               "response_format": "text.format", "messages": "input"}
_CHAT_FIELD = re.compile(r"\b(max_completion_tokens|max_tokens|response_format)\b")


def _renamed(e: APIError) -> APIError:
    """A chat-route error in the Responses request's own terms (its param and the fields its
    message names)."""
    if e.param not in CHAT_FIELDS and not _CHAT_FIELD.search(str(e)):
        return e
    message = _CHAT_FIELD.sub(lambda m: CHAT_FIELDS[m.group(1)], str(e))
    return APIError(message, status=e.status, param=CHAT_FIELDS.get(e.param or "", e.param), code=e.code,
                    type=e.type)


def _parse(service: "Service", body: Mapping[str, Any], store: ResponseStore) -> tuple[Translated, GenerationRequest]:
    """The request as the chat route parses it; truncation "auto" drops the oldest conversation
    items (never the last one) until the prompt fits, as OpenAI does."""
    _check_metadata(body)
    t = translate(body, store)
    while True:
        try:
            return t, service.parse("chat", t.chat)
        except APIError as e:
            messages = t.chat["messages"]
            system = 1 if messages and messages[0]["role"] == "system" and body.get("instructions") else 0
            if e.code != "context_length_exceeded" or body.get("truncation") != "auto" or len(messages) - system < 2:
                raise _renamed(e) from None
            del messages[system]
            t.history = t.history[1:]


# --- routes -----------------------------------------------------------------------------------

def routes(service: "Service", tokenizer: "Tokenizer") -> list[Route]:
    store = ResponseStore()

    async def create(request: Request) -> Response:
        arrived = time.monotonic()
        body = parse_body(await request.body())
        t, req = await run_in_threadpool(_parse, service, body, store)
        from dataclasses import replace

        req = replace(req, arrived=arrived)
        service.worker.check_open()
        run = _Run(service, body, t, req, tokenizer, store)
        if req.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        return JSONResponse(await run.whole(request))

    def found(request: Request) -> tuple[str, Stored]:
        resp_id = request.path_params["response_id"]
        entry = store.get(resp_id)
        if entry is None:
            raise APIError(f"No response found with id '{resp_id}'.", status=404, param="response_id",
                           code="not_found")
        return resp_id, entry

    async def get(request: Request) -> Response:
        if request.query_params.get("stream") in ("true", "1"):
            raise APIError("streaming a stored response again is not supported", param="stream")
        return JSONResponse(found(request)[1].response)

    async def delete(request: Request) -> Response:
        resp_id, _ = found(request)
        store.delete(resp_id)
        return JSONResponse({"id": resp_id, "object": "response", "deleted": True})

    async def input_items(request: Request) -> Response:
        _, entry = found(request)
        q = request.query_params
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise APIError("order must be asc or desc", param="order")
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise APIError("limit must be an integer in [1, 100]", param="limit")
        items = entry.input_items if order == "asc" else entry.input_items[::-1]
        after = q.get("after")
        if after is not None:
            ids = [it["id"] for it in items]
            if after not in ids:
                raise APIError(f"after: no input item {after!r} in this response", param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})

    return [Route("/v1/responses", create, methods=["POST"]),
            Route("/v1/responses/{response_id}", get, methods=["GET"]),
            Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/input_items", input_items, methods=["GET"])]


class _Run:
    """One Responses request through the worker."""

    def __init__(self, service: "Service", body: Mapping[str, Any], t: Translated, req: GenerationRequest,
                 tokenizer: "Tokenizer", store: ResponseStore) -> None:
        self.service, self.body, self.t, self.req, self.store = service, body, t, req, store
        self.id, self.created = _id("resp"), time.time()
        self.out = _Output(tokenizer, req.sampling.skip_special_tokens)
        self.parser = req.tool_parser()
        self.model = service.model_name

    def _piece(self, item: "str | TokenLogprob") -> None:
        if isinstance(item, TokenLogprob):
            if self.t.logprobs:
                self.out.logprob(item)
            return
        for piece in self.parser.push(item) if self.parser is not None else [item]:
            self._place(piece)

    def _place(self, piece: "str | ToolCall") -> None:
        if isinstance(piece, str):
            self.out.text(piece)
        else:
            self.out.call(piece)

    def _finish(self, done: Finished) -> dict[str, Any]:
        if self.parser is not None:
            for piece in self.parser.finish():
                self._place(piece)
        status = "incomplete" if done.finish_reason == "length" else "completed"
        self.out.finish(status)
        response = _response(self.id, self.created, self.body, self.model, self.req, status, self.out.items,
                             _usage(len(self.req.prompt_ids), done.completion_tokens, done.cached_tokens))
        if response["store"] and done.finish_reason != "cancelled":  # a client that left gets nothing stored
            self.store.put(self.id, Stored(response, self.t.history + [self.out.conversation()], self.t.input_items))
        return response

    async def whole(self, request: Request) -> dict[str, Any]:
        jobs = self.service.worker.submit_all([self.req])
        watcher = asyncio.ensure_future(_until_disconnected(request, jobs))
        done = Finished("stop", 0)
        try:
            async for _, item in results(jobs):
                if isinstance(item, Finished):
                    done = item
                else:
                    self._piece(item)
        finally:
            watcher.cancel()
        return self._finish(done)

    async def stream(self) -> AsyncIterator[str]:
        seq = 0

        def sse(event: dict[str, Any]) -> str:
            nonlocal seq
            event = {**event, "sequence_number": seq}
            seq += 1
            return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

        def drain() -> list[str]:
            events, self.out.events = self.out.events, []
            return [sse(e) for e in events]

        jobs = []
        try:
            start = _response(self.id, self.created, self.body, self.model, self.req, "in_progress", [], None)
            yield sse({"type": "response.created", "response": start})
            yield sse({"type": "response.in_progress", "response": start})
            jobs = self.service.worker.submit_all([self.req])
            async for _, item in results(jobs):
                if isinstance(item, Finished):
                    response = self._finish(item)
                    for chunk in drain():
                        yield chunk
                    kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
                    yield sse({"type": kind, "response": response})
                else:
                    self._piece(item)
                    for chunk in drain():
                        yield chunk
        except Exception as e:  # noqa: BLE001  (headers are sent: report in-band, as OpenAI does)
            err = _server_error(e)
            if self.service.metrics is not None:
                self.service.metrics.error(err.status)
            yield sse({"type": "error", "code": err.code or err.type, "message": str(err), "param": err.param})
        finally:
            for job in jobs:
                job.cancelled.set()
