"""The scheduler's token budget per step (--max-num-batched-tokens) on vs off, same model, same
run: 3 requests are decoding when a long prompt arrives; without a budget its prefill runs in
steps of up to a prefill chunk (2048 tokens), and every running stream waits for each of them; with
one, decoding tokens go first and the prompt fills the rest of each step. Printed: the running
streams' longest and median gap between tokens, the long request's time to first token, and the
whole run's time. Outputs are checked equal with and without a budget.

Model: bench_runtime.py's (random fp32, real vocabulary, hidden 256, 4 layers, 16 experts top-4),
2 threads, 4 slots; greedy; best of --repeat runs of each case (by longest gap).

    .venv/bin/python scripts/bench_budget.py [--prompt 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.bench_runtime import export_model  # noqa: E402


def run(engine, long_prompt: list[int], budget: int | None):
    from runtime.batching import BatchScheduler
    from runtime.sampling import SamplingParams

    rng = np.random.default_rng(1)
    sched = BatchScheduler(engine, max_slots=4, capacity=len(long_prompt) + 64, max_step_tokens=budget)
    times: list[list[float]] = [[] for _ in range(3)]
    streams = []
    for i in range(3):
        gen = sched.submit([int(x) for x in rng.integers(0, 150000, 16)],
                           SamplingParams(max_new_tokens=48, ignore_eos=True))
        gen.on_token = lambda _t, i=i: times[i].append(time.perf_counter())
        streams.append(gen)
    for _ in range(8):  # the streams are decoding
        sched.step()
    arrived = time.perf_counter()
    first: list[float] = []
    long = sched.submit(long_prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    long.on_token = lambda _t: first.append(time.perf_counter())
    while sched.has_work():
        sched.step()
    gaps = np.concatenate([np.diff([t for t in ts if t >= arrived]) for ts in times])
    tokens = [g.result.tokens for g in streams + [long]]
    return float(gaps.max()), float(np.median(gaps)), first[0] - arrived, time.perf_counter() - arrived, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=4096, help="tokens of the prompt that arrives")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import runtime

    work = Path(tempfile.mkdtemp(prefix="qmoe-bench-budget-"))
    try:
        engine = runtime.load(export_model(work, max_position_embeddings=8192)[1], threads=2)
        long_prompt = [int(x) for x in np.random.default_rng(0).integers(0, 150000, args.prompt)]
        print(f"3 decoding streams + a {args.prompt}-token prompt arriving; 4 slots, prefill chunk "
              f"{engine.prefill_chunk}; best of {args.repeat}")
        print(f"{'budget':>8s} {'max gap s':>10s} {'median gap s':>13s} {'long TTFT s':>12s} {'total s':>8s}")
        reference = None
        for budget in (None, 512, 128):
            best = min((run(engine, long_prompt, budget) for _ in range(args.repeat)), key=lambda r: r[0])
            if reference is None:
                reference = best
            assert best[4] == reference[4], "outputs differ with a budget"
            ratio = f"   max gap {reference[0] / best[0]:.1f}x shorter" if budget else ""
            print(f"{budget or 'none':>8} {best[0]:10.3f} {best[1]:13.3f} {best[2]:12.2f} {best[3]:8.2f}{ratio}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
