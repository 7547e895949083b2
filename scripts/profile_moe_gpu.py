#!/usr/bin/env python3
"""One qmoe MoE-layer call at Qwen2-57B-A14B dims (bf16) inside a profiler capture range, for Nsight
Compute: the layer runs --warm times first, then once between cudaProfilerStart/Stop.

    ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        python scripts/profile_moe_gpu.py --tokens 64

Exits 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys

from bench_moe_gpu import add_gate_up_block_arg, load_layer  # this folder is on sys.path when the script runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warm", type=int, default=3, help="unprofiled calls first")
    ap.add_argument("--routed-only", action="store_true", help="drop the shared expert")
    add_gate_up_block_arg(ap)
    args = ap.parse_args()
    loaded = load_layer("profile_moe_gpu")
    if loaded is None:
        return 2
    torch, K, ref, lib, w, _ = loaded
    shape = ref.QWEN2_57B
    if args.gate_up_block:
        w = K.interleave_gate_up(w, args.gate_up_block)
    if args.routed_only:
        w = {k: v for k, v in w.items() if not k.startswith("shared")}
    x = ref.make_hidden(args.tokens, shape.hidden, torch.bfloat16, "cuda", seed=args.tokens)
    ws = torch.empty(lib.workspace_size(x, w, shape.top_k), dtype=torch.uint8, device="cuda")
    for _ in range(args.warm):
        lib.moe_forward(x, w, shape.top_k, False, workspace=ws, gate_up_block=args.gate_up_block)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    lib.moe_forward(x, w, shape.top_k, False, workspace=ws, gate_up_block=args.gate_up_block)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled one layer call: {args.tokens} tokens, features {lib.features()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
