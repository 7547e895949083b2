"""`qmoe serve` as a user runs it: a subprocess on a free port, stopped with Ctrl-C."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai

from runtime.sampling import SamplingParams

QMOE = [sys.executable, "-m", "runtime.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_artifact_is_one_line_and_exit_1(tmp_path: Path) -> None:
    r = subprocess.run([*QMOE, "serve", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "qmoe export" in r.stderr


def test_serve_answers_then_ctrl_c_ends_streams_and_exits(tiny_artifact: Path, embedded) -> None:
    port = free_port()
    proc = subprocess.Popen([*QMOE, "serve", str(tiny_artifact), "--port", str(port), "--served-model-name", "moe"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                break
            except OSError:
                assert time.monotonic() < deadline, "qmoe serve did not come up"
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["moe"]
        messages: Any = [{"role": "user", "content": "hi"}]
        reply = client.chat.completions.create(model="moe", messages=messages, max_tokens=6)
        assert reply.choices[0].message.content == embedded.chat(messages, SamplingParams(max_new_tokens=6))

        # A stream that would run for a minute: Ctrl-C ends it at once, in-band, and the server exits.
        body = json.dumps({"prompt": "hi", "max_tokens": 20000, "stream": True}).encode()
        stream = urllib.request.urlopen(urllib.request.Request(f"{url}/v1/completions", data=body), timeout=30)
        assert stream.readline().startswith(b"data: ")
        t0 = time.monotonic()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    rest = stream.read().decode()
    assert time.monotonic() - t0 < 5
    assert '"the server is shutting down"' in rest and rest.endswith("data: [DONE]\n\n")
    assert proc.returncode == 0, out
    assert f"127.0.0.1:{port}" in out and "Traceback" not in out and "ERROR" not in out


def test_a_bad_chat_template_is_one_line_and_exit_1(tmp_path: Path, tiny_artifact: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}", encoding="utf-8")
    for value, message in ((str(tmp_path / "nope.jinja"), "cannot read it"), (str(broken), "does not compile"),
                           ("{{ messages", "does not compile")):
        r = subprocess.run([*QMOE, "serve", str(tiny_artifact), "--chat-template", value, "--port", str(free_port())],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --chat-template") and message in r.stderr


def test_read_chat_template_takes_a_file_or_the_template(tmp_path: Path) -> None:
    from runtime.serve import read_chat_template

    path = tmp_path / "t.jinja"
    path.write_text("{{ tools }}{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    assert read_chat_template(str(path)) == path.read_text(encoding="utf-8")
    assert read_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"
