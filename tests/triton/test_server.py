"""A real tritonserver (the nvidia-pytriton wheel's) serving a repository written by `qmoe triton`
for the tiny artifact, driven over gRPC streaming; every answer is checked against the embedded
runtime run in this process with the same SamplingParams."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from runtime.engine import GenerationResult
from runtime.sampling import SamplingParams
from runtime.triton import ModelSpec, current_python_env, write_repository
from runtime.triton.server import WheelServer, find_wheel_server, prepare_backends, server_args, server_env

pytestmark = pytest.mark.slow
grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs the triton extra (tritonclient)")

MODEL = "qwen2_moe"
START_TIMEOUT = 120.0
RESPONSE_TIMEOUT = 60.0


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path
    shm_prefix: str
    http: str = ""  # http://host:port of the HTTP/REST endpoint


@dataclass
class Reply:
    deltas: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    final: bool = False
    error: str | None = None
    logprobs: list = field(default_factory=list)  # the `logprobs` outputs' entries, in order
    outputs: list[str] = field(default_factory=list)  # the `text_output` of each response

    @property
    def text(self) -> str:
        return "".join(self.deltas)


class Stream:
    """One gRPC stream (one client); responses are matched to requests by id."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def send(self, request_id: str, **inputs: str | bytes | bool) -> None:
        tensors = []
        for name, value in inputs.items():
            if isinstance(value, bool):
                tensor = grpcclient.InferInput(name, [1], "BOOL")
                tensor.set_data_from_numpy(np.array([value], np.bool_))
            else:
                tensor = grpcclient.InferInput(name, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([value if isinstance(value, bytes) else value.encode()],
                                                    np.object_))
            tensors.append(tensor)
        self.client.async_stream_infer(MODEL, tensors, request_id=request_id, enable_empty_final_response=True)

    def reply(self, request_id: str) -> Reply:
        """Responses of the one request in flight on this stream, up to its final one or error
        (errors carry no request id on a gRPC stream, hence one request at a time)."""
        reply = Reply()
        while not reply.final:
            result, error = self.events.get(timeout=RESPONSE_TIMEOUT)
            if error is not None:
                reply.error = str(error)
                return reply
            assert result.get_response().id == request_id
            _collect(reply, result)
        return reply

    def replies(self, ids: list[str]) -> dict[str, Reply]:
        """Replies of several requests sent on this stream, interleaved as they come."""
        replies = {i: Reply() for i in ids}
        while not all(r.final for r in replies.values()):
            result, error = self.events.get(timeout=RESPONSE_TIMEOUT)
            assert error is None, error
            _collect(replies[result.get_response().id], result)
        return replies

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def _collect(reply: Reply, result) -> None:
    response = result.get_response()
    assert not reply.final, f"a response after the final one for {response.id}"
    names = {o.name for o in response.outputs}
    if "text_delta" in names:
        reply.deltas.append(result.as_numpy("text_delta")[0].decode("utf-8"))
    if "text_output" in names:
        reply.outputs.append(result.as_numpy("text_output")[0].decode("utf-8"))
    if "logprobs" in names:
        reply.logprobs.extend(json.loads(result.as_numpy("logprobs")[0].decode("utf-8")))
    if "finish_reason" in names:
        reply.finish_reason = result.as_numpy("finish_reason")[0].decode()
        reply.prompt_tokens = int(result.as_numpy("prompt_tokens")[0])
        reply.completion_tokens = int(result.as_numpy("completion_tokens")[0])
    reply.final = response.parameters["triton_final_response"].bool_param


