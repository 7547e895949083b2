"""Triton python-backend model that serves a qmoe artifact; `qmoe triton` copies this file verbatim
to <repository>/<name>/1/model.py. Everything it needs to know comes from config.pbtxt.

    execute(requests) -> [validate + tokenize each: a bad one gets its error response now]
                      -> queue -> [worker thread: continuous-batching scheduler steps]
                      -> text_delta / text_output responses (or, not streaming, none) -> final response (the rest of
                         the text, finish_reason, token counts, COMPLETE_FINAL flag)

The model is decoupled: execute() returns at once, so many requests are in flight. One worker
thread per instance owns the engine (not thread-safe) and a continuous-batching scheduler
(runtime/batching.py, as `qmoe serve` uses it): up to `max_batch` requests share each step, a new
one joins as soon as a slot is free (in-flight batching), and each output equals the request run
alone up to floating-point batch variance. Optional n-gram speculative decoding
(`speculative_config`). Instances are separate stub processes, each with its own engine.

The stub imports `runtime` (qmoe) from its own Python: the interpreter found as `python3` on PATH,
or the environment named by the EXECUTION_ENV_PATH parameter (see runtime/triton/README.md).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]  # exists inside the stub only

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
POLL_SECONDS = 0.05  # how often the worker asks whether running requests' clients cancelled them


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        try:
            import runtime
            from runtime.triton import protocol
        except ImportError as e:
            raise RuntimeError(
                f"qmoe is not importable by the Python backend stub ({e}); sys.prefix is {sys.prefix}. Install "
                "qmoe in that Python, or point the EXECUTION_ENV_PATH parameter (or the first python3 on the "
                "server's PATH) at an environment that has it"
            ) from None
        check_numpy()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        artifact = version_dir / params["artifact"]  # an absolute path replaces version_dir
        device = "cpu"
        if args["model_instance_kind"] == "GPU":
            device = "cuda"
            select_gpu(int(args["model_instance_device_id"]))
        self.protocol = protocol
        self.default_max_tokens = int(params.get("default_max_tokens", protocol.DEFAULT_MAX_TOKENS))
        self.max_batch = int(params.get("max_batch", protocol.DEFAULT_MAX_BATCH))
        speculation = None
        if params.get("speculative_config"):
            from runtime.speculative import NgramSpeculation

            speculation = NgramSpeculation.from_config(params["speculative_config"])
        self.engine = runtime.load(artifact, device=device)
        from runtime.batching import BatchScheduler

        # the capacity a request may use is the protocol's context check; the cache holds as much
        capacity = int(params["max_context"]) if params.get("max_context") else None
        budget = int(params["max_num_batched_tokens"]) if params.get("max_num_batched_tokens") else None
        self.scheduler = BatchScheduler(self.engine, max_slots=self.max_batch, capacity=capacity, speculation=speculation,
                                        max_step_tokens=budget)
        self.shared = 1  # the most requests one step has run so far (logged when it grows)
        self.name = args["model_instance_name"]
        self.jobs: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self.serve, name=f"{self.name}-generate", daemon=True)
        self.worker.start()
        pb_utils.Logger.log_info(f"{self.name}: serving {artifact} on {device}")

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for spec in self.protocol.INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                    if tensor is not None:
                        inputs[spec.name] = tensor.as_numpy().reshape(-1).tolist()
                job = self.protocol.parse_request(inputs, self.engine, self.default_max_tokens,
                                                  request_parameters(request))
            except Exception as e:  # noqa: BLE001  (a bad request must not take the model down)
                send_error(sender, e)
                continue
            self.jobs.put((request.request_id(), job, sender))
        return None

    def serve(self) -> None:
        scheduler = self.scheduler
        running: dict = {}  # Generation -> (request id, sender)
        polled = 0.0
        while True:
            # Between steps: take every job that arrived; wait for one only when nothing runs.
            try:
                item = self.jobs.get(block=not scheduler.has_work())
            except queue.Empty:
                item = None
            else:
                if item is None:
                    for gen, (_, sender) in running.items():
                        gen.cancelled.set()
                        self.report(sender, RuntimeError("the model is shutting down"), pb_utils.TritonError.UNAVAILABLE)
                    return
                self.submit(*item, running)
                continue
            now = time.monotonic()
            if now - polled >= POLL_SECONDS:  # each is_cancelled() is a round trip to the server process
                polled = now
                for gen, (_, sender) in running.items():
                    if cancelled(sender):  # the client is gone: the scheduler frees its slot
                        gen.cancelled.set()
            try:
                scheduler.step()
            except Exception as e:  # noqa: BLE001  (each running request got it through on_error)
                pb_utils.Logger.log_error(f"{self.name}: generation step failed: {type(e).__name__}: {e}")
            if scheduler.max_batch > self.shared:
                self.shared = scheduler.max_batch
                pb_utils.Logger.log_info(f"{self.name}: {self.shared} requests shared a step")

    def submit(self, request_id: str, job, sender, running: dict) -> None:
        """Hands one request to the scheduler; its callbacks stream the responses."""
        holder: list = []

        def send(response=None, flags: int = 0) -> None:
            # The callbacks run inside scheduler.step(): a send that raises (the client's stream is
            # gone, the stub's shared memory is full) must not end the requests sharing the step, nor
            # the worker thread. This request stops instead: the next step drops it.
            try:
                if response is None:
                    sender.send(flags=flags)
                else:
                    sender.send(response, flags=flags)
            except Exception as e:  # noqa: BLE001
                pb_utils.Logger.log_error(f"{self.name}: request {request_id!r}: could not send a response "
                                          f"({type(e).__name__}: {e}); it stops")
                if holder:
                    holder[0].cancelled.set()

        if cancelled(sender):  # cancelled while queued: skip the prefill too
            send(flags=FINAL)
            return

        pending: list = []  # TokenLogprobs sampled since the last response (parameters.logprobs)
        unsent: list = []  # text not sent yet: the whole reply when the request does not stream
        prefix = [job.prefix]  # text_output's start, sent with the first response

        def logprobs() -> list:
            """The `logprobs` output for the tokens since the last response ([] if none were asked)."""
            if not pending:
                return []
            out = [string("logprobs", self.protocol.render_logprobs(pending, self.engine.tokenizer,
                                                                     job.sampling.skip_special_tokens))]
            pending.clear()
            return out

        def texts(text: str) -> list:
            head, prefix[0] = prefix[0], ""
            return [string("text_delta", text), string("text_output", head + text)]

        def delta(text: str) -> None:
            if not job.stream:
                unsent.append(text)
            elif not holder[0].cancelled.is_set() and not cancelled(sender):
                send(pb_utils.InferenceResponse(output_tensors=[*texts(text), *logprobs()]))

        def finished(result) -> None:
            running.pop(holder[0], None)
            if result.finish_reason == "cancelled":
                pb_utils.Logger.log_info(f"{self.name}: request {request_id!r} cancelled after {len(result.tokens)} "
                                         "tokens")
                send(flags=FINAL)  # the client is gone: close the request, nothing more to say
                return
            send(pb_utils.InferenceResponse(output_tensors=[
                *texts("".join(unsent)),
                string("finish_reason", result.finish_reason),
                int32("prompt_tokens", len(job.prompt_ids)),
                int32("completion_tokens", len(result.tokens)),
                *logprobs(),
            ]), flags=FINAL)

        def failed(error: BaseException) -> None:
            running.pop(holder[0], None)
            pb_utils.Logger.log_error(f"{self.name}: request {request_id!r} failed: {type(error).__name__}: {error}")
            self.report(sender, error)

        try:
            gen = self.scheduler.submit(list(job.prompt_ids), job.sampling, on_delta=delta, on_finish=finished,
                                        on_error=failed, on_logprob=pending.append)
        except Exception as e:  # noqa: BLE001  (checked at parse time; report it, keep serving)
            self.report(sender, e)
            return
        holder.append(gen)
        running[gen] = (request_id, sender)

    @staticmethod
    def report(sender, error: BaseException, code=None) -> None:
        try:
            send_error(sender, error, code)
        except Exception as e2:  # noqa: BLE001  (the request may be closed already; the worker must live)
            pb_utils.Logger.log_error(f"could not report an error to its request: {e2}")

    def finalize(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=30)


def request_parameters(request) -> dict:
    """The request's own Triton parameters (the generate endpoint's "parameters" object)."""
    raw = request.parameters()
    params = json.loads(raw) if raw else {}
    return params if isinstance(params, dict) else {}


def cancelled(sender) -> bool:
    """Whether the client cancelled the request; a sender that cannot tell is gone too."""
    try:
        return bool(sender.is_cancelled())
    except Exception:  # noqa: BLE001
        return True


def send_error(sender, error: Exception, code=None) -> None:
    from runtime.errors import QmoeError

    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if code is None:
        is_client_error = isinstance(error, QmoeError) and isinstance(error, ValueError)
        code = pb_utils.TritonError.INVALID_ARG if is_client_error else pb_utils.TritonError.INTERNAL
        if not isinstance(error, QmoeError):
            message = f"{type(error).__name__}: {message}"
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)


def string(name: str, text: str):
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def int32(name: str, value: int):
    return pb_utils.Tensor(name, np.array([value], dtype=np.int32))


def check_numpy() -> None:
    # The stub of Triton 2.51 (the one in nvidia-pytriton 0.7.0) was built for numpy 1.x: under numpy 2
    # it loads fine, then misreads the first string input and dies, so refuse to load instead.
    if int(np.__version__.split(".")[0]) >= 2 and os.environ.get("QMOE_TRITON_ALLOW_NUMPY2") != "1":
        raise RuntimeError(
            f"numpy {np.__version__} in {sys.prefix}: the Python backend stub of Triton 24.10 (2.51) and older "
            "misreads input tensors under numpy 2; install numpy<2 there (pip install 'numpy<2'), or set "
            "QMOE_TRITON_ALLOW_NUMPY2=1 for a stub built for numpy 2"
        )


def select_gpu(device_id: int) -> None:
    # Each instance is its own process and the runtime always uses CUDA device 0, so narrow the
    # visible devices to this instance's one before the runtime first touches CUDA.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(device_id + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[device_id] if device_id < len(ids) else str(device_id)
