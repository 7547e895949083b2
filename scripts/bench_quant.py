"""Quantized artifacts on the CPU: int8 and int4 (`qmoe export --quantize`), and a GPTQ checkpoint
of the same weights in Qwen2-57B-A14B-Instruct-GPTQ-Int4's layout (4-bit, groups of 128; here
with zero points, written by the tests' GPTQ packer with round-to-nearest integers), against the
float32 artifact of the same checkpoint, same run: artifact size, peak memory of a process that loads the
artifact and generates, time to first token, decode speed, and the logits' distance from float32
(random weights: the distance says how much the numbers move, not how much quality a real model
loses).

Model (random, fp32, 0.67B parameters, 2.67 GB): real vocabulary 151936, hidden 1024, 6 layers,
GQA 8/2, 32 experts top-4 (intermediate 512) + shared expert 2048. Batch 1, greedy.

    .venv/bin/python scripts/bench_quant.py [--threads N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, num_experts=32,
              num_experts_per_tok=4, moe_intermediate_size=512, shared_expert_intermediate_size=2048,
              intermediate_size=2048, max_position_embeddings=4096)
PROMPT, DECODE = 512, 32

CHILD = """
import json, sys, time
import numpy as np
import runtime
from runtime.procinfo import peak_rss
from runtime.sampling import SamplingParams

art, threads, prompt_len, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
engine = runtime.load(art, threads=threads or None)
prompt = [int(x) for x in np.random.default_rng(0).integers(0, 150000, prompt_len)]

def best(n, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = engine.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True), output_logits=True)
        times.append(time.perf_counter() - t)
    return min(times), r[0]

ttft, first = best(1)
total, run = best(decode + 1)
np.save(sys.argv[5], np.stack(run.logits))
print(json.dumps({"ttft": ttft, "decode": decode / (total - ttft), "peak_rss": peak_rss(), "tokens": run.tokens}))
"""


def artifact_bytes(art: Path) -> int:
    """model.onnx and its external data."""
    return sum(f.stat().st_size for f in art.iterdir() if f.name.startswith("model.onnx"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: its own choice)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from exporter.export import export
    from exporter.tiny import tiny_config, write_checkpoint

    work = Path(tempfile.mkdtemp(prefix="qmoe-bench-quant-"))
    try:
        ck = write_checkpoint(work / "ck", tiny_config(**CONFIG), shard_bytes=1 << 30)
        ck_bytes = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
        rows = []
        from tests.exporter.test_gptq import make_gptq

        gptq = make_gptq(ck, work / "gptq-ck", work / "gptq-ref", bits=4, group=128, sym=False, v1=False)
        shutil.rmtree(work / "gptq-ref")
        for label, scheme, act in (("float32", None, None), ("int8 (int8 activations)", "int8", "int8"),
                                   ("int4", "int4", "float"), ("int4 (int8 activations)", "int4", "int8"),
                                   ("GPTQ int4, group 128 (float embeddings and head)", "gptq", "float"),
                                   ("GPTQ int4, group 128 (int8 activations)", "gptq", "int8"),
                                   ("GPTQ int4, group 128 + --quantize int4 (embeddings and head int4)", "gptq+int4",
                                    "float")):
            name = label.split()[0] + ("-a8" if act == "int8" else "") + ("-q4" if scheme == "gptq+int4" else "")
            if scheme is not None and scheme.startswith("gptq"):
                art = export(gptq, work / name, quant_activations=act,
                             quantize="int4" if scheme == "gptq+int4" else None)
            else:
                art = export(ck, work / name, quantize=scheme, quant_activations=act)
            size = artifact_bytes(art)
            logits_file = work / f"{name}.npy"
            out = subprocess.run([sys.executable, "-c", CHILD, str(art), str(args.threads), str(PROMPT), str(DECODE),
                                  str(logits_file)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(scheme=label, size=size, logits=np.load(logits_file))
            rows.append(r)
        base = rows[0]
        print(f"model: {CONFIG}, vocab 151936, checkpoint {ck_bytes / 1e9:.2f} GB fp32; batch 1, CPU, "
              f"{args.threads or 'default'} ONNX Runtime threads; {PROMPT}-token prompt, {DECODE} greedy steps")
        print("| weights | artifact GB | x fp32 | peak RSS GB | x fp32 | TTFT ms | decode tok/s | x fp32 "
              "| logits rel. L2 vs fp32 (step 1) | greedy tokens equal to fp32 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            a, b = r["logits"][0], base["logits"][0]
            rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            same = next((i for i, (x, y) in enumerate(zip(r["tokens"], base["tokens"])) if x != y), len(r["tokens"]))
            print(f"| {r['scheme']} | {r['size'] / 1e9:.2f} | {r['size'] / base['size']:.2f} | "
                  f"{r['peak_rss'] / 1e9:.2f} | {r['peak_rss'] / base['peak_rss']:.2f} | {r['ttft'] * 1e3:.0f} | "
                  f"{r['decode']:.1f} | {r['decode'] / base['decode']:.2f} | {rel:.2e} | "
                  f"first {same} of {len(r['tokens'])} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
