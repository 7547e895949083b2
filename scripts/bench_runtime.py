"""Runtime benchmark on the CPU: qmoe (ONNX Runtime) vs transformers `generate`, same weights, same run.

Model (random, fp32): real vocabulary 151936, hidden 256, 4 layers, GQA 8/2 (head_dim 32),
16 experts top-4 (intermediate 128) + shared expert 512. Batch 1, greedy.
Prints time to first token for a 512-token prompt, decode tokens/s, and decode tokens/s with
4096 tokens of context vs 128, as ratios.

    .venv/bin/python scripts/bench_runtime.py [--threads N]
Targets: decode >= 3x transformers; decode at 4096 context >= 0.7x decode at 128.
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
CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, num_experts=16,
              num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=512,
              intermediate_size=512)
DECODE = 64


def export_model(work: Path, **overrides) -> tuple[Path, Path]:
    """The benchmarks' random model (CONFIG, then `overrides`) as a checkpoint under `work` and its
    exported ONNX Runtime artifact: (checkpoint, artifact)."""
    sys.path.insert(0, str(ROOT))
    from exporter.export import export
    from exporter.tiny import tiny_config, write_checkpoint

    ck = write_checkpoint(work / "ck", tiny_config(**{**CONFIG, **overrides}))
    return ck, export(ck, work / "art")


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="threads for both (default: library defaults)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    import runtime
    from runtime.sampling import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="qmoe-bench-rt-"))
    try:
        ck, art = export_model(work, max_position_embeddings=8192)
        engine = runtime.load(art, threads=args.threads)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
        rng = np.random.default_rng(0)
        prompt = [int(x) for x in rng.integers(0, 150000, 512)]

        def ours(p, n):
            return lambda: engine.generate([p], SamplingParams(max_new_tokens=n, ignore_eos=True))

        def theirs(p, n):
            ids = torch.tensor([p])
            return lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        with torch.no_grad():
            ttft_q, ttft_h = best(ours(prompt, 1)), best(theirs(prompt, 1))
            dec_q = DECODE / (best(ours(prompt, DECODE + 1)) - ttft_q)
            dec_h = DECODE / (best(theirs(prompt, DECODE + 1)) - ttft_h)
            short, long = prompt[:128], [int(x) for x in rng.integers(0, 150000, 4096)]
            d128 = DECODE / (best(ours(short, DECODE + 1)) - best(ours(short, 1)))
            d4096 = DECODE / (best(ours(long, DECODE + 1), 2) - best(ours(long, 1), 2))
        print(f"model: {CONFIG} vocab 151936, fp32, batch 1, CPU, torch threads {torch.get_num_threads()}")
        print(f"TTFT 512-token prompt: qmoe {ttft_q * 1e3:.1f} ms, transformers {ttft_h * 1e3:.1f} ms, "
              f"ratio {ttft_h / ttft_q:.2f}x")
        print(f"decode: qmoe {dec_q:.1f} tok/s, transformers {dec_h:.1f} tok/s, ratio {dec_q / dec_h:.2f}x (target >= 3x)")
        print(f"qmoe decode at 128 context {d128:.1f} tok/s, at 4096 {d4096:.1f} tok/s, "
              f"ratio {d4096 / d128:.2f} (target >= 0.7)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
