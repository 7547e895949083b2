"""`qmoe bench` against scripted servers (the standard library's http.server): what other
servers send (no usage, in-band errors, stalls) and how the command behaves (Ctrl-C, --save-result)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pytest

from runtime.bench import BenchError, run


def _serve(stream: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            body = json.dumps({"data": [{"id": "fake"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            stream(self)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _events(h: BaseHTTPRequestHandler, *events: object) -> None:
    for e in events:
        h.wfile.write(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n")
        h.wfile.flush()


def test_an_in_band_error_that_is_a_string_or_not_an_object_is_reported() -> None:
    for bad in ({"error": "the engine died"}, ["not", "an", "object"]):
        for url in _serve(lambda h: _events(h, {"choices": [{"text": "a"}]}, bad)):
            s = run(url, num_prompts=2, input_len=2, output_len=2)
            assert s["failed"] == 2 and s["first_error"], s["first_error"]
            assert all(r["error"] for r in s["requests"])


def test_a_server_without_usage_still_counts_tokens() -> None:
    # include_usage is a request option a server may not honour: count the streamed chunks then
    chunks = [{"choices": [{"text": t}]} for t in ("a", "b", "c")]
    for url in _serve(lambda h: _events(h, *chunks, b"[DONE]")):
        s = run(url, num_prompts=2, input_len=5, output_len=3)
    assert s["completed"] == 2 and s["output_tokens"] == 6 and s["prompt_tokens"] == 10
    assert s["output_throughput"] > 0 and not math.isnan(s["tpot_s"]["mean"])


def test_save_result_is_strict_json(tmp_path: Path) -> None:
    def fail(h: BaseHTTPRequestHandler) -> None:
        _events(h, {"error": {"message": "nope"}})

    for url in _serve(fail):
        out = tmp_path / "r.json"
        r = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", url, "--num-prompts", "1",
                            "--save-result", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    def refuse(c: str) -> None:
        raise ValueError(f"not JSON: {c}")
    saved = json.loads(out.read_text(), parse_constant=refuse)  # no NaN / Infinity
    assert saved["request_rate"] == "inf" and saved["ttft_s"]["mean"] is None


def test_ctrl_c_stops_at_once_with_requests_in_flight() -> None:
    def stall(h: BaseHTTPRequestHandler) -> None:
        _events(h, {"choices": [{"text": "a"}]})
        time.sleep(30)

    for url in _serve(stall):
        p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "bench", url, "--num-prompts", "4",
                              "--concurrency", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)  # imports, /v1/models, two requests stalled mid-stream
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            pytest.fail("qmoe bench kept waiting for the requests in flight after Ctrl-C")
    assert p.returncode != 0


def test_a_refused_key_is_named_not_an_unreachable_server() -> None:
    from http.server import BaseHTTPRequestHandler as B

    class Deny(B):
        def log_message(self, *a) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps({"error": {"message": "a valid API key is required"}}).encode()
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(BenchError, match="HTTP 401: a valid API key is required") as e:
            run(f"http://127.0.0.1:{httpd.server_address[1]}", num_prompts=1)
        assert "is the server up" not in str(e.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_poisson_arrivals_keep_their_schedule_behind_the_concurrency_cap(monkeypatch) -> None:
    # vLLM draws the arrival times up front and an arrival waits for a free slot; one slow request
    # must not push every later arrival back by its wait (arrivals already due go as a slot frees)
    import random

    import runtime.bench as bench

    calls: list[float] = []

    def one(url, body, timeout, api_key=None):  # type: ignore[no-untyped-def]
        calls.append(time.perf_counter())
        time.sleep(2.0 if len(calls) == 1 else 0.01)
        return bench.RequestResult(ok=True, ttft=0.005, e2e=0.01, output_tokens=2)

    monkeypatch.setattr(bench, "one_request", one)
    s = run("http://unused", model="m", num_prompts=8, input_len=4, concurrency=1, request_rate=4.0, seed=0)
    rng = random.Random(0)
    [[rng.randrange(1000, 100000) for _ in range(4)] for _ in range(8)]  # the prompts come first
    gaps = [rng.expovariate(4.0) for _ in range(8)]
    assert sum(gaps[1:]) > 0.8  # the seeded schedule: the slow request holds back several arrivals
    assert s["duration_s"] < max(sum(gaps), gaps[0] + 2.0) + 0.4, (s["duration_s"], gaps)


def test_a_server_dying_mid_stream_is_a_failure_with_its_reason() -> None:
    # chunked transfer cut off: http.client raises IncompleteRead, which is neither OSError nor ValueError
    class Chunked(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            payload = b"data: " + json.dumps({"choices": [{"text": "a"}]}).encode() + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload) + b"40\r\ndata: {")  # then gone
            self.wfile.flush()
            self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        s = run(f"http://127.0.0.1:{httpd.server_address[1]}", model="m", num_prompts=2, input_len=2, output_len=2)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert s["failed"] == 2 and "IncompleteRead" in s["first_error"], s["first_error"]
