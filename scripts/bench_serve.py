"""Serving throughput on the CPU: `qmoe serve --max-batch 1` vs `--max-batch 8`, same model, same run.

Model (random, fp32): real vocabulary 151936, hidden 256, 4 layers, GQA 8/2, 16 experts top-4
(bench_runtime.py's). Each configuration is a `qmoe serve` subprocess; 16 clients stream chat
completions at once (greedy, max_tokens --tokens), twice (the first round warms up). Prints the
completion tokens per second of all clients together for each and the ratio.

    .venv/bin/python scripts/bench_serve.py [--tokens 64] [--clients 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.bench_runtime import export_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"qmoe serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("qmoe serve did not come up") from None
            time.sleep(0.2)


def round_of_clients(url: str, clients: int, tokens: int) -> tuple[int, float]:
    """All clients stream at once; returns (completion tokens of all, seconds from start to last)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    counts = [0] * clients
    barrier = threading.Barrier(clients + 1)

    def one(i: int) -> None:
        barrier.wait()
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": f"request {i}: tell me a story"}],
            max_tokens=tokens, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                counts[i] = chunk.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def throughput(art: Path, max_batch: int, clients: int, tokens: int) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", str(art), "--port", str(port),
                             "--served-model-name", "bench", "--max-batch", str(max_batch), "--max-context", "1024"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_up(url, proc)
        round_of_clients(url, clients, tokens)  # warm-up
        n, seconds = round_of_clients(url, clients, tokens)
        print(f"--max-batch {max_batch}: {n} tokens in {seconds:.2f} s = {n / seconds:.1f} tokens/s")
        return n / seconds
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qmoe-bench-serve-"))
    try:
        _, art = export_model(work)
        gen = art / "generation_config.json"
        gen.write_text(json.dumps({**json.loads(gen.read_text()), "do_sample": False}))  # greedy
        sequential = throughput(art, 1, args.clients, args.tokens)
        batched = throughput(art, 8, args.clients, args.tokens)
        print(f"{args.clients} streaming clients: --max-batch 8 / --max-batch 1 = {batched / sequential:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
