#!/usr/bin/env python3
"""One Qwen2-57B-A14B MoE layer (bf16) on one GPU: qmoe kernels vs transformers vs the roofline.

    python scripts/bench_moe_gpu.py --out bench.json [--tokens 1 8 64 512 4096] [--iters 20]

For each token count: our kernels (auto path, plus the forced decode and prefill paths up to 64
tokens), transformers' Qwen2MoeSparseMoeBlock on the same weights (its eager expert loop, the
default, and its grouped_mm experts when available), and the roofline:
max(bytes of the experts hit + shared expert + router / measured device-to-device copy rate,
FLOPs / 790 TFLOP/s). Times are CUDA-event means over --iters back-to-back calls after --warmup.
Also records our output's error against transformers. Exits 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_FLOPS = 790e12  # dense bf16 tensor-core rate used for the compute roofline (FACTS.md)
# vLLM 0.26 fused_experts, routed experts only, CUDA graph, on an H100, from FACTS.md (another run:
# vLLM is not installed here). Adding this run's shared expert as torch ops gives the pair the issue's
# target compares against; on other GPUs (an H200 streams ~1.4x faster) the pair is not printed.
VLLM_ROUTED_MS = {1: (0.169, 0.169), 8: (0.760, 0.760), 64: (1.202, 1.202), 512: (1.37, 1.45), 4096: (3.99, 4.40)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results path")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 64, 512, 4096])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    add_gate_up_block_arg(ap)
    return ap.parse_args()


def add_gate_up_block_arg(ap: argparse.ArgumentParser) -> None:
    """--gate-up-block (shared with profile_moe_gpu.py); its default comes from the environment so that
    scripts/gpu_session.sh's tune sets, which are environments, can choose it."""
    ap.add_argument("--gate-up-block", type=int, default=int(os.environ.get("QMOE_BENCH_GATE_UP_BLOCK", "0") or 0),
                    help="gate/up weight rows in alternating blocks of this many rows (qmoe_moe_params."
                         "gate_up_block; 128: SwiGLU in the Hopper GEMM 1's epilogue); 0: gate rows then up "
                         "rows. Default: $QMOE_BENCH_GATE_UP_BLOCK or 0")


