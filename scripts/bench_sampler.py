"""The host-side sampler (runtime.sampling.Sampler) against transformers' logits processors on
the same logits, same run: one decode step of a batch of 8 rows over Qwen2's 151936-token
vocabulary, 2000 prompt + 500 generated tokens per row (repetition penalty), for the parameter sets
that matter: greedy, Qwen2-57B-A14B-Instruct's generation_config.json (temperature 0.7, top-k 20,
top-p 0.8, repetition penalty 1.05), top-p alone, min-p.

transformers' side is what `generate` runs per step on the CPU: its processor list on a float32
[8, V] tensor, softmax and torch.multinomial. Ours: float64 per row (exact against transformers'
processors, see tests/runtime/test_sampling.py). On a GPU server the sampler runs on the host
after each step, so its time adds to every decode step of the batch.

Logits: log-probabilities of a Zipf-like distribution (a language model's shape: a few likely
tokens, a long tail) with noise, so top-p keeps a realistic nucleus.

    .venv/bin/python scripts/bench_sampler.py [--rows 8] [--repeat 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.sampling import Sampler, SamplingParams  # noqa: E402
from tests.helpers import hf_chain  # noqa: E402  (transformers' processors, the tests' reference)

V = 151936
CASES = {
    "greedy": SamplingParams(),
    "greedy, repetition 1.05": SamplingParams(repetition_penalty=1.05),
    "Qwen2 instruct defaults": SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    "temperature 1": SamplingParams(temperature=1.0),
    "top-p 0.9": SamplingParams(temperature=1.0, top_p=0.9),
    "top-p 0.95, repetition 1.1": SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1),
    "min-p 0.05": SamplingParams(temperature=1.0, min_p=0.05),
}


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    zipf = -1.1 * np.log(np.arange(1, V + 1))
    logits = np.stack([rng.permutation(zipf) + rng.normal(0, 0.5, V) for _ in range(args.rows)]).astype(np.float32)
    seen = [rng.integers(0, V, 2500) for _ in range(args.rows)]
    generated = [s[-500:] for s in seen]
    ids = torch.from_numpy(np.stack(seen))
    scores = torch.from_numpy(logits)
    print(f"one decode step, {args.rows} rows x {V} logits, torch threads {torch.get_num_threads()}; best of {args.repeat}")
    print(f"{'parameters':28s} {'qmoe ms':>8s} {'transformers ms':>16s} {'ratio':>7s}")
    for name, p in CASES.items():
        sampler = Sampler(p, args.rows)
        ours = best_ms(lambda: sampler.next(logits, seen, generated), args.repeat)
        chain = hf_chain(p)
        gen = torch.Generator().manual_seed(0)

        def hf() -> None:
            out = chain(ids, scores.clone())
            if p.greedy:
                out.argmax(-1)
            else:
                torch.multinomial(torch.softmax(out, -1), 1, generator=gen)

        ref = best_ms(hf, args.repeat)
        print(f"{name:28s} {ours:8.2f} {ref:16.2f} {ref / ours:6.2f}x")


if __name__ == "__main__":
    main()
