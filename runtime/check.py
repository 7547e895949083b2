"""`qmoe check`: the same prompts through each backend (and transformers, given the checkpoint);
per-step logits, top-1 and greedy tokens compared against a baseline, with tolerances by dtype.

    [prompts: fixed texts, tokenised] -> [each artifact on its backend: greedy, ignore_eos, logits
        of every generated step] -> [baseline: transformers over prompt + that run's own tokens
        (teacher forcing: every step has the same context), else the first run]
        -> [compare] -> [table] -> [failed: exit 1]

Between two runs (no reference) contexts stay equal only up to the first differing token, so
steps after it are not compared. torch and transformers are imported only for --reference.
Polygraphy's comparators run one inference per input dict; this check needs the runtime's own
decode loop (KV cache across steps), which is what it verifies, so it drives the engine instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import manifest as mf
from .errors import QmoeError

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Hello, world! 你好",
    "Mixture-of-experts models route each token to a few experts, so",
    "1, 1, 2, 3, 5, 8, 13,",
    "Once upon a time, in a small village by the sea, there lived",
    "Translate to German: The weather is nice today.",
    "SELECT name FROM users WHERE",
)
BACKEND_OF_TARGET = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}
REFERENCE = "transformers"


class CheckError(QmoeError, ValueError):
    pass


@dataclass(frozen=True)
class Tolerance:
    atol: float  # on logits, max |Δ| over compared steps
    min_top1: float  # fraction of compared steps whose argmax agrees
    greedy: bool  # every row's greedy tokens identical
    median_rel: float | None = None  # median over steps of |Δ|_2 / |baseline|_2 (robust to a few outlier steps)

    def describe(self) -> str:
        greedy = ", greedy tokens identical" if self.greedy else ""
        bound = f"max|Δ| <= {self.atol:g}, " if self.atol != float("inf") else ""
        median = f"median rel. L2 <= {self.median_rel:.0%}, " if self.median_rel is not None else ""
        return f"{bound}{median}top-1 >= {self.min_top1:.0%}{greedy}"


# fp32: both sides compute the same math in fp32; differences are summation order (~1e-6 on the
# tiny model, ~1e-4 on 57B-sized logits). fp16/bf16: per-layer rounding compounds; near-ties in
# the logits flip argmax, so greedy sequences may legitimately diverge and are reported, not required.
TOLERANCES = {
    "float32": Tolerance(atol=1e-3, min_top1=1.0, greedy=True),
    "float16": Tolerance(atol=5e-2, min_top1=0.97, greedy=False),
    "bfloat16": Tolerance(atol=2.5e-1, min_top1=0.93, greedy=False),
    # quantized artifacts with int8 activations (exporter/quantize.py) against transformers holding the
    # same quantized weights: ~1% relative L2 per step on random test models, but rounding activations
    # can flip a near-tied expert choice (seen: a 2.4e-4 gap between the 2nd and 3rd router
    # probabilities), which moves that step's logits by several units: the median step is bounded
    "int8-activations": Tolerance(atol=float("inf"), min_top1=0.9, greedy=False, median_rel=0.03),
}
_PRECISION = ("float32", "float16", "bfloat16", "int8-activations")  # increasing looseness


def _precisions(run: "Run") -> tuple[str, ...]:
    """The run's compute dtype, and int8-activations where its activations are quantized on the fly
    (anywhere: a GPTQ checkpoint's int4 layers may run float ones, its rest quantized int8 not)."""
    q = run.quantization or {}
    int8 = "int8" in (q.get("activations"), (q.get("rest") or {}).get("activations"))
    return (run.dtype, "int8-activations") if int8 else (run.dtype,)


def tolerance_for(*dtypes: str, atol: float | None = None) -> Tolerance:
    """The looser tolerance of the dtypes compared; --atol replaces its logits bound only."""
    dtype = max(dtypes, key=_PRECISION.index)
    t = TOLERANCES[dtype]
    return t if atol is None else Tolerance(atol, t.min_top1, t.greedy, t.median_rel)


@dataclass
class Run:
    label: str
    dtype: str  # compute dtype
    tokens: list[list[int]]  # per prompt, generated ids
    logits: list[np.ndarray]  # per prompt, [steps, V] float32
    quantization: dict | None = None  # the artifact's weight quantization (manifest)
    weight_dtype: str = "float32"  # float tensors as stored (bf16 weights computed in fp32 are still bf16)
    lora: list | None = None  # LoRA adapters merged into the weights (manifest)


@dataclass(frozen=True)
class Comparison:
    run: str
    baseline: str
    steps: int  # compared steps, all rows
    max_abs: float
    median_rel: float
    top1: float
    greedy_rows: int
    rows: int
    tolerance: Tolerance
    failures: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failures


def compare(run: Run, baseline: Run, tolerance: Tolerance, teacher_forced: bool) -> Comparison:
    """`baseline` row logits were computed on the run's own tokens when `teacher_forced`; else
    both generated freely and only steps up to the first differing token share a context."""
    steps, max_abs, agree, greedy, finite = 0, 0.0, 0, 0, True
    rel: list[float] = []
    for toks, lg, btoks, blg in zip(run.tokens, run.logits, baseline.tokens, baseline.logits):
        if teacher_forced:
            n = len(toks)
            same = n == 0 or bool((blg[:n].argmax(-1) == np.asarray(toks)).all())
        else:
            prefix = next((i for i, (a, b) in enumerate(zip(toks, btoks)) if a != b), min(len(toks), len(btoks)))
            n = min(prefix + 1, len(toks), len(btoks))
            same = list(toks) == list(btoks)
        if n:
            a, b = np.asarray(lg[:n], np.float64), np.asarray(blg[:n], np.float64)
            finite = finite and bool(np.isfinite(a).all())
            max_abs = max(max_abs, float(np.nanmax(np.abs(a - b))) if finite else float("inf"))
            rel += list(np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        steps += n
        greedy += same
    rows = len(run.tokens)
    top1 = agree / steps if steps else 1.0
    median_rel = float(np.median(rel)) if rel and finite else (0.0 if finite else float("inf"))
    fails = []
    if not finite:
        fails.append("non-finite logits")
    if not max_abs <= tolerance.atol:
        fails.append(f"max|Δ| {max_abs:.3g} > {tolerance.atol:g}")
    if tolerance.median_rel is not None and not median_rel <= tolerance.median_rel:
        fails.append(f"median rel. L2 {median_rel:.2%} > {tolerance.median_rel:.0%}")
    if top1 < tolerance.min_top1:
        fails.append(f"top-1 {top1:.1%} < {tolerance.min_top1:.0%}")
    if tolerance.greedy and greedy < rows:
        fails.append(f"greedy tokens differ in {rows - greedy}/{rows} rows")
    return Comparison(run.label, baseline.label, steps, max_abs, median_rel, top1, greedy, rows, tolerance,
                      tuple(fails))


@dataclass
class Report:
    prompt_lengths: list[int]
    max_new_tokens: int
    comparisons: list[Comparison] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def table(self) -> str:
        lo, hi = min(self.prompt_lengths), max(self.prompt_lengths)
        head = [f"{len(self.prompt_lengths)} prompts ({lo}-{hi} tokens), {self.max_new_tokens} greedy steps each"]
        head += [f"skipped {s}" for s in self.skipped]
        cols = ("run", "baseline", "steps", "max|Δ logits|", "median rel. L2", "top-1", "greedy rows", "result")
        rows = [cols] + [(c.run, c.baseline, str(c.steps), f"{c.max_abs:.3g}", f"{c.median_rel:.2g}", f"{c.top1:.1%}",
                          f"{c.greedy_rows}/{c.rows}", "ok" if c.ok else "FAIL: " + "; ".join(c.failures))
                         for c in self.comparisons]
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols) - 1)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        tol = sorted({c.tolerance.describe() for c in self.comparisons})
        return "\n".join(head + lines + [f"tolerance: {t}" for t in tol])


