"""Prometheus metrics of `qmoe serve` (GET /metrics), named and shaped like vLLM's (prefix qmoe:
instead of vllm:) so its dashboards and alerts carry over.

Per request (one choice of `n` counts as one): time to first token (arrival -> first sampled
token), inter-token latency, end-to-end latency, prompt and generated tokens, and how it finished
(stop / length / cancelled / error). Gauges read the scheduler when scraped: requests running
(holding a slot) and waiting (queued for one). A registry per server, so several apps in one
process (tests) keep their own counts.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self, model_name: str, running: Callable[[], int], waiting: Callable[[], int],
                 prefix: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0),
                 speculation: Callable[[], tuple[int, int]] = lambda: (0, 0),
                 cache_usage: Callable[[], float] = lambda: 0.0) -> None:
        """prefix: the scheduler's (prompt tokens admitted, of those reused from cache, of those
        copied from a running request); speculation: its (draft tokens fed, of those accepted);
        cache_usage: the fraction of KV cache rows running requests hold; all read when scraped."""
        self.registry = CollectorRegistry()
        r, label = self.registry, ["model_name"]
        self.model_name = model_name
        self.requests = Counter("qmoe:request_success", "Requests finished, by reason.", label + ["finished_reason"],
                                registry=r)
        self.prompt_tokens = Counter("qmoe:prompt_tokens", "Prompt tokens of started requests.", label, registry=r)
        self.generation_tokens = Counter("qmoe:generation_tokens", "Tokens generated.", label, registry=r)
        self.ttft = Histogram("qmoe:time_to_first_token_seconds", "Arrival to first sampled token.", label,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qmoe:inter_token_latency_seconds", "Time between two tokens of a request.", label,
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("qmoe:e2e_request_latency_seconds", "Arrival to the last token.", label,
                             buckets=LATENCY_BUCKETS, registry=r)
        # a request's life, as vLLM splits it: queue (arrival -> a batch slot), prefill (slot -> first
        # token), decode (first -> last token), inference (slot -> last token)
        self.queue_time, self.prefill_time, self.decode_time, self.inference_time = (
            Histogram(f"qmoe:request_{name}_time_seconds", doc, label, buckets=LATENCY_BUCKETS, registry=r)
            for name, doc in (("queue", "Arrival to a batch slot."), ("prefill", "Batch slot to first token."),
                              ("decode", "First token to last token."), ("inference", "Batch slot to last token.")))
        Gauge("qmoe:kv_cache_usage_perc", "Fraction of the KV cache's rows running requests hold.", label,
              registry=r).labels(model_name).set_function(cache_usage)
        self.errors = Counter("qmoe:request_errors", "Requests refused or failed, by HTTP status.",
                              label + ["status"], registry=r)
        Gauge("qmoe:num_requests_running", "Requests holding a batch slot.", label,
              registry=r).labels(model_name).set_function(running)
        Gauge("qmoe:num_requests_waiting", "Requests queued for a slot.", label,
              registry=r).labels(model_name).set_function(waiting)
        r.register(_PrefixCollector(model_name, prefix, speculation))

    def request(self, prompt_tokens: int, arrived: float | None = None) -> "RequestTimer":
        """arrived: time.monotonic() of the request's arrival (default: now)."""
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        return RequestTimer(self, arrived)

    def error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """One request's clock: token() at each sampled token, finished() once (any thread)."""

    def __init__(self, metrics: Metrics, arrived: float | None = None) -> None:
        self.metrics, self.start = metrics, time.monotonic() if arrived is None else arrived
        self.last: float | None = None
        self.first: float | None = None
        self.step: int | None = None

    def token(self, _token: int = 0, step: int | None = None) -> None:
        """One sampled token; `step`: the scheduler step that produced it. Tokens of one step (a
        speculative step's kept drafts) arrive together: one inter-token latency per step, as vLLM
        observes it, and each token counted."""
        now, m = time.monotonic(), self.metrics
        if step is None or step != self.step:
            (m.ttft if self.last is None else m.itl).labels(m.model_name).observe(now - (self.last or self.start))
            self.last, self.step = now, step
            self.first = self.first or now
        m.generation_tokens.labels(m.model_name).inc()

    def finished(self, reason: str, admitted: float | None = None) -> None:
        """reason: stop | length | cancelled (a failed request is counted by its response's status);
        admitted: when it got a batch slot (None: never, cancelled while queued)."""
        m, now = self.metrics, time.monotonic()
        m.requests.labels(m.model_name, reason).inc()
        m.e2e.labels(m.model_name).observe(now - self.start)
        if admitted is not None:
            m.queue_time.labels(m.model_name).observe(admitted - self.start)
            m.inference_time.labels(m.model_name).observe(now - admitted)
            if self.first is not None and self.last is not None:
                m.prefill_time.labels(m.model_name).observe(self.first - admitted)
                m.decode_time.labels(m.model_name).observe(self.last - self.first)


class _PrefixCollector(Collector):
    """vLLM's prefix_cache_queries / prefix_cache_hits (in tokens), plus the hits copied from a
    running request, and spec_decode_num_draft_tokens / _accepted_tokens, from the scheduler's own
    counts."""

    def __init__(self, model_name: str, read: Callable[[], tuple[int, int, int]],
                 speculation: Callable[[], tuple[int, int]]) -> None:
        self.model_name, self.read, self.speculation = model_name, read, speculation

    def collect(self):  # type: ignore[no-untyped-def]
        queries, hits, copied = self.read()
        drafts, accepted = self.speculation()
        for name, doc, value in (("qmoe:prefix_cache_queries", "Prompt tokens admitted to a slot.", queries),
                                 ("qmoe:prefix_cache_hits", "Of those, served from kept or copied K/V.", hits),
                                 ("qmoe:prefix_cache_copied", "Of the hits, copied from a running request.", copied),
                                 ("qmoe:spec_decode_num_draft_tokens", "Speculative (n-gram) tokens fed.", drafts),
                                 ("qmoe:spec_decode_num_accepted_tokens", "Of those, kept by verification.",
                                  accepted)):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
