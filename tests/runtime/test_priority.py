"""Priority scheduling (vLLM's `priority` with --scheduling-policy priority): waiting requests
start in (priority, arrival) order, running ones are never preempted, outputs are unchanged; the
default policy (fcfs) refuses a priority rather than ignoring it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import runtime
from runtime.batching import BatchScheduler
from runtime.engine import RequestError
from runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return runtime.load(tiny_artifact)


def prompt(seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(0, 150000, 8)]


def test_waiting_requests_start_by_priority_then_arrival(engine):
    s = BatchScheduler(engine, max_slots=1, policy="priority")
    finished: list[str] = []
    p = SamplingParams(max_new_tokens=3, ignore_eos=True)
    results = {}
    for name, prio in (("a", 3), ("b", 5), ("c", 0), ("d", 5), ("e", -1), ("f", 0)):
        results[name] = s.submit(prompt(ord(name)), p, priority=prio,
                                 on_finish=lambda r, n=name: finished.append(n)).result
        if name == "a":
            s.step()  # a is running: a more urgent arrival does not preempt it
    while s.has_work():
        s.step()
    assert finished == ["a", "e", "c", "f", "b", "d"]
    plain = BatchScheduler(engine, max_slots=1)
    for name, r in results.items():
        alone = plain.submit(prompt(ord(name)), p)
        while plain.has_work():
            plain.step()
        assert r.tokens == alone.result.tokens


def test_fcfs_refuses_a_priority(engine):
    s = BatchScheduler(engine, max_slots=1)
    with pytest.raises(RequestError, match="priority needs the scheduling policy 'priority'"):
        s.submit(prompt(1), SamplingParams(max_new_tokens=2), priority=1)
    with pytest.raises(RequestError, match="scheduling policy must be one of fcfs, priority"):
        BatchScheduler(engine, policy="lifo")


def test_the_server_orders_queued_requests_by_priority(engine):
    from starlette.testclient import TestClient

    from runtime.serve import create_app

    app = create_app(engine, "m", {"temperature": 0.0}, max_batch=1, policy="priority")
    done: dict[str, float] = {}
    with TestClient(app) as client:
        def ask(name: str, tokens: int, priority: int) -> None:
            r = client.post("/v1/completions", json={"prompt": "Experts", "max_tokens": tokens, "ignore_eos": True,
                                                     "priority": priority})
            assert r.status_code == 200
            done[name] = time.monotonic()

        first = threading.Thread(target=ask, args=("first", 1500, 0))
        first.start()
        while app.state.service.worker.scheduler.running == 0:  # it holds the only slot
            time.sleep(0.005)
        late = threading.Thread(target=ask, args=("background", 4, 10))
        late.start()
        while app.state.service.worker.scheduler.waiting < 1:
            time.sleep(0.005)
        urgent = threading.Thread(target=ask, args=("urgent", 4, -5))
        urgent.start()
        for t in (first, late, urgent):
            t.join(60)
        fcfs = create_app(engine, "m", {"temperature": 0.0})
        with TestClient(fcfs) as plain:
            r = plain.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "priority": 3})
            assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    assert done["first"] < done["urgent"] < done["background"]
