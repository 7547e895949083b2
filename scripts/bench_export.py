"""Export memory benchmark: peak RSS of `qmoe export` on a random >= 2 GB checkpoint.

Prints, measured in this run: checkpoint bytes; qmoe export wall time and peak RSS (a child
process each, so peaks do not mix) vs the time to read the checkpoint once; and the transformers
route (load the model, then torch.onnx.export) on the same checkpoint. Finally loads the
artifact (> 2 GB of external data) in ONNX Runtime and runs one step.

    .venv/bin/python scripts/bench_export.py [--workdir DIR] [--keep] [--lora]
Target: peak RSS <= 1.5 GB whatever the checkpoint size.

--lora also writes a rank-16 PEFT adapter on every Linear and both fused expert parameters
(PEFT's target_parameters layout) and measures `qmoe export --lora` against PEFT's route to the
same merged weights (load the model, PeftModel.from_pretrained, merge_and_unload,
save_pretrained), each in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ~2.2 GB fp32: real vocabulary, 4 layers, 32 experts of 1024x512, head_dim 128
CONFIG = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, shared_expert_intermediate_size=1024,
              intermediate_size=2048)

CHILD_QMOE = """
import sys, time, json
from runtime.procinfo import peak_rss
from exporter.export import export
t = time.perf_counter()
export(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak_rss()}))
"""

CHILD_QMOE_LORA = """
import sys, time, json
from runtime.procinfo import peak_rss
from exporter.export import export
t = time.perf_counter()
export(sys.argv[1], sys.argv[2], lora=[sys.argv[3]])
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak_rss()}))
"""

CHILD_PEFT = """
import sys, time, json, torch, transformers, peft
from runtime.procinfo import peak_rss
t = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
model = peft.PeftModel.from_pretrained(model, sys.argv[3]).merge_and_unload()
model.save_pretrained(sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak_rss()}))
"""

CHILD_HF = """
import sys, time, json, torch, transformers
from runtime.procinfo import peak_rss
t = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
loaded = time.perf_counter() - t
status = "ok"
try:
    ids = torch.zeros(1, 8, dtype=torch.long)
    torch.onnx.export(model, (ids,), sys.argv[2] + "/hf.onnx", dynamo=True, external_data=True)
except Exception as e:  # record why the transformers route fails, as the result
    status = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
print(json.dumps({"seconds": time.perf_counter() - t, "load_seconds": loaded, "status": status,
                  "peak_rss": peak_rss()}))
"""


def child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_adapter(ck: Path, out: Path, r: int = 16) -> int:
    """A rank-r adapter on every Linear (attention, shared expert, router, shared-expert gate, head)
    and on both fused expert parameters, random factors; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    from exporter.checkpoint import Checkpoint

    c = Checkpoint(ck)
    cfg, E = c.config, c.config.num_experts
    g = torch.Generator().manual_seed(0)
    t = {}
    for name, shape in c.expected_shapes_for(cfg, fused=True).items():
        m = f"base_model.model.{name}"
        if name.endswith("proj.weight") or name.endswith("gate.weight") or name == "lm_head.weight":
            t[f"{m[:-7]}.lora_A.weight"] = torch.randn(r, shape[1], generator=g) * 0.01
            t[f"{m[:-7]}.lora_B.weight"] = torch.randn(shape[0], r, generator=g) * 0.01
        elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            n_out, n_in = shape[1], shape[2]
            nest = ".base_layer" if name.endswith("gate_up_proj") else ""
            base = m.rsplit(".", 1)[0] + nest
            t[f"{base}.lora_A.weight"] = torch.randn(r * E, n_in, generator=g) * 0.01
            t[f"{base}.lora_B.weight"] = torch.randn(n_out, r * E, generator=g) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                           "shared_expert_gate", "lm_head"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]}))
    return (out / "adapter_model.safetensors").stat().st_size


def read_once(folder: Path) -> float:
    t = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--lora", action="store_true", help="also measure merging a LoRA adapter (see module doc)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="qmoe-bench-export-"))
    sys.path.insert(0, str(ROOT))
    from exporter.tiny import tiny_config, write_checkpoint

    ck, art = work / "ck", work / "art"
    try:
        if not (ck / "config.json").exists():
            write_checkpoint(ck, tiny_config(**CONFIG), shard_bytes=512 << 20, tokenizer=True)
        size = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
        read_s = read_once(ck)
        shutil.rmtree(art, ignore_errors=True)
        q = child(CHILD_QMOE, str(ck), str(art))
        data = sum(f.stat().st_size for f in art.iterdir())
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(ck.glob('*.safetensors')))} shards; read once: {read_s:.1f} s")
        print(f"qmoe export: {q['seconds']:.1f} s ({q['seconds'] / read_s:.1f}x one read), peak RSS "
              f"{q['peak_rss'] / 1e9:.2f} GB = {q['peak_rss'] / size:.2f}x checkpoint; artifact {data / 1e9:.2f} GB")

        import numpy as np

        import runtime
        from runtime.sampling import SamplingParams

        t = time.perf_counter()
        engine = runtime.load(art)
        r = engine.generate([[9707, 11, 1879]], SamplingParams(max_new_tokens=2, ignore_eos=True), output_logits=True)[0]
        assert np.isfinite(r.logits[0]).all()
        print(f"ONNX Runtime loads the {data / 1e9:.2f} GB artifact and generates: {time.perf_counter() - t:.1f} s")
        if not args.skip_transformers:
            hf_dir = work / "hf"
            hf_dir.mkdir(exist_ok=True)
            h = child(CHILD_HF, str(ck), str(hf_dir))
            print(f"transformers load + torch.onnx.export: {h['seconds']:.1f} s (load {h['load_seconds']:.1f} s), "
                  f"peak RSS {h['peak_rss'] / 1e9:.2f} GB = {h['peak_rss'] / size:.2f}x checkpoint; export: {h['status']}")
            print(f"ratio peak RSS qmoe / transformers route: {q['peak_rss'] / h['peak_rss']:.2f}")
        if args.lora:
            adapter = work / "adapter"
            nbytes = write_adapter(ck, adapter)
            shutil.rmtree(art, ignore_errors=True)
            lq = child(CHILD_QMOE_LORA, str(ck), str(art), str(adapter))
            merged = work / "peft-merged"
            shutil.rmtree(merged, ignore_errors=True)
            lp = child(CHILD_PEFT, str(ck), str(merged), str(adapter))
            print(f"adapter: rank 16 on every Linear and both fused expert parameters, {nbytes / 1e6:.0f} MB")
            print(f"qmoe export --lora: {lq['seconds']:.1f} s ({lq['seconds'] / q['seconds']:.2f}x the plain export), "
                  f"peak RSS {lq['peak_rss'] / 1e9:.2f} GB")
            print(f"PEFT load + merge_and_unload + save_pretrained (before any export): {lp['seconds']:.1f} s, "
                  f"peak RSS {lp['peak_rss'] / 1e9:.2f} GB; ratio peak RSS qmoe / PEFT: "
                  f"{lq['peak_rss'] / lp['peak_rss']:.2f}")
            shutil.rmtree(merged, ignore_errors=True)
        ok = q["peak_rss"] <= 1.5e9
        print(f"target peak RSS <= 1.5 GB: {'met' if ok else 'MISSED'}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
