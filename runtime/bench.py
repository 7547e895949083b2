"""`qmoe bench`: load an OpenAI-compatible server (qmoe serve, vLLM, trtllm-serve, ...) with
streamed completions and report what its users feel, as `vllm bench serve` does.

    N requests (random token-id prompts of --input-len, --output-len tokens each, eos ignored)
    -> sent at --request-rate (Poisson arrival times drawn up front, as vLLM's; inf: all at once), at
       most --concurrency in flight (an arrival waits for a slot; later arrivals keep their times)
    -> per request: time to first token, the gaps between streamed chunks, end-to-end latency,
       completion tokens (from the server's usage; without one, a token per streamed text chunk)
    -> throughput (requests/s, output and total tokens/s) and mean / median / p99 of TTFT, TPOT
       ((e2e - ttft) / (output tokens - 1)), ITL (chunk gaps) and E2E

Only the standard library talks to the server (one thread per request in flight), so it runs
wherever qmoe's runtime does. Prompts are token ids (/v1/completions takes them in vLLM and qmoe),
so the input length is exact; `ignore_eos` (vLLM's field) makes every request generate its full
--output-len. A request that fails is counted and its first error shown; the rest go on.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import QmoeError


class BenchError(QmoeError):
    """The benchmark cannot run (bad option, server unreachable); one line."""


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first streamed text
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "median": math.nan, "p99": math.nan}
    s = sorted(values)

    def pct(q: float) -> float:  # linear interpolation, as numpy's default
        pos = (len(s) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"mean": sum(s) / len(s), "median": pct(0.5), "p99": pct(0.99)}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def one_request(url: str, body: dict[str, Any], timeout: float, api_key: str | None = None) -> RequestResult:
    """Sends one streamed completion and times its chunks."""
    out = RequestResult()
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=_headers(api_key))
    start = time.perf_counter()
    last = None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if not isinstance(chunk, dict):
                    out.error = f"the stream sent {line[6:66]!r}, not a JSON object"
                    return out
                if "error" in chunk:
                    error = chunk["error"]
                    out.error = str(error.get("message", error) if isinstance(error, dict) else error)[:200]
                    return out
                if chunk.get("usage"):
                    out.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    out.output_tokens = chunk["usage"].get("completion_tokens", 0)
                if any(isinstance(c, dict) and c.get("text") for c in chunk.get("choices") or []):
                    now = time.perf_counter()
                    if last is None:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error", {}).get("message", "")
        except (ValueError, AttributeError):
            detail = ""
        out.error = f"HTTP {e.code}: {detail or e.reason}"[:200]
        return out
    except (OSError, ValueError) as e:  # connection refused or reset, timeout, bad JSON
        out.error = f"{type(e).__name__}: {e}"[:200]
        return out
    out.e2e = time.perf_counter() - start
    out.ok = last is not None
    if not out.ok:
        out.error = "the stream carried no text"
    elif not out.output_tokens:  # no usage (a server that ignores include_usage): one token per text chunk
        out.output_tokens = len(out.itl) + 1
    return out


def run(base_url: str, model: str | None = None, num_prompts: int = 64, input_len: int = 256, output_len: int = 64,
        concurrency: int = 8, request_rate: float = math.inf, seed: int = 0, timeout: float = 600.0,
        vocab: tuple[int, int] = (1000, 100000), api_key: str | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the summary (see the module docstring) with per-request results."""
    for name, value, low in (("num_prompts", num_prompts, 1), ("input_len", input_len, 1),
                             ("output_len", output_len, 1), ("concurrency", concurrency, 1)):
        if not isinstance(value, int) or value < low:
            raise BenchError(f"{name} must be an integer >= {low}, got {value!r}")
    if not request_rate > 0:
        raise BenchError(f"request_rate must be > 0 (inf: all at once), got {request_rate}")
    base = base_url.rstrip("/")
    for endpoint in ("/chat/completions", "/completions"):  # the endpoint's URL given: its /v1 base
        if base.endswith("/v1" + endpoint):
            base = base[: -len(endpoint)]
    if not base.endswith("/v1"):
        base += "/v1"
    if model is None:
        model = _first_model(base, timeout, api_key)
    rng = random.Random(seed)
    prompts = [[rng.randrange(*vocab) for _ in range(input_len)] for _ in range(num_prompts)]
    gaps = [0.0 if math.isinf(request_rate) else rng.expovariate(request_rate) for _ in range(num_prompts)]
    url = base + "/completions"
    results: list[RequestResult] = [RequestResult() for _ in prompts]
    slots = threading.Semaphore(concurrency)

    def send(i: int) -> None:
        try:
            results[i] = one_request(url, {"model": model, "prompt": prompts[i], "max_tokens": output_len,
                                           "stream": True, "stream_options": {"include_usage": True},
                                           "ignore_eos": True, "temperature": 0.0}, timeout, api_key)
            if results[i].ok and not results[i].prompt_tokens:  # no usage: the prompt's length is exact
                results[i].prompt_tokens = input_len
        except Exception as e:  # noqa: BLE001  (whatever the server sent: this request failed, the rest go on)
            results[i] = RequestResult(error=f"{type(e).__name__}: {e}"[:200])
        finally:
            slots.release()

    # Arrival times are drawn up front (vLLM's): a request that waits for a slot does not delay the
    # arrivals after it. Daemon threads: Ctrl-C ends the run at once, not after the requests in flight.
    threads: list[threading.Thread] = []
    start = time.perf_counter()
    due = start
    for i, gap in enumerate(gaps):
        due += gap
        time.sleep(max(0.0, due - time.perf_counter()))
        slots.acquire()
        threads.append(threading.Thread(target=send, args=(i,), name=f"qmoe-bench-{i}", daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "model": model, "base_url": base, "num_prompts": num_prompts, "input_len": input_len,
        "output_len": output_len, "concurrency": concurrency, "request_rate": request_rate,
        "completed": len(done), "failed": len(results) - len(done),
        "first_error": next((r.error for r in results if not r.ok), ""),
        "duration_s": duration, "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration, "total_token_throughput": (in_tokens + out_tokens) / duration,
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "ttft_s": _percentiles([r.ttft for r in done]), "tpot_s": _percentiles(tpot),
        "itl_s": _percentiles([g for r in done for g in r.itl]), "e2e_s": _percentiles([r.e2e for r in done]),
        "requests": [asdict(r) for r in results],
    }


def _first_model(base: str, timeout: float, api_key: str | None = None) -> str:
    try:
        req = urllib.request.Request(base + "/models", headers=_headers(api_key))
        with urllib.request.urlopen(req, timeout=min(timeout, 30)) as r:
            data = json.loads(r.read()).get("data") or []
    except urllib.error.HTTPError as e:  # it answered: say what (a 401 wants --api-key)
        try:
            detail = json.loads(e.read()).get("error", {}).get("message", "")
        except (ValueError, AttributeError, OSError):
            detail = ""
        raise BenchError(f"{base}/models answered HTTP {e.code}: {detail or e.reason}"[:300]) from None
    except (OSError, ValueError, AttributeError) as e:
        raise BenchError(f"cannot reach {base}/models ({type(e).__name__}: {e}); is the server up?") from None
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise BenchError(f"{base}/models lists no model; pass --model")
    return str(data[0]["id"])


def to_json(summary: dict[str, Any]) -> str:
    """The summary as strict JSON (jq, JavaScript): an infinite request rate is "inf" (vLLM's), a
    statistic of no requests null, never the NaN / Infinity that json.dumps writes by default."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return "inf" if v == math.inf else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(summary), indent=1, allow_nan=False)


def report(summary: dict[str, Any]) -> str:
    """The summary as a table, vLLM bench style (times in ms)."""
    s = summary
    lines = [
        f"{'Successful requests:':40s}{s['completed']}",
        f"{'Failed requests:':40s}{s['failed']}" + (f"  (first: {s['first_error']})" if s["failed"] else ""),
        f"{'Benchmark duration (s):':40s}{s['duration_s']:.2f}",
        f"{'Total input tokens:':40s}{s['prompt_tokens']}",
        f"{'Total generated tokens:':40s}{s['output_tokens']}",
        f"{'Request throughput (req/s):':40s}{s['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s):':40s}{s['output_throughput']:.2f}",
        f"{'Total token throughput (tok/s):':40s}{s['total_token_throughput']:.2f}",
    ]
    for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E latency")):
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name} (ms):':40s}{s[key][stat] * 1e3:.2f}")
    return "\n".join(lines)
