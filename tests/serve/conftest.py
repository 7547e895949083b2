"""A live `qmoe serve` app on the tiny artifact (tests/conftest.py's tiny_artifact): uvicorn in a
background thread on a free port."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def embedded(tiny_artifact: Path):
    """The reference: the same artifact run in-process through the embedded API."""
    import runtime

    return runtime.load(tiny_artifact)


@dataclass
class LiveServer:
    url: str
    app: object
    thread: threading.Thread


MODEL = "tiny-moe"


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[LiveServer]:
    import uvicorn

    import runtime
    from runtime.sampling import generation_defaults
    from runtime.serve import create_app

    app = create_app(runtime.load(tiny_artifact), MODEL, generation_defaults(tiny_artifact))
    # Bind first and hand uvicorn the socket: the port is ours, no race with other processes.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield LiveServer(f"http://127.0.0.1:{port}", app, thread)
    uv.should_exit = True
    thread.join(15)
    sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"
    workers = [t for t in threading.enumerate() if t.name == "qmoe-engine-worker"]
    assert not workers, "the engine worker outlived the server"


@pytest.fixture
def client(server: LiveServer):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
