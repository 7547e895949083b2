"""`qmoe bench` against a live `qmoe serve` (tests/serve/conftest.py's server): every request
completes with exactly the asked lengths (the server's usage), the timings are consistent with
each other and with the wall clock, and failures are counted and reported in one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.bench import BenchError, report, run

from .conftest import MODEL


def test_every_request_completes_with_the_asked_lengths(server) -> None:
    t0 = time.perf_counter()
    s = run(server.url, num_prompts=6, input_len=12, output_len=5, concurrency=3, seed=1)
    wall = time.perf_counter() - t0
    assert s["model"] == MODEL and s["completed"] == 6 and s["failed"] == 0
    assert s["prompt_tokens"] == 6 * 12 and s["output_tokens"] == 6 * 5  # eos ignored: full length
    assert 0 < s["duration_s"] <= wall
    assert s["output_throughput"] == pytest.approx(30 / s["duration_s"])
    for r in s["requests"]:
        assert r["ok"] and 0 < r["ttft"] <= r["e2e"]
        assert r["ttft"] + sum(r["itl"]) <= r["e2e"] + 1e-6  # the chunks arrive inside the request
        assert len(r["itl"]) <= 4  # at most one gap per token after the first
    assert s["ttft_s"]["median"] <= s["e2e_s"]["median"]
    assert "Output token throughput (tok/s):" in report(s) and "P99 ITL (ms):" in report(s)


def test_poisson_arrivals_spread_the_requests(server) -> None:
    s = run(server.url, model=MODEL, num_prompts=4, input_len=4, output_len=2, request_rate=2.0, seed=3)
    assert s["completed"] == 4
    assert s["duration_s"] > 0.3  # 4 arrivals at 2/s: ~1.5 s of gaps expected (seeded)


def test_failed_requests_are_counted_and_the_server_is_named(server) -> None:
    s = run(server.url, model="no-such-model", num_prompts=2, input_len=4, output_len=2)
    assert s["completed"] == 0 and s["failed"] == 2 and "HTTP 404" in s["first_error"]
    assert math.isnan(s["ttft_s"]["mean"])
    with pytest.raises(BenchError, match="cannot reach http://127.0.0.1:9/v1/models"):
        run("http://127.0.0.1:9", num_prompts=1)
    with pytest.raises(BenchError, match="request_rate must be > 0"):
        run(server.url, request_rate=0)


def test_the_command_prints_the_table_saves_json_and_exits_1_on_failures(server, tmp_path: Path) -> None:
    qmoe = [sys.executable, "-m", "runtime.cli", "bench", server.url, "--num-prompts", "2", "--input-len", "4",
            "--output-len", "3"]
    out = tmp_path / "r.json"
    r = subprocess.run([*qmoe, "--save-result", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Successful requests:" in r.stdout and json.loads(out.read_text())["output_tokens"] == 6
    r = subprocess.run([*qmoe, "--model", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "2 of 2 requests failed" in r.stderr


def test_the_url_may_name_the_v1_base_or_an_endpoint(server) -> None:
    for url in (server.url + "/", server.url + "/v1", server.url + "/v1/", server.url + "/v1/completions",
                server.url + "/v1/chat/completions"):
        s = run(url, num_prompts=1, input_len=3, output_len=2)
        assert s["completed"] == 1 and s["base_url"] == server.url + "/v1", url