def time_ms(fn, iters: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_time_ms(fn, iters: int, warmup: int) -> float | None:
    """fn captured once in a CUDA graph, replays timed like time_ms (no host launch gaps)."""
    import torch

    try:
        # Warm up and capture on one stream: the library makes QMOE_SHARED_STREAM's side stream for a
        # main stream on its first use outside a capture, so the fork/join is captured too.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        return time_ms(graph.replay, iters, warmup)
    except Exception as e:  # noqa: BLE001 - report and carry on: the eager time still stands
        print(f"bench_moe_gpu: CUDA graph capture failed ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def short_kernel_name(key: str) -> str:
    """'void qmoe::(anonymous namespace)::combine_kernel<__half>(qmoe::MoeArgs)' -> 'combine_kernel<__half>'."""
    name = key.replace("void ", "").replace("(anonymous namespace)::", "")
    if "cutlass" in name:
        from tests.plugins.kernels import cutlass_tile

        tile = cutlass_tile(name)  # 64x256x64, 128x256x64, swapped 128x32x64 / 128x96x64
        return "cutlass_grouped_gemm" + (f"_{tile}" if tile else "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the argument list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut].replace("qmoe::", "").replace("__nv_bfloat16", "bf16")[:48]


def kernel_breakdown_us(fn, reps: int = 5) -> dict[str, float]:
    """Mean device time per call of each kernel fn launches (torch.profiler), in microseconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for ev in prof.key_averages():
            total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if total and ev.count:
                name = short_kernel_name(ev.key)
                out[name] = out.get(name, 0.0) + total / reps
        return out
    except Exception as e:  # noqa: BLE001
        print(f"bench_moe_gpu: profiler failed ({type(e).__name__}: {e})", file=sys.stderr)
        return {}


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, read + write counted (1 GiB buffer)."""
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=20, warmup=3)
    return 2 * n / (ms * 1e-3)


def roofline(tokens: int, hit: int, shape, bw: float) -> dict[str, float]:
    H, I, Is, E, k = shape.hidden, shape.inter, shape.shared_inter, shape.experts, shape.top_k
    weight_bytes = 2 * (hit * 3 * I * H + 3 * Is * H + E * H + H)
    act_bytes = 2 * 2 * tokens * H
    flops = 2 * tokens * (k * 3 * I * H + 3 * Is * H + (E + 1) * H)
    mem_ms = (weight_bytes + act_bytes) / bw * 1e3
    compute_ms = flops / PEAK_BF16_FLOPS * 1e3
    expected_hit = E * (1 - (1 - k / E) ** tokens)
    return {"hit_experts": hit, "expected_hit_uniform": round(expected_hit, 2), "bytes": weight_bytes + act_bytes,
            "flops": flops, "mem_roofline_ms": mem_ms, "compute_roofline_ms": compute_ms,
            "roofline_ms": max(mem_ms, compute_ms)}


def routed_tile_math(counts: list[int]) -> dict[str, float]:
    """The routed GEMMs' tile math over their useful math, from the rows each expert got: every
    group pads its rows to whole tiles of 64 or 128 rows; with QMOE_SKIP_PAD a 128-row tile's warp
    group of padding rows does no math, which pads to 64-row halves (the same as 64-row tiles)."""
    useful = sum(counts)
    if useful == 0:
        raise ValueError("no routed rows")

    def padded(tile: int) -> int:
        return sum(-(-c // tile) * tile for c in counts)

    return {"tiles64": padded(64) / useful, "tiles128": padded(128) / useful, "tiles128_skip_pad": padded(64) / useful}


def write_json(args: argparse.Namespace, device: str, torch_version: str, shape: dict, bw: float, rows: list,
               features: list[str]) -> None:
    result = {
        "device": device, "torch": torch_version, "dtype": "bfloat16", "kernel_features": features,
        "shape": shape, "copy_bandwidth_Bps": bw, "peak_bf16_flops": PEAK_BF16_FLOPS,
        "iters": args.iters, "warmup": args.warmup, "gate_up_block": args.gate_up_block, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(result, tmp, indent=2)
    os.replace(tmp.name, args.out)


def load_layer(prog: str):
    """(torch, the ctypes kernels module, the reference module, the loaded library, Qwen2-57B-A14B
    layer weights in bf16 on the GPU, seed 0), or None after saying on stderr why not (no torch, no
    GPU). Shared with scripts/profile_moe_gpu.py."""
    try:
        import torch
    except ImportError:
        print(f"{prog}: torch is not installed; nothing measured", file=sys.stderr)
        return None
    if not torch.cuda.is_available():
        print(f"{prog}: no CUDA GPU visible; nothing measured", file=sys.stderr)
        return None
    sys.path.insert(0, str(ROOT))
    from tests.plugins import kernels as K
    from tests.plugins import moe_reference as ref

    lib = K.load()
    features = [name for bit, name in K.FEATURE_NAMES.items() if lib.features() & bit]
    print(f"qmoe kernels: {K.OVERRIDE_LIB or K.LIB_PATH}, features: {', '.join(features) or 'none'}")
    torch.manual_seed(0)
    w = ref.make_weights_on_device(ref.QWEN2_57B, torch.bfloat16, "cuda")
    return torch, K, ref, lib, w, features


def main() -> int:
    args = parse_args()
    loaded = load_layer("bench_moe_gpu")
    if loaded is None:
        return 2
    torch, K, ref, lib, w, features = loaded
    shape = ref.QWEN2_57B
    # The kernels' weights: w (what the references use) in the --gate-up-block layout.
    wk = K.interleave_gate_up(w, args.gate_up_block) if args.gate_up_block else w
    if args.gate_up_block:
        print(f"gate/up weights in blocks of {args.gate_up_block} rows")
    block = None
    if not args.no_transformers:
        try:
            block = ref.to_transformers_block(shape, w, norm_topk_prob=False)
        except Exception as e:  # noqa: BLE001 - missing or incompatible transformers: our columns still count
            print(f"bench_moe_gpu: transformers baseline unavailable ({type(e).__name__}: {e})", file=sys.stderr)
    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: device-to-device copy {bw / 1e12:.2f} TB/s (read + write)")
    header = f"{'tokens':>6} {'ours ms':>8} {'hf ms':>8} {'hf gmm':>8} {'roof ms':>8} {'ours/roof':>9} {'hf/roof':>8} {'hf/ours':>8} {'relerr':>8}"
    print(header)

    rows = []
    max_tokens = max(args.tokens)
    ws = torch.empty(lib.workspace_size(torch.empty(max_tokens, shape.hidden, device="cuda", dtype=torch.bfloat16),
                                        w, shape.top_k), dtype=torch.uint8, device="cuda")
    for tokens in args.tokens:
        x = ref.make_hidden(tokens, shape.hidden, torch.bfloat16, "cuda", seed=tokens)
        ids, _, _ = lib.moe_route(x, w, shape.top_k, False)
        row = {"tokens": tokens, **roofline(tokens, int(torch.unique(ids).numel()), shape, bw)}
        counts = torch.bincount(ids.flatten().long(), minlength=shape.experts).tolist()
        row["routed_rows_min_max"] = [min(counts), max(counts)]
        row["routed_tile_math"] = routed_tile_math(counts)
        def forward(weights=wk, path=K.PATH_AUTO, x=x):
            return lib.moe_forward(x, weights, shape.top_k, False, path=path, workspace=ws,
                                   gate_up_block=args.gate_up_block)

        ours = forward()
        row["ours_ms"] = time_ms(forward, args.iters, args.warmup)
        paths = [("decode", K.PATH_DECODE)] if tokens <= 64 else []
        paths += [("prefill", K.PATH_PREFILL), ("wmma", K.PATH_PREFILL_WMMA)]
        for name, path in paths:
            row[f"ours_{name}_ms"] = time_ms(lambda: forward(path=path), args.iters, args.warmup)
        if tokens >= 512:  # routed experts alone (what vLLM's fused_experts computes): their TFLOP/s
            routed = {k: v for k, v in wk.items() if not k.startswith("shared")}
            row["routed_only_ms"] = time_ms(lambda: forward(routed), args.iters, args.warmup)
            routed_flops = 2 * tokens * shape.top_k * 3 * shape.inter * shape.hidden
            row["routed_only_tflops"] = routed_flops / (row["routed_only_ms"] * 1e-3) / 1e12
            row["routed_only_kernels_us"] = kernel_breakdown_us(lambda: forward(routed))
        row["ours_graph_ms"] = graph_time_ms(forward, args.iters, args.warmup)
        row["kernels_us"] = kernel_breakdown_us(forward)
        row["tflops"] = row["flops"] / (row["ours_ms"] * 1e-3) / 1e12
        # The shared expert as separate torch (cuBLAS) ops: what vLLM adds to its routed experts.
        with torch.no_grad():
            row["shared_torch_ms"] = time_ms(lambda: ref.shared_expert_eager(x, w), args.iters, args.warmup)
        row["hf_ms"] = row["hf_grouped_mm_ms"] = row["rel_rms_vs_hf"] = None
        try:
            if block is not None:
                config = getattr(block.experts, "config", None)
                with torch.no_grad():
                    if config is not None:
                        config._experts_implementation = "eager"
                    expected = ref.transformers_forward(block, x)
                    row["hf_ms"] = time_ms(lambda: ref.transformers_forward(block, x), max(3, args.iters // 4), 1)
                    try:  # transformers' torch._grouped_mm experts: a stronger, optional baseline
                        config._experts_implementation = "grouped_mm"
                        row["hf_grouped_mm_ms"] = time_ms(lambda: ref.transformers_forward(block, x), max(3, args.iters // 4), 1)
                    except Exception as e:  # noqa: BLE001 - older torch/transformers lack it (config None too)
                        print(f"bench_moe_gpu: transformers grouped_mm failed ({type(e).__name__}: {e})", file=sys.stderr)
                d = ours.double() - expected.double()
                row["rel_rms_vs_hf"] = d.pow(2).mean().sqrt().item() / expected.double().pow(2).mean().sqrt().item()
        except Exception as e:  # noqa: BLE001 - the baseline failing must not lose our numbers
            print(f"bench_moe_gpu: transformers baseline failed at {tokens} tokens ({type(e).__name__}: {e})", file=sys.stderr)
        roof = row["roofline_ms"]
        row["ours_over_roofline"] = row["ours_ms"] / roof
        row["hf_over_roofline"] = None if row["hf_ms"] is None else row["hf_ms"] / roof
        row["hf_over_ours"] = None if row["hf_ms"] is None else row["hf_ms"] / row["ours_ms"]
        rows.append(row)
        if tokens in VLLM_ROUTED_MS and "H100" in device:  # FACTS.md's figures are an H100's
            lo, hi = (v + row["shared_torch_ms"] for v in VLLM_ROUTED_MS[tokens])
            row["vllm_pair_ms"] = [lo, hi]
            row["ours_over_vllm_pair"] = [row["ours_ms"] / hi, row["ours_ms"] / lo]
        write_json(args, device, torch.__version__, vars(shape), bw, rows, features)  # after each row: a crash keeps the rest

        def f(v, spec):
            return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))

        print(f"{tokens:>6} {row['ours_ms']:8.3f} {f(row['hf_ms'], '8.3f')} {f(row['hf_grouped_mm_ms'], '8.3f')} {roof:8.3f} {row['ours_over_roofline']:9.2f} "
              f"{f(row['hf_over_roofline'], '8.2f')} {f(row['hf_over_ours'], '8.2f')} {f(row['rel_rms_vs_hf'], '8.1e')}"
              f"  graph {f(row['ours_graph_ms'], '7.3f')} ms, {row['tflops']:.0f} TFLOP/s"
              + "".join(f", {k}={v:.0f}us" for k, v in row.get("kernels_us", {}).items()))
        for name in ("ours_decode_ms", "ours_prefill_ms", "ours_wmma_ms", "routed_only_ms", "shared_torch_ms"):
            if name in row:
                print(f"{'':>6} {name}: {row[name]:.3f} ms")
        if "vllm_pair_ms" in row:
            lo, hi = row["vllm_pair_ms"]
            print(f"{'':>6} vLLM routed (FACTS.md) + shared as torch ops (this run): {lo:.3f}-{hi:.3f} ms; "
                  f"ours / that: {row['ours_over_vllm_pair'][0]:.3f}-{row['ours_over_vllm_pair'][1]:.3f}")
        if "routed_only_ms" in row:
            print(f"{'':>6} routed experts only: {row['routed_only_tflops']:.0f} TFLOP/s"
                  + "".join(f", {k}={v:.0f}us" for k, v in row["routed_only_kernels_us"].items()))
        if tokens >= 64:
            pad = row["routed_tile_math"]
            print(f"{'':>6} routed rows per expert {row['routed_rows_min_max'][0]}-{row['routed_rows_min_max'][1]}; "
                  f"tile math / useful math: 128-row tiles {pad['tiles128']:.3f}, with QMOE_SKIP_PAD "
                  f"{pad['tiles128_skip_pad']:.3f}, 64-row tiles {pad['tiles64']:.3f}")

    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
