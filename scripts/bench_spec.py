"""n-gram speculative decoding in the continuous-batching scheduler, on vs off, same model, same
run. The random model never repeats itself, so the outputs that repeat are made: "copy" constrains
the output to a passage of the prompt (what extraction, quoting and code edits look like: every
draft is right), "four tokens" biases the output to four tokens (it repeats, drafts are often
wrong), "free text" is unconstrained (no repeats: drafts are rare; the cost of looking for them).
Outputs are checked equal on and off.

Model: bench_runtime.py's (random fp32, real vocabulary, hidden 256, 4 layers, 16 experts top-4),
2 threads; greedy (one case seeded sampling); best of --repeat runs of each case.

    .venv/bin/python scripts/bench_spec.py [--tokens 4] [--repeat 3]
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

WORDS = ("expert router token layer weight shared gate cache prefix decode prompt batch kernel memory "
         "latency tensor graph engine sample stream").split()


def run(engine, reqs, speculation, slots: int):
    from runtime.batching import BatchScheduler

    sched = BatchScheduler(engine, max_slots=slots, speculation=speculation)
    gens = [sched.submit(ids, p) for ids, p in reqs]
    t = time.perf_counter()
    while sched.has_work():
        sched.step()
    return time.perf_counter() - t, [g.result.tokens for g in gens], sched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import runtime
    from runtime.sampling import SamplingParams
    from runtime.speculative import NgramSpeculation
    from runtime.structured import StructuredOutput

    work = Path(tempfile.mkdtemp(prefix="qmoe-bench-spec-"))
    try:
        engine = runtime.load(export_model(work)[1], threads=2)
        tok = engine.tokenizer
        rng = np.random.default_rng(0)
        passage = " ".join(rng.choice(WORDS, 120)) + "."
        copy = tok.encode(f"Quote the passage exactly.\n{passage}\nQuote: ")
        free = tok.encode("Experts and routers, 你好")
        four = {t: 40.0 for t in tok.encode(" red green blue red")[:4]}
        cases = {
            "copy (drafts right)": (copy, SamplingParams(max_new_tokens=128, structured=StructuredOutput.choice([passage]))),
            "four tokens (repeats)": (free, SamplingParams(max_new_tokens=128, logit_bias=four)),
            "four tokens, sampled": (free, SamplingParams(max_new_tokens=128, logit_bias=four, temperature=1.0, seed=0)),
            "free text (no repeats)": (free, SamplingParams(max_new_tokens=128, ignore_eos=True)),
        }
        spec = NgramSpeculation(args.tokens, 4, 2)
        print(f"ngram speculation, {args.tokens} draft tokens, lookup 2-4; 128 new tokens; best of {args.repeat}")
        print(f"{'case':24s} {'batch':>5s} {'off s':>7s} {'on s':>7s} {'steps':>11s} {'accepted':>12s} {'speed-up':>9s}")
        for name, (ids, p) in cases.items():
            for slots in (1, 4):
                reqs = [(ids, p)] * slots
                off = [run(engine, reqs, None, slots) for _ in range(args.repeat)]
                on = [run(engine, reqs, spec, slots) for _ in range(args.repeat)]
                assert all(r[1] == off[0][1] for r in off + on), f"{name}: outputs differ with speculation"
                t_off, t_on = min(r[0] for r in off), min(r[0] for r in on)
                s0, s1 = off[0][2], on[0][2]
                rate = f"{s1.accepted_tokens}/{s1.draft_tokens}"
                print(f"{name:24s} {slots:5d} {t_off:7.2f} {t_on:7.2f} {s0.steps:5d}->{s1.steps:<5d} {rate:>12s} "
                      f"{t_off / t_on:8.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