def embedded_reply(engine, sampling: SamplingParams, prompt: str | None = None, messages=None) -> Reply:
    ids = engine.tokenizer.encode(prompt) if prompt is not None else engine.tokenizer.encode_chat(messages)
    result = GenerationResult(list(ids))
    deltas = list(engine.stream_text(ids, sampling, result=result))
    return Reply(deltas, result.finish_reason, len(ids), len(result.tokens), True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_pids(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies waiting for a reaper do not count)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture(scope="module")
def wheel() -> WheelServer:
    server = find_wheel_server()
    if server is None:
        pytest.skip("no tritonserver: the nvidia-pytriton wheel (with its python backend stub) is not installed")
    return server


@pytest.fixture(scope="module")
def server(wheel: WheelServer, tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("triton")
    # Two instances: two stub processes, each with its own engine and batching scheduler, share the
    # requests. Speculation with 1-gram lookups drafts whenever a token repeats (mostly rejected by
    # this random model), and a 16-token step budget splits prompts across steps: every output must
    # still equal the embedded runtime's.
    write_repository(tiny_artifact, root / "repo", ModelSpec(
        instances=2, python_env=current_python_env(), max_batch=4, max_num_batched_tokens=16,
        speculative_config='{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'))
    backends = prepare_backends(wheel, root / "backends")
    grpc_port, http_port = free_port(), free_port()
    shm_prefix = f"qmoetest{os.getpid()}-{secrets.token_hex(4)}"
    args = server_args(wheel, root / "repo", backends, http_port=http_port, grpc_port=grpc_port, shm_prefix=shm_prefix)
    args.append("--disable-auto-complete-config")  # saves a stub start; the config is complete
    env = server_env(wheel, Path(sys.executable).parent)  # this Python (with qmoe) first on PATH
    log = root / "tritonserver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                   start_new_session=True)  # its own process group: the stubs join it
    url = f"127.0.0.1:{grpc_port}"
    try:
        client = grpcclient.InferenceServerClient(url)
        deadline = time.monotonic() + START_TIMEOUT
        while not _ready(client):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tritonserver did not get ready (exit code {process.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        client.close()
        yield Server(process, url, log, shm_prefix, f"http://127.0.0.1:{http_port}")
    finally:
        if live_pids(process.pid):  # test_shutdown did not run or failed: stop the server and its stubs
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
            for region in Path("/dev/shm").glob(f"{shm_prefix}*"):  # a killed server leaves them behind
                region.unlink(missing_ok=True)


def _ready(client) -> bool:
    try:
        return client.is_server_ready() and client.is_model_ready(MODEL)
    except Exception:  # noqa: BLE001  (not listening yet)
        return False


@pytest.fixture
def stream(server: Server) -> Iterator[Stream]:
    s = Stream(server.url)
    yield s
    s.close()


MESSAGES = [{"role": "user", "content": "Tell me about mixtures of experts."}]


@pytest.mark.parametrize("kind, params", [
    ("prompt", {"max_tokens": 16}),
    ("messages", {"max_tokens": 16}),
    ("prompt", {"max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 7}),
    ("messages", {"max_tokens": 12, "temperature": 0.9, "min_p": 0.05, "presence_penalty": -2.0,
                  "frequency_penalty": 0.5, "logit_bias": {"11": 3.0}, "seed": 3}),
])
def test_streamed_text_equals_embedded_runtime(server: Server, stream: Stream, embedded, kind, params):
    inputs = {"prompt": "Hello world"} if kind == "prompt" else {"messages": json.dumps(MESSAGES)}
    stream.send("r1", **inputs, sampling_parameters=json.dumps(params))
    got = stream.reply("r1")
    assert got.error is None, got.error
    sampling = SamplingParams(max_new_tokens=params.pop("max_tokens"), **params)
    want = embedded_reply(embedded, sampling, prompt=inputs.get("prompt"), messages=MESSAGES)
    assert got.text == want.text
    assert got.deltas[:-1] == want.deltas  # streamed as the engine yields; the final response adds ""
    assert len(got.deltas) > 2 and got.deltas[-1] == ""
    assert (got.finish_reason, got.prompt_tokens, got.completion_tokens) == (
        want.finish_reason, want.prompt_tokens, want.completion_tokens)


def test_logprobs_are_the_models_own(server: Server, stream: Stream, embedded):
    """parameters.logprobs = k: every generated token's entry (OpenAI chat's shape), equal to what
    the embedded engine reports alone (<= 1e-4: the server's steps batch), the alternatives too."""
    stream.send("lp", prompt="Experts route", sampling_parameters=json.dumps({"max_tokens": 8, "logprobs": 3}))
    got = stream.reply("lp")
    assert got.error is None, got.error
    ids = embedded.tokenizer.encode("Experts route")
    want = GenerationResult(list(ids))
    text = "".join(embedded.stream_text(ids, SamplingParams(max_new_tokens=8, logprobs=3), result=want))
    assert got.text == text and len(got.logprobs) == got.completion_tokens == len(want.tokens)
    for entry, ref in zip(got.logprobs, want.logprobs):
        assert entry["token"] == embedded.tokenizer.decode([ref.token])
        assert bytes(entry["bytes"]) == (embedded.tokenizer.token_bytes(ref.token) if entry["token"] else b"")
        assert abs(entry["logprob"] - ref.logprob) <= 1e-4 and len(entry["top_logprobs"]) == 3
        assert [t["token"] for t in entry["top_logprobs"]] == [embedded.tokenizer.decode([t]) for t, _ in ref.top]
    stream.send("plain", prompt="Experts route", sampling_parameters=json.dumps({"max_tokens": 2}))
    assert stream.reply("plain").logprobs == []


def test_stop_string_is_honoured(server: Server, stream: Stream, embedded):
    full = embedded_reply(embedded, SamplingParams(max_new_tokens=16), prompt="Hello world").text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    stream.send("stop", prompt="Hello world", sampling_parameters=json.dumps({"max_tokens": 16, "stop": [stop]}))
    got = stream.reply("stop")
    assert got.error is None, got.error
    assert got.text == full[: full.index(stop)] and got.finish_reason == "stop"


def test_concurrent_streams_each_get_their_own_answer(server: Server, embedded):
    words = ["apples", "rivers", "GPUs", "Paris", "tea", "music", "snow", "code",
             "chess", "wind", "ships", "bread", "stars", "ink", "moss", "glass"]
    requests = {f"req-{i}": (f"Question {i}: what about {w}?", 4 + i % 5) for i, w in enumerate(words)}
    streams = {rid: Stream(server.url) for rid in requests}
    try:
        for rid, (prompt, max_tokens) in requests.items():  # all in flight before any is read
            streams[rid].send(rid, prompt=prompt, sampling_parameters=json.dumps({"max_tokens": max_tokens}))
        replies = {}
        threads = [threading.Thread(target=lambda r=rid: replies.update(streams[r].replies([r]))) for rid in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RESPONSE_TIMEOUT)
    finally:
        for s in streams.values():
            s.close()
    assert sorted(replies) == sorted(requests), "some requests got no final response"
    # in-flight batching: each instance ran several of them in one step
    shared = [int(n) for n in re.findall(r"(\d+) requests shared a step", server.log.read_text())]
    assert shared and max(shared) >= 2, "no step was shared"
    for rid, (prompt, max_tokens) in requests.items():
        want = embedded_reply(embedded, SamplingParams(max_new_tokens=max_tokens), prompt=prompt)
        got = replies[rid]
        assert (got.text, got.completion_tokens, got.prompt_tokens) == (
            want.text, want.completion_tokens, want.prompt_tokens), rid


def test_one_stream_carries_interleaved_requests(server: Server, stream: Stream, embedded):
    ids = [f"s{i}" for i in range(4)]
    for i, rid in enumerate(ids):
        stream.send(rid, prompt=f"Story number {i}", sampling_parameters=json.dumps({"max_tokens": 6}))
    replies = stream.replies(ids)
    for i, rid in enumerate(ids):
        assert replies[rid].text == embedded_reply(embedded, SamplingParams(max_new_tokens=6),
                                                   prompt=f"Story number {i}").text


def test_cancelled_request_stops_generating(server: Server, stream: Stream, embedded):
    gone = Stream(server.url)
    gone.send("long", prompt="Tell me everything", sampling_parameters=json.dumps({"max_tokens": 4000}))
    result, error = gone.events.get(timeout=RESPONSE_TIMEOUT)  # the first delta: it is generating
    assert error is None and result.get_response().id == "long"
    gone.client.stop_stream(cancel_requests=True)
    gone.client.close()
    deadline = time.monotonic() + 20  # 4000 tokens would take minutes on 2 cores
    while "request 'long' cancelled after" not in server.log.read_text():
        assert time.monotonic() < deadline, "the model did not notice the cancellation"
        time.sleep(0.1)
    stream.send("next", prompt="Still there?", sampling_parameters=json.dumps({"max_tokens": 5}))
    want = embedded_reply(embedded, SamplingParams(max_new_tokens=5), prompt="Still there?")
    assert stream.reply("next").text == want.text


def test_the_vllm_backend_interface(server: Server, stream: Stream, embedded):
    """text_input + sampling_parameters, as clients of Triton's vLLM backend send them: one response
    whose text_output is the prompt and the reply; stream=true streams deltas without the prompt."""
    want = embedded_reply(embedded, SamplingParams(max_new_tokens=8, temperature=0.0), prompt="Hello world")
    stream.send("v1", text_input="Hello world", sampling_parameters=json.dumps({"max_tokens": 8, "temperature": 0}))
    got = stream.reply("v1")
    assert got.error is None, got.error
    assert got.outputs == ["Hello world" + want.text] and got.deltas == [want.text] and got.final
    assert (got.finish_reason, got.completion_tokens) == (want.finish_reason, want.completion_tokens)
    stream.send("v2", text_input="Hello world", sampling_parameters=json.dumps({"max_tokens": 8}), stream=True)
    got = stream.reply("v2")
    assert got.outputs[:-1] == want.deltas and got.outputs[-1] == "" and "".join(got.outputs) == want.text
    stream.send("v3", text_input="Hello world", sampling_parameters='{"max_tokens": 8}', stream=True,
                exclude_input_in_output=False)
    assert "".join(stream.reply("v3").outputs) == "Hello world" + want.text


def _http(url: str, body: dict) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=RESPONSE_TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_generate_endpoints(server: Server, embedded):
    """Triton's HTTP generate extension, curl-able: /generate answers one JSON object,
    /generate_stream server-sent events; "parameters" carries the sampling fields."""
    want = embedded_reply(embedded, SamplingParams(max_new_tokens=8), prompt="Hello world")
    base = f"{server.http}/v2/models/{MODEL}"
    code, raw = _http(f"{base}/generate", {"text_input": "Hello world", "parameters": {"max_tokens": 8}})
    assert code == 200, raw
    body = json.loads(raw)
    assert body["text_output"] == "Hello world" + want.text and body["finish_reason"] == want.finish_reason
    assert body["completion_tokens"] == want.completion_tokens and body["prompt_tokens"] == want.prompt_tokens
    code, raw = _http(f"{base}/generate_stream", {"text_input": "Hello world", "stream": True,
                                                 "parameters": {"max_tokens": 8}})
    assert code == 200, raw
    events = [json.loads(line[len("data: "):]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert len(events) > 2 and "".join(e["text_output"] for e in events) == want.text
    assert events[-1]["finish_reason"] == want.finish_reason
    code, raw = _http(f"{base}/generate", {"text_input": "Hello", "parameters": {"temprature": 0.5}})
    assert code == 400 and b"unknown request parameter 'temprature'" in raw


BAD_REQUESTS: list[tuple[dict[str, str | bytes], str]] = [
    ({"prompt": "hi", "sampling_parameters": "{bad json"}, "input 'sampling_parameters' is not valid JSON"),
    ({"prompt": "hi", "sampling_parameters": '{"max_tokens": 4, "best_of": 2}'}, "unknown parameter 'best_of'"),
    ({"prompt": "hi", "sampling_parameters": '{"max_tokens": 4, "frequency_penalty": 3}'},
     "frequency_penalty must be in [-2, 2]"),
    ({"prompt": "hi", "sampling_parameters": '{"logit_bias": {"999999": 1}}'}, "logit_bias keys must be token ids in"),
    ({"prompt": "hi", "sampling_parameters": '{"temperature": -1}'}, "temperature must be >= 0"),
    ({"prompt": "hi " * 33000, "sampling_parameters": '{"max_tokens": 4}'}, "over the limit"),
    ({"prompt": "hi", "sampling_parameters": '{"max_tokens": 40000}'}, "over the limit"),
    ({"prompt": "hi", "messages": json.dumps(MESSAGES)}, "send exactly one of the inputs"),
    ({"messages": '[{"role": "robot", "content": "x"}]'}, "messages[0].role is 'robot'"),
    ({"prompt": b"\xff\xfe"}, "not valid UTF-8"),
    ({"prompt": "hi", "temperature": "0"}, "unexpected inference input 'temperature'"),  # refused by Triton itself
    ({"prompt": "hi", "parameters": "{}"}, "unexpected inference input 'parameters'"),  # renamed sampling_parameters
]


def test_bad_requests_get_an_error_and_the_model_keeps_serving(server: Server, stream: Stream, embedded):
    want = embedded_reply(embedded, SamplingParams(max_new_tokens=5), prompt="Still there?")
    for inputs, message in BAD_REQUESTS:
        stream.send("bad", **inputs)
        got = stream.reply("bad")
        assert got.error is not None and message in got.error, (inputs.keys(), got)
        assert stream.events.empty()  # exactly one response: the error
        stream.send("good", prompt="Still there?", sampling_parameters=json.dumps({"max_tokens": 5}))
        assert stream.reply("good").text == want.text


def test_shutdown_is_clean(server: Server):
    """SIGTERM: the server unloads the model, the stubs exit, nothing of the group is left, and the
    python backend's shared memory is gone. Runs last in this module (pytest keeps file order)."""
    assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*")), "expected the running stubs' shared memory"
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=60)
    log = server.log.read_text()
    assert code == 0, log[-4000:]
    assert "successfully unloaded 'qwen2_moe' version 1" in log
    deadline = time.monotonic() + 15
    while live_pids(server.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_pids(server.process.pid) == [], "stray processes in the server's group"
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
    assert "Traceback" not in log and " failed: " not in log
