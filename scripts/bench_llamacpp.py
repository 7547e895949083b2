"""qmoe (ONNX Runtime, CPU) against llama.cpp on the same checkpoint, same machine, same run.

One random Qwen2-MoE checkpoint (bench_quant.py's model, 0.67B parameters, fp32) is exported by
qmoe (float32, int8, int4) and converted by llama.cpp's own convert_hf_to_gguf.py (F32) and
llama-quantize --pure (Q8_0, Q4_0 for every tensor, the head too: the same symmetric 32-weight
blocks as qmoe's, with int8 activations). Prompt processing: 512 tokens; generation: 32 tokens after those 512 (llama-bench
`-p 512 -n 0` and `-p 0 -n 32 -d 512`; qmoe: TTFT and decode of `engine.generate`, batch 1, so
qmoe's side includes its Python runtime). Both use the same number of threads and report the best
of 3 repetitions.

    scripts/get_llamacpp.sh                      # once: builds llama.cpp's tools (~10 min, 2 cores)
    .venv/bin/python scripts/bench_llamacpp.py [--threads N] [--llama-cpp build/llamacpp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_quant import CHILD, CONFIG, DECODE, PROMPT, artifact_bytes  # noqa: E402  (one model and one timing for both benchmarks)

PAIRS = (  # (label, llama.cpp type, qmoe quantize, qmoe activations)
    ("float32", "F32", None, None),
    ("int8 weights, int8 activations", "Q8_0", "int8", "int8"),
    ("int4 weights, int8 activations", "Q4_0", "int4", "int8"),
    ("int4 weights, float activations", None, "int4", "float"),
)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return out


def llama_bench(bench: Path, model: Path, threads: int, args: list[str]) -> float:
    """Tokens/s of the best of 3 repetitions (qmoe's side is timed the same way)."""
    out = run([str(bench), "-m", str(model), "-t", str(threads), "-r", "3", "-o", "json", *args])
    return float(max(json.loads(out.stdout)[0]["samples_ts"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--llama-cpp", type=Path, default=ROOT / "build" / "llamacpp",
                    help="llama.cpp tree built by scripts/get_llamacpp.sh")
    args = ap.parse_args()
    lc = args.llama_cpp.resolve()
    bench, quantize = lc / "build" / "bin" / "llama-bench", lc / "build" / "bin" / "llama-quantize"
    if not (bench.is_file() and quantize.is_file()):
        raise SystemExit(f"{lc}: no llama.cpp tools; run scripts/get_llamacpp.sh first")
    sys.path.insert(0, str(ROOT))
    from exporter.export import export
    from exporter.tiny import tiny_config, write_checkpoint

    work = Path(tempfile.mkdtemp(prefix="qmoe-bench-llamacpp-"))
    try:
        ck = write_checkpoint(work / "ck", tiny_config(**CONFIG), shard_bytes=1 << 30)
        f32 = work / "f32.gguf"
        env = dict(os.environ, PYTHONPATH=str(lc / "gguf-py"))
        run([sys.executable, str(lc / "convert_hf_to_gguf.py"), str(ck), "--outfile", str(f32), "--outtype", "f32"],
            env=env)
        rows = []
        for label, gtype, scheme, act in PAIRS:
            row = {"label": label}
            if gtype:
                model = f32 if gtype == "F32" else work / f"{gtype}.gguf"
                if not model.exists():
                    run([str(quantize), "--pure", str(f32), str(model), gtype])
                row["lc_pp"] = llama_bench(bench, model, args.threads, ["-p", str(PROMPT), "-n", "0"])
                row["lc_tg"] = llama_bench(bench, model, args.threads, ["-p", "0", "-n", str(DECODE),
                                                                        "-d", str(PROMPT)])
                row["lc_size"] = model.stat().st_size
            art = export(ck, work / label.replace(" ", "_").replace(",", ""), quantize=scheme, quant_activations=act)
            out = run([sys.executable, "-c", CHILD, str(art), str(args.threads), str(PROMPT), str(DECODE),
                       str(work / "logits.npy")], cwd=ROOT)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            row.update(q_pp=PROMPT / r["ttft"], q_tg=r["decode"],
                       q_size=artifact_bytes(art))
            rows.append(row)
        print(f"model: {CONFIG}, vocab 151936; CPU, {args.threads} threads; prompt {PROMPT} tokens, "
              f"then {DECODE} generated")
        print("| weights | qmoe prompt tok/s | llama.cpp prompt tok/s | ratio | qmoe decode tok/s | "
              "llama.cpp decode tok/s | ratio | qmoe GB | llama.cpp GB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            lc_cols = (f"{r['lc_pp']:.0f} | {r['q_pp'] / r['lc_pp']:.2f} | " if "lc_pp" in r else "— | — | ")
            tg_cols = (f"{r['lc_tg']:.1f} | {r['q_tg'] / r['lc_tg']:.2f} | " if "lc_tg" in r else "— | — | ")
            size = f"{r['lc_size'] / 1e9:.2f}" if "lc_size" in r else "—"
            print(f"| {r['label']} | {r['q_pp']:.0f} | {lc_cols}{r['q_tg']:.1f} | {tg_cols}{r['q_size'] / 1e9:.2f} | "
                  f"{size} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
