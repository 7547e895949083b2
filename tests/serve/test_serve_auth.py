"""`qmoe serve --api-key`: every request but /health and /metrics needs the bearer token (vLLM's
flag); a missing or wrong one gets OpenAI's 401 body; the official client and `qmoe bench` work
with the key; streams pass through the check untouched."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator

import openai
import pytest

from runtime.bench import run as bench
from runtime.errors import QmoeError

from .test_serve_api import post

KEY = "sk-test-qmoe"
HI: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url(tiny_artifact) -> Iterator[str]:
    import uvicorn

    import runtime
    from runtime.serve import create_app

    app = create_app(runtime.load(tiny_artifact), "m", {"temperature": 0.0}, api_key=KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv.should_exit = True
    thread.join(15)
    sock.close()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_requests_without_the_key_get_openais_401(url) -> None:
    body = {"model": "m", "messages": HI, "max_tokens": 2}
    for path in ("/v1/chat/completions", "/tokenize"):
        status, got = post(url + path, body)
        assert status == 401 and got["error"]["code"] == "invalid_api_key" and "Bearer" in got["error"]["message"]
    assert get(url + "/v1/models")[0] == 401
    assert get(url + "/v1/models", {"Authorization": "Bearer wrong"})[0] == 401
    assert get(url + "/v1/models", {"Authorization": KEY})[0] == 401  # the scheme is part of it
    assert get(url + "/v1/models", {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert get(url + "/health")[0] == 200
    status, text = get(url + "/metrics")
    assert status == 200 and b'qmoe:request_errors_total{model_name="m",status="401"}' in text


def test_the_official_client_and_qmoe_bench_work_with_the_key(url) -> None:
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    reply = good.chat.completions.create(model="m", messages=HI, max_tokens=3)
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       good.chat.completions.create(model="m", messages=HI, max_tokens=3, stream=True))
    assert streamed == reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    s = bench(url, num_prompts=2, input_len=4, output_len=2, api_key=KEY)
    assert s["completed"] == 2 and s["model"] == "m"
    with pytest.raises(QmoeError, match="answered HTTP 401: a valid API key is required"):
        bench(url, num_prompts=1)  # /v1/models answers 401


def test_an_empty_key_is_refused(tiny_artifact) -> None:
    import runtime
    from runtime.serve import create_app

    with pytest.raises(QmoeError, match="the API key is empty"):
        create_app(runtime.load(tiny_artifact), "m", api_key="")


def test_the_scheme_is_case_insensitive(url) -> None:
    # RFC 7235 2.1: the auth-scheme is a case-insensitive token; the key itself is exact
    assert get(url + "/v1/models", {"Authorization": f"bearer {KEY}"})[0] == 200
    assert get(url + "/v1/models", {"Authorization": f"BEARER {KEY}"})[0] == 200
    assert get(url + "/v1/models", {"Authorization": f"Bearer {KEY.upper()}"})[0] == 401


def test_a_key_no_client_can_send_is_refused_at_startup(tiny_artifact) -> None:
    # a non-ASCII key: urllib sends it in latin-1, the OpenAI client (httpx) cannot send it at all,
    # the check compared UTF-8, so every request got a 401; surrounding spaces are stripped in transit
    import runtime
    from runtime.serve import create_app

    engine = runtime.load(tiny_artifact)
    for bad in ("clé-secret", "sk\n", " sk", "sk\x00x"):
        with pytest.raises(QmoeError, match="the API key must be"):
            create_app(engine, "m", api_key=bad)
