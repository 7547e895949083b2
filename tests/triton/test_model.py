"""runtime/triton/model.py driven in-process, with a stand-in for the python backend's
`triton_python_backend_utils` (fast, no tritonserver): what happens when a client's response
sender fails, when requests are cancelled before they run, and when the model unloads with
requests in flight. Every request must end with exactly one final response, and the others'
outputs must equal their solo runs."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.engine import GenerationResult
from runtime.sampling import SamplingParams

FINAL = 1
MODEL_PY = Path(__file__).resolve().parents[2] / "runtime" / "triton" / "model.py"


class TritonError:
    INVALID_ARG, INTERNAL, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "UNAVAILABLE"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


class Tensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self.name, self.value = name, value

    def as_numpy(self) -> np.ndarray:
        return self.value


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None) -> None:
        self.outputs = {t.name: t.value[0] for t in output_tensors}
        self.error = error


class Logger:
    lines: list[str] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.lines.append(message)

    log_error = log_warn = log_info


def get_input_tensor_by_name(request, name: str):
    value = request.inputs.get(name)
    return None if value is None else Tensor(name, np.array([value.encode()], np.object_))


@pytest.fixture
def pb_utils(monkeypatch):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    fake.TritonError, fake.Tensor, fake.InferenceResponse = TritonError, Tensor, InferenceResponse
    fake.Logger, fake.get_input_tensor_by_name = Logger, get_input_tensor_by_name
    Logger.lines = []
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    return fake


class Sender:
    """A response sender: records responses; `fail_after` sends succeed, then send raises (the
    client's connection broke); `cancelled` is what is_cancelled() says."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.responses: list[tuple[InferenceResponse | None, int]] = []
        self.fail_after = fail_after
        self.cancelled = False
        self.closed = threading.Event()

    def is_cancelled(self) -> bool:
        return self.cancelled

    def send(self, response=None, flags: int = 0) -> None:
        assert not self.closed.is_set(), "a response after the final one"
        if self.fail_after is not None and len(self.responses) >= self.fail_after:
            raise RuntimeError("Unable to send response: the stream is gone")
        self.responses.append((response, flags))
        if flags & FINAL:
            self.closed.set()

    @property
    def text(self) -> str:
        return "".join(r.outputs.get("text_delta", b"").decode() for r, _ in self.responses if r is not None)

    @property
    def error(self) -> str | None:
        errors = [r.error.message for r, _ in self.responses if r is not None and r.error is not None]
        return errors[0] if errors else None


class Request:
    def __init__(self, request_id: str, sender: Sender, **inputs: str) -> None:
        self.id, self.sender, self.inputs = request_id, sender, inputs

    def get_response_sender(self) -> Sender:
        return self.sender

    def parameters(self) -> str:  # the python backend hands the request's parameters as JSON text
        return "{}"

    def request_id(self) -> str:
        return self.id


def load_model(pb_utils, artifact: Path, **params):
    spec = importlib.util.spec_from_file_location("qmoe_triton_model_under_test", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    parameters = {"artifact": str(artifact), **{k: str(v) for k, v in params.items()}}
    model.initialize({
        "model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in parameters.items()}}),
        "model_repository": str(artifact.parent), "model_version": "1", "model_instance_kind": "CPU",
        "model_instance_name": "qwen2_moe_0"})
    return model


def solo(engine, prompt: str, max_tokens: int) -> str:
    ids = engine.tokenizer.encode(prompt)
    return "".join(engine.stream_text(ids, SamplingParams(max_new_tokens=max_tokens), result=GenerationResult(ids)))


def ask(model, request_id: str, prompt: str, max_tokens: int, sender: Sender | None = None) -> Sender:
    sender = sender or Sender()
    model.execute([Request(request_id, sender, prompt=prompt, sampling_parameters=json.dumps({"max_tokens": max_tokens}))])
    return sender


def test_a_client_whose_sends_fail_does_not_fail_the_requests_sharing_its_steps(pb_utils, tiny_artifact, embedded):
    model = load_model(pb_utils, tiny_artifact, max_batch=4)
    try:
        # the first delta of "broken" raises: its client is gone; the other two share those steps
        broken = Sender(fail_after=0)
        senders = {"a": Sender(), "broken": broken, "b": Sender()}
        prompts = {"a": "Hello world", "broken": "Tell me a story", "b": "What about tea?"}
        model.execute([Request(rid, s, prompt=prompts[rid], sampling_parameters=json.dumps({"max_tokens": 12}))
                       for rid, s in senders.items()])
        for rid in ("a", "b"):
            assert senders[rid].closed.wait(60), rid
            assert senders[rid].error is None, (rid, senders[rid].error)
            assert senders[rid].text == solo(embedded, prompts[rid], 12), rid
        # the model keeps serving
        assert ask(model, "next", "Still there?", 5).closed.wait(60)
    finally:
        model.finalize()
    assert not model.worker.is_alive()


def test_a_failing_final_send_of_a_request_cancelled_while_queued_does_not_stop_the_worker(
        pb_utils, tiny_artifact, embedded):
    model = load_model(pb_utils, tiny_artifact, max_batch=2)
    try:
        gone = Sender(fail_after=0)
        gone.cancelled = True
        ask(model, "gone", "Hello world", 4, gone)
        nxt = ask(model, "next", "Still there?", 5)
        assert nxt.closed.wait(60), "the worker thread died: later requests hang"
        assert nxt.text == solo(embedded, "Still there?", 5)
    finally:
        model.finalize()


def test_cancelled_requests_end_with_one_final_response_and_are_logged(pb_utils, tiny_artifact, embedded):
    model = load_model(pb_utils, tiny_artifact, max_batch=1)
    try:
        long, queued = Sender(), Sender()
        ask(model, "long", "Tell me everything", 2000, long)
        ask(model, "queued", "Hello world", 2000, queued)  # waits for the one slot
        while not long.responses:
            threading.Event().wait(0.01)
        long.cancelled = queued.cancelled = True
        assert long.closed.wait(60) and queued.closed.wait(60)
        assert long.responses[-1] == (None, FINAL) and queued.responses == [(None, FINAL)]
        assert any("request 'long' cancelled after" in line for line in Logger.lines)
        nxt = ask(model, "next", "Still there?", 5)
        assert nxt.closed.wait(60) and nxt.text == solo(embedded, "Still there?", 5)
    finally:
        model.finalize()


def test_unloading_ends_running_and_queued_requests(pb_utils, tiny_artifact):
    model = load_model(pb_utils, tiny_artifact, max_batch=1)
    running, queued = Sender(), Sender()
    ask(model, "running", "Tell me everything", 2000, running)
    ask(model, "queued", "Hello world", 2000, queued)
    while not running.responses:
        threading.Event().wait(0.01)
    model.finalize()
    assert not model.worker.is_alive()
    for s in (running, queued):
        assert s.closed.is_set() and s.error == "the model is shutting down"


def test_a_request_over_max_context_gets_one_error_and_the_model_keeps_serving(pb_utils, tiny_artifact, embedded):
    model = load_model(pb_utils, tiny_artifact, max_batch=2, max_context=32)
    try:
        over = ask(model, "over", "Hello world", 40)
        assert over.closed.wait(60) and len(over.responses) == 1
        assert "over the server's per-request capacity of 32" in over.error
        assert over.responses[0][0].error.code == TritonError.INVALID_ARG
        nxt = ask(model, "next", "Still there?", 5)
        assert nxt.closed.wait(60) and nxt.text == solo(embedded, "Still there?", 5)
    finally:
        model.finalize()
