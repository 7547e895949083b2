"""Prefix sharing between running requests in the continuous-batching scheduler, on vs off, same
model, same run: n sampled choices of one long prompt (what `n` > 1 sends), and concurrent requests
that share a long system prompt. Off, every request prefills its whole prompt; on, the first one
computes the shared prefix and the others copy its K/V rows (ONNX Runtime CPU).

Model: bench_runtime.py's (random fp32, real vocabulary, hidden 256, 4 layers, 16 experts top-4),
2 threads, max 4 slots, 16 new tokens per request; best of --repeat runs of each case.

    .venv/bin/python scripts/bench_prefix.py [--prompt 1024] [--repeat 3]
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


def run(engine, prompts: list[list[int]], share: bool) -> tuple[float, int]:
    from runtime.batching import BatchScheduler
    from runtime.sampling import SamplingParams

    sched = BatchScheduler(engine, max_slots=4, capacity=max(map(len, prompts)) + 32)
    sched._copy = share and sched._copy
    for i, ids in enumerate(prompts):
        sched.submit(ids, SamplingParams(max_new_tokens=16, temperature=1.0, seed=i, ignore_eos=True))
    t = time.perf_counter()
    while sched.has_work():
        sched.step()
    return time.perf_counter() - t, sched.copied_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=1024, help="shared prompt tokens")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import runtime

    work = Path(tempfile.mkdtemp(prefix="qmoe-bench-prefix-"))
    try:
        engine = runtime.load(export_model(work, max_position_embeddings=8192)[1], threads=2, prefill_chunk=512)
        rng = np.random.default_rng(0)
        shared = [int(x) for x in rng.integers(0, 150000, args.prompt)]
        cases = {
            "n=4 choices of one prompt": [shared] * 4,
            "4 requests, shared system prompt": [shared + [int(x) for x in rng.integers(0, 150000, 32)]
                                                 for _ in range(4)],
        }
        print(f"{args.prompt}-token shared prefix, 4 slots, 16 new tokens each; best of {args.repeat}")
        print(f"{'case':36s} {'off s':>7s} {'on s':>7s} {'copied':>7s} {'speed-up':>9s}")
        for name, prompts in cases.items():
            off = min(run(engine, prompts, False)[0] for _ in range(args.repeat))
            on_runs = [run(engine, prompts, True) for _ in range(args.repeat)]
            on = min(t for t, _ in on_runs)
            print(f"{name:36s} {off:7.2f} {on:7.2f} {on_runs[0][1]:7d} {off / on:8.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
