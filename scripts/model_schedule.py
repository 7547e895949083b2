#!/usr/bin/env python3
"""A fluid model of the Hopper grouped GEMMs' tile schedule (plugins/kernels/moe_gemm_sm90.cuh), to
reason about entry orders without a GPU and to calibrate against a lease's numbers.

Model. CUTLASS's persistent group scheduler walks the tiles of all entries in entry order (inside an
entry along M first) and hands tile i to slot i mod W (static striding). A tile needs f FLOPs at
most C = peak / W per slot and b bytes from HBM; the running tiles share the HBM bandwidth max-min
fairly. A weight tile (256 rows x K) is read from HBM by the first of an entry's row tiles and from
L2 by the others (they run at about the same time in AlongM order). Activation traffic and the
kernels around the GEMMs are left out.

W = 264 (--slots): 132 CTAs x 2 ping-pong consumer warp groups as independent slots. That is a
fitted simplification: the two warp groups take turns on the tensor cores and one in-order producer
feeds both, so a compute-bound and a memory-bound tile on one SM do not fully run side by side.
With --slots 132 the calibration points move by up to 5% (routed-only 512: 1.283 ms) and the
512-token prediction barely (1.648 -> 1.48-1.50 ms). The routing is random (--seed): seeds 0-3
give 1.63-1.68 ms shared first and 1.48-1.54 spread at 512 tokens. --tile-m 128 --slots 132 models
QMOE_TILE_ROWS=48 (cooperative 128-row tiles from 48 mean rows per expert).

usage: scripts/model_schedule.py [--tokens 64 512 ...] [--parts 8 16 32] [--tflops 600] [--tbps 2.8]
                                 [--slots 264] [--tile-m 64] [--seed 0]
Prints the modelled GEMM 1 + GEMM 2 time per token count with the shared expert first (run 4's
schedule; since stop 20 the default spreads it at 384-1024 tokens) and spread with
QMOE_SHARED_INTERLEAVE=parts. Calibration (tests/plugins/test_model_schedule.py):
run 4 measured 1.411 / 1.652 ms of grouped GEMMs at 64 / 512 tokens and 1.348 ms for the routed
experts alone at 512 (plugins/results/h100-run4/bench.log); the model gives 1.416 / 1.683 / 1.327.
At 8 tokens it is 10% slow (1.00 for 0.911 ms).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

SLOTS = 2 * 132  # H100 SXM: 132 SMs, two ping-pong tiles each
TILE_M, TILE_N = 64, 256  # the small (memory-bound range) tiles
SHARED_SPLIT_MAX_TOKENS = 512  # GEMM 2's shared K-slices up to here (moe_internal.h)


@dataclass(frozen=True)
class Dims:
    hidden: int = 3584
    inter: int = 2560
    shared_inter: int = 20480
    experts: int = 64
    top_k: int = 8
    elem_bytes: int = 2


def entry_order(routed: int, parts: int, spread: bool) -> list[int]:
    """moe_internal.h's sched_entry for every entry: the shared piece (>= 0) or -1 - e."""
    n = routed + parts
    order = []
    for i in range(n):
        if not spread:
            order.append(i if i < parts else -1 - (i - parts))
            continue
        before = (i * parts + n - 1) // n
        upto = ((i + 1) * parts + n - 1) // n
        order.append(before if upto > before else -1 - (i - before))
    return order


def _entry_tiles(rows: int, cols: int, k: int, elem: int, tile_m: int,
                  tile_n: int = TILE_N) -> list[tuple[float, float]]:
    """(FLOPs, HBM bytes) of each tile of a rows x cols x k problem, along M first (none if empty).
    Swapped tiles (QMOE_SWAP_AB: the weight is CUTLASS's M, the rows N, raster along N) are the same
    list with tile_m = the row tile (32 or 80) and tile_n = the weight tile (128)."""
    m_tiles = math.ceil(rows / tile_m) if k > 0 else 0
    tiles = []
    for n0 in range(0, cols, tile_n):
        width = min(tile_n, cols - n0)
        for m in range(m_tiles):
            tiles.append((2.0 * tile_m * width * k, float(width * k * elem) if m == 0 else 0.0))
    return tiles