# --- running -----------------------------------------------------------------------------------

def backend_available(name: str) -> str | None:
    """None when `name` can run here, else why not (one line)."""
    if name == "tensorrt":
        from .trt import INSTALL_HINT, available

        return None if available() else f"TensorRT or cuda-python is not installed ({INSTALL_HINT})"
    return None


def plan_runs(artifacts: Sequence[Path], backends: Sequence[str] | None) -> tuple[list[tuple[Path, str]], list[str]]:
    """(artifact, backend) pairs to run and the skipped ones with reasons. An artifact runs on the
    backend of its export target; a backend named in `backends` must run, or it is an error."""
    manifests = [(Path(a), mf.read(a)) for a in artifacts]
    for b in backends or ():
        if b not in BACKEND_OF_TARGET.values():
            raise CheckError(f"unknown backend {b!r}; choose from: {', '.join(BACKEND_OF_TARGET.values())}")
        if not any(BACKEND_OF_TARGET[m.target] == b for _, m in manifests):
            raise CheckError(f"backend {b}: none of the artifacts was exported for it "
                             f"(`qmoe export ... --target {b}`)")
        reason = backend_available(b)
        if reason:
            raise CheckError(f"backend {b} is not available: {reason}")
    runs, skipped = [], []
    for path, m in manifests:
        b = BACKEND_OF_TARGET[m.target]
        if backends and b not in backends:
            continue
        reason = backend_available(b)
        if reason:
            skipped.append(f"{b} ({path.name}): {reason}")
        else:
            runs.append((path, b))
    return runs, skipped


