#!/usr/bin/env python3
"""Side-by-side table of scripts/bench_moe_gpu.py results (same GPU, same run), as Markdown.

    python scripts/compare_bench.py default=a/bench.json exp=b/bench.json [pdl=c/bench.json ...]

One row per token count: each run's whole-layer time (ms), its ratio to the first run, and its ratio
to the memory/compute roofline. Runs missing a token count show "-". Then issue #5's targets per run:
whole layer <= 1.05x the roofline (1-512 tokens), faster than vLLM's routed experts (FACTS.md) plus
this run's shared expert as torch ops (1-512 tokens; "yes" only below the pair's lower bound,
"tie?" inside its range), routed experts alone >= 600 TFLOP/s at 4096 tokens.
Exits 1 if a file is unreadable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(spec: str) -> tuple[str, dict]:
    name, sep, path = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"expected NAME=PATH, got {spec!r}")
    data = json.loads(Path(path).read_text())
    return name, {row["tokens"]: row for row in data["rows"]}


def table(runs: list[tuple[str, dict]]) -> str:
    names = [name for name, _ in runs]
    tokens = sorted({t for _, rows in runs for t in rows})
    head = ["tokens"] + [f"{n} ms" for n in names] + [f"{n}/{names[0]}" for n in names[1:]] + [f"{n}/roof" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tokens:
        rows = [rows.get(t) for _, rows in runs]
        ms = [r["ours_ms"] if r else None for r in rows]
        cells = [str(t)] + [f"{v:.3f}" if v is not None else "-" for v in ms]
        cells += [f"{v / ms[0]:.3f}" if v is not None and ms[0] else "-" for v in ms[1:]]
        cells += [f"{r['ours_ms'] / r['roofline_ms']:.3f}" if r else "-" for r in rows]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ROOFLINE_TARGET = 1.05
TFLOPS_TARGET = 600.0
TARGET_TOKENS = range(1, 513)


def verdicts(row: dict) -> list[str]:
    """This run's standing on the targets at row["tokens"], one short cell each."""
    t = row["tokens"]
    out = []
    if t in TARGET_TOKENS:
        r = row["ours_ms"] / row["roofline_ms"]
        out.append(f"roof {r:.2f} {'ok' if r <= ROOFLINE_TARGET else 'no'}")
        if "vllm_pair_ms" in row:
            lo, hi = row["vllm_pair_ms"]
            ours = row["ours_ms"]
            out.append(f"vLLM pair {lo:.3f}-{hi:.3f}: " + ("yes" if ours < lo else "tie?" if ours <= hi else "no"))
    if t == 4096 and "routed_only_tflops" in row:
        v = row["routed_only_tflops"]
        out.append(f"routed {v:.0f} TFLOP/s {'ok' if v >= TFLOPS_TARGET else 'no'}")
    return out


def targets(runs: list[tuple[str, dict]]) -> str:
    tokens = sorted({t for _, rows in runs for t in rows})
    head = ["tokens"] + [name for name, _ in runs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tokens:
        cells = [str(t)] + ["; ".join(verdicts(rows[t])) or "-" if t in rows else "-" for _, rows in runs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        runs = [load(spec) for spec in argv]
    except (OSError, ValueError, KeyError) as e:
        print(f"compare_bench: {e}", file=sys.stderr)
        return 1
    print(table(runs))
    print()
    print("Targets (issue #5):")
    print()
    print(targets(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