def gemm_tiles(gemm: int, counts: list[int], tokens: int, parts: int, spread: bool, d: Dims = Dims(),
               tile_m: int = TILE_M, tile_n: int = TILE_N) -> list[tuple[float, float]]:
    """The tile list of GEMM 1 (gate/up; the shared expert in `parts` column slices) or GEMM 2 (down;
    the shared expert in its K-slices) in the scheduler's order."""
    if gemm == 1:
        routed = [_entry_tiles(r, 2 * d.inter, d.hidden, d.elem_bytes, tile_m, tile_n) for r in counts]
        width = 2 * d.shared_inter // parts
        pieces = [_entry_tiles(tokens, width, d.hidden, d.elem_bytes, tile_m, tile_n) for _ in range(parts)]
    else:
        routed = [_entry_tiles(r, d.hidden, d.inter, d.elem_bytes, tile_m, tile_n) for r in counts]
        parts = 8 if tokens <= SHARED_SPLIT_MAX_TOKENS and d.shared_inter else 1
        pieces = [_entry_tiles(tokens, d.hidden, d.shared_inter // parts, d.elem_bytes, tile_m, tile_n)
                  for _ in range(parts)]
    tiles: list[tuple[float, float]] = []
    for s in entry_order(len(routed), len(pieces), spread):
        tiles += pieces[s] if s >= 0 else routed[-1 - s]
    return tiles


def simulate(tiles: list[tuple[float, float]], slots: int, flops_per_slot: float, bandwidth: float) -> float:
    """Seconds until every tile is done (fluid model; see the module docstring)."""
    queues = [tiles[w::slots] for w in range(slots)]
    nxt = [0] * slots
    work: dict[int, list[float]] = {}  # slot -> [remaining fraction, f, b]
    for w in range(slots):
        if queues[w]:
            f, b = queues[w][0]
            work[w] = [1.0, f, b]
            nxt[w] = 1
    t = 0.0
    while work:
        # Fraction per second each tile could reach on compute alone, and what its bytes would need.
        cap = {w: flops_per_slot / v[1] if v[1] > 0 else math.inf for w, v in work.items()}
        need = {w: v[2] * cap[w] for w, v in work.items()}
        # Max-min fair shares of the bandwidth (water filling over the sorted demands).
        left, n = bandwidth, len(work)
        rate = {}
        for i, (_, w) in enumerate(sorted((need[w], w) for w in work)):
            share = min(need[w], left / (n - i))
            left -= share
            rate[w] = min(cap[w], share / work[w][2]) if work[w][2] > 0 else cap[w]
        dt = min(v[0] / rate[w] for w, v in work.items())
        t += dt
        for w in list(work):
            work[w][0] -= rate[w] * dt
            if work[w][0] <= 1e-9:
                if nxt[w] < len(queues[w]):
                    f, b = queues[w][nxt[w]]
                    nxt[w] += 1
                    work[w] = [1.0, f, b]
                else:
                    del work[w]
    return t


def routed_counts(tokens: int, d: Dims, seed: int) -> list[int]:
    """Rows per routed expert for uniformly random top-k routing (the benchmark's random router)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(d.experts, dtype=int)
    for _ in range(tokens):
        counts[rng.choice(d.experts, d.top_k, replace=False)] += 1
    return counts.tolist()


def grouped_gemms_ms(tokens: int, parts: int, spread: bool, tflops: float, tbps: float, seed: int = 0,
                     d: Dims = Dims(), slots: int = SLOTS, tile_m: int = TILE_M, tile_n: int = TILE_N) -> float:
    counts = routed_counts(tokens, d, seed)
    per_slot = tflops * 1e12 / slots
    return 1e3 * sum(simulate(gemm_tiles(g, counts, tokens, parts, spread, d, tile_m, tile_n), slots, per_slot,
                              tbps * 1e12) for g in (1, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 512, 640])
    ap.add_argument("--parts", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--tflops", type=float, default=600.0, help="bf16 rate of the 64x256 tiles, compute-bound")
    ap.add_argument("--tbps", type=float, default=2.8, help="HBM rate the tiles stream at, memory-bound")
    ap.add_argument("--slots", type=int, default=SLOTS, help="tiles in flight (CTAs x consumer warp groups)")
    ap.add_argument("--tile-m", type=int, choices=(32, 64, 80, 128), default=TILE_M,
                    help="rows per tile (swapped tiles: 32 or 80)")
    ap.add_argument("--tile-n", type=int, choices=(128, 256), default=TILE_N,
                    help="weight rows per tile (swapped tiles: 128)")
    ap.add_argument("--seed", type=int, default=0, help="of the random routing")
    args = ap.parse_args()
    if any(t < 1 or t * Dims().top_k // Dims().experts >= 128 for t in args.tokens):
        ap.error("--tokens: 1..1023 (below the compute-bound range at 57B dims)")
    if any(p < 1 or p & (p - 1) or (2 * Dims().shared_inter) % (TILE_N * p) for p in args.parts):
        ap.error("--parts: as QMOE_SHARED_INTERLEAVE slices the 57B shared expert: 1, 2, 4, 8, 16 or 32")
    if args.slots < 1 or args.tflops <= 0 or args.tbps <= 0:
        ap.error("--slots, --tflops and --tbps must be positive")
    print(f"grouped GEMMs, ms (model: {args.tflops:g} TFLOP/s, {args.tbps:g} TB/s, {args.slots} tile slots of"
          f" {args.tile_m} rows x {args.tile_n} weight rows)")
    print("tokens  shared first  " + "  ".join(f"spread {p:>2}" for p in args.parts))
    for t in args.tokens:
        model = dict(tflops=args.tflops, tbps=args.tbps, seed=args.seed, slots=args.slots, tile_m=args.tile_m,
                     tile_n=args.tile_n)
        first = grouped_gemms_ms(t, 1, False, **model)
        spread = [grouped_gemms_ms(t, p, True, **model) for p in args.parts]
        print(f"{t:>6}  {first:>12.3f}  " + "  ".join(f"{s:>9.3f}" for s in spread))


if __name__ == "__main__":
    main()