def prompt_ids(tokenizer_dir: Path, n: int, vocab_size: int) -> list[list[int]]:
    from .tokenizer import Tokenizer

    if n < 1:
        raise CheckError(f"--prompts must be >= 1, got {n}")
    tok = Tokenizer.from_dir(tokenizer_dir)
    texts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(n)]
    ids = [tok.encode(t) for t in texts]
    if any(t >= vocab_size for x in ids for t in x):
        raise CheckError(f"{tokenizer_dir}: tokenizer ids exceed the model's vocab_size {vocab_size}")
    return ids


def generate(artifact: Path, backend: str, prompts: list[list[int]], max_new_tokens: int, device: str) -> Run:
    from .engine import load
    from .sampling import SamplingParams

    engine = load(artifact, backend=backend, device=device)
    rope = "static" if engine.config.rope_scaling is not None else "none"  # what transformers does
    results = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
                              rope_mode=rope, output_logits=True)
    return Run(f"{backend} ({artifact.name})", engine.manifest.compute_dtype, [r.tokens for r in results],
               [np.stack(r.logits) if r.logits else np.zeros((0, engine.config.vocab_size), np.float32)
                for r in results], engine.manifest.quantization, engine.manifest.weight_dtype, engine.manifest.lora)


def transformers_logits(checkpoint: Path, quantization: dict | None = None, scale_dtype: str = "float32",
                        weight_dtype: str = "float32",
                        lora: Sequence[str | Path] = ()) -> Callable[[list[int], list[int]], np.ndarray]:
    """f(prompt, tokens) -> [len(tokens), V]: row t predicts tokens[t] from prompt + tokens[:t],
    from one full-sequence forward of transformers' model in fp32 (no cache involved). The model
    holds the values the artifact holds, so the check measures the runtime, not the storage:
    float weights rounded to `weight_dtype` (a bf16 artifact of an fp32 checkpoint, computed in
    fp32), and with `quantization` (the manifest's entry) the quantized weights as quantized, with
    scales rounded to `scale_dtype`. `lora`: adapter folders merged into the float weights first,
    as the exporter merges them (exporter/lora.py)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise CheckError(f"--reference needs torch and transformers ({e.name} missing): "
                         "pip install 'qmoe[export,test]'") from None
    from exporter.checkpoint import Checkpoint

    ckpt = Checkpoint(checkpoint)
    adapters = ckpt.lora_adapters(lora)  # merged below, not into the GPTQ copy
    if ckpt.gptq is not None:  # transformers reads GPTQ only through a GPU kernel package: dequantize here
        import tempfile

        from exporter.gptq import write_dequantized

        with tempfile.TemporaryDirectory(prefix="qmoe-gptq-") as tmp:
            write_dequantized(ckpt, Path(tmp), getattr(np, scale_dtype))
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                                      local_files_only=True).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                                                  local_files_only=True).eval()
    if adapters is not None:
        from exporter.lora import merge_into

        merge_into(model, adapters)
    from exporter.quantize import QuantConfig, fake_quantize_hf, hf_block

    qc = None  # quantized here, round to nearest: all of a float checkpoint, or what GPTQ kept float
    if quantization is not None:
        qc = QuantConfig.from_json(quantization)
        qc = qc.rest if ckpt.gptq is not None else qc

    def is_gptq(name: str) -> bool:
        return ckpt.gptq is not None and ckpt.is_gptq(_checkpoint_name(name))

    if weight_dtype != "float32":
        with torch.no_grad():
            for name, p in model.named_parameters():  # a tied tensor once, under its first name
                quantized = is_gptq(name) or qc is not None and hf_block(name, tuple(p.shape), qc) is not None
                if not quantized:  # quantized ones: as the checkpoint holds them
                    p.copy_(p.to(getattr(torch, weight_dtype)).float())
    if qc is not None:
        fake_quantize_hf(model, qc, getattr(torch, scale_dtype), skip=is_gptq)

    def logits(prompt: list[int], tokens: list[int]) -> np.ndarray:
        if not tokens:
            return np.zeros((0, model.config.vocab_size), np.float32)
        ids = torch.tensor([prompt + tokens[:-1]])
        with torch.no_grad():
            out = model(input_ids=ids).logits[0, len(prompt) - 1:]  # [T, V]
        return out.float().numpy()

    return logits


def _checkpoint_name(hf_name: str) -> str:
    """A transformers parameter's checkpoint weight name (its first expert's for fused experts)."""
    for fused, one in ((".mlp.experts.gate_up_proj", ".mlp.experts.0.gate_proj.weight"),
                       (".mlp.experts.down_proj", ".mlp.experts.0.down_proj.weight")):
        if hf_name.endswith(fused):
            return hf_name[: -len(fused)] + one
    return hf_name


def _same_quantization(artifact: Path, q: dict | None, reference: Path, gptq) -> None:
    """A GPTQ artifact is compared with its GPTQ checkpoint (dequantized), any other with a float
    checkpoint (quantized here as the artifact was): otherwise the reference would hold other
    weights and the comparison would measure the quantization, not the runtime."""
    method = None if q is None else q.get("method", "rtn")
    if method in ("gptq", "awq") and (gptq is None or gptq.method != method):
        raise CheckError(f"{artifact} holds {method.upper()} weights, but {reference} is not a {method.upper()} "
                         "checkpoint; give the checkpoint it was exported from as --reference")
    if gptq is None:
        return
    if method != gptq.method:
        what = "float weights" if q is None else "weights quantized by qmoe export --quantize (round to nearest)"
        raise CheckError(f"{reference} is a {gptq.label} checkpoint, but {artifact} holds {what}; give the checkpoint "
                         "it was exported from as --reference")
    assert q is not None
    if (q["bits"], q["block_size"]) != (gptq.bits, gptq.group_size):
        raise CheckError(f"{artifact} holds {q['bits']}-bit {gptq.label} weights in groups of {q['block_size']}, but "
                         f"{reference} is {gptq.bits}-bit with group_size {gptq.group_size}; give the checkpoint it "
                         "was exported from as --reference")


def lora_dirs(artifact: Path, lora: list | None) -> list[str]:
    """The adapter files an artifact's manifest records, each still holding the adapter it was
    exported with (same sha256), so that the reference merges what the artifact merged (that file,
    not whichever weights file its folder now holds first)."""
    dirs = []
    for a in lora or []:
        f = Path(a["path"]) / a.get("file", "adapter_model.safetensors")
        try:
            digest = mf.sha256(f)
        except OSError as e:
            raise CheckError(f"{artifact} merged the LoRA adapter {a['path']}, which cannot be read now ({e.strerror}); "
                             "--reference needs it") from None
        if digest != a["sha256"]:
            raise CheckError(f"{artifact} merged the LoRA adapter {a['path']}, whose {f.name} has changed since the "
                             "export; re-export, or restore the adapter")
        dirs.append(str(f))
    return dirs


def check(artifacts: Sequence[str | Path], backends: Sequence[str] | None = None, reference: str | Path | None = None,
          prompts: int = 4, max_new_tokens: int = 16, atol: float | None = None, device: str = "auto",
          progress: Callable[[str], None] | None = None) -> Report:
    say = progress or (lambda _m: None)
    if not artifacts:
        raise CheckError("give at least one artifact folder")
    if max_new_tokens < 1:
        raise CheckError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    ref_gptq = None
    if reference is not None:  # before any run: a local checkpoint folder, never a hub id
        from exporter.checkpoint import Checkpoint

        ref_ckpt = Checkpoint(reference)  # one-line CheckpointError for a missing or broken folder
        ref_gptq = ref_ckpt.gptq
        ref_ckpt.close()
    plan, skipped = plan_runs([Path(a) for a in artifacts], backends)
    manifests = {p: mf.read(p) for p, _ in plan}
    adapters: dict[Path, list[str]] = {}  # artifact -> the adapter files its reference merges (hashed once)
    if reference is not None:  # before any run: the reference holds the artifacts' kind of weights
        for p, m in manifests.items():
            _same_quantization(p, m.quantization, Path(reference), ref_gptq)
            adapters[p] = lora_dirs(p, m.lora)
    if reference is None:  # before any run: the weights must be the same (activations may differ)
        if len({tuple(sorted(a["sha256"] for a in m.lora or [])) for m in manifests.values()}) > 1:  # deltas add up
            raise CheckError("the artifacts merged different LoRA adapters, so their weights differ; compare each "
                             "with --reference CHECKPOINT_DIR instead")
        kinds = {None if q is None else (q["bits"], q["block_size"], q.get("method", "rtn"),
                                         None if q.get("rest") is None else (q["rest"]["bits"], q["rest"]["block_size"]))
                 for q in (m.quantization for m in manifests.values())}
        if len(kinds) > 1:
            raise CheckError("the artifacts hold differently quantized weights, so their logits differ by the "
                             "quantization error; compare each with --reference CHECKPOINT_DIR instead")
    if len(plan) + (reference is not None) < 2:
        what = "; ".join(skipped) if skipped else "one run and no --reference"
        raise CheckError(f"nothing to compare ({what}); give --reference CHECKPOINT_DIR or another artifact")
    first = manifests[plan[0][0]] if plan else mf.read(artifacts[0])
    ids = prompt_ids(plan[0][0] if plan else Path(artifacts[0]), prompts, first.config.vocab_size)
    runs = []
    for path, b in plan:
        say(f"running {b} on {path}")
        runs.append(generate(path, b, ids, max_new_tokens, device))
    report = Report([len(x) for x in ids], max_new_tokens, skipped=skipped)
    if reference is not None:
        refs: dict[str, Callable] = {}
        for (path, _), run in zip(plan, runs):
            q = run.quantization
            gptq = f"{q['method'].upper()} " if q is not None and q.get("method") in ("gptq", "awq") else ""
            parts = [] if q is None else [f"{gptq}{q['scheme']} weights, block {q['block_size']}, {run.dtype} scales"]
            rest = None if q is None else q.get("rest")
            parts += [] if rest is None else [f"the rest {rest['scheme']}, block {rest['block_size']}"]
            parts += [] if run.weight_dtype == "float32" else [f"{run.weight_dtype} float weights"]
            parts += [f"LoRA {Path(a['path']).name} {a['sha256'][:8]}" for a in run.lora or []]
            key = ", ".join(parts)
            if key not in refs:
                say(f"running transformers on {reference}" + (f" ({key})" if key else ""))
                refs[key] = transformers_logits(Path(reference), q, run.dtype, run.weight_dtype, adapters[path])
            ref = refs[key]
            label = f"{REFERENCE} ({key})" if key else REFERENCE
            base = Run(label, "float32", [list(t) for t in run.tokens],
                       [ref(p, t) for p, t in zip(ids, run.tokens)])
            if base.logits and base.logits[0].shape[-1] != run.logits[0].shape[-1]:
                raise CheckError(f"{reference}: vocab size {base.logits[0].shape[-1]} differs from the artifact's "
                                 f"{run.logits[0].shape[-1]}")
            report.comparisons.append(compare(run, base, tolerance_for(*_precisions(run), atol=atol),
                                              teacher_forced=True))
    else:
        for run in runs[1:]:
            # float weights stored in different dtypes: the looser one's tolerance too
            stored = (run.weight_dtype, runs[0].weight_dtype) if run.weight_dtype != runs[0].weight_dtype else ()
            report.comparisons.append(compare(run, runs[0], tolerance_for(*_precisions(run), *_precisions(runs[0]),
                                                                          *stored, atol=atol),
                                              teacher_forced=False))
    return report
