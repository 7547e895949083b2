"""Weight-only int4/int8 artifacts (exporter/quantize.py) on ONNX Runtime's CPU kernels.

References: the quantizer against numpy (its own unpacking and the scheme's error bound); the
artifact against transformers' Qwen2MoeForCausalLM holding the same quantized weights (fp32:
logits max |delta| <= 1e-4 at every prompt position, 16 greedy steps identical; fp16 compute:
<= 5e-2; int8 activations: median relative L2 over positions <= 3%, top-1 >= 90%); against the float
model only the size of the quantization error is bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import runtime
from exporter.export import ExportError, export
from exporter.quantize import QuantConfig, QuantizeError, dequantize_rows, fake_quantize_hf, quantize_rows
from exporter.tiny import tiny_config, write_checkpoint
from runtime import check as chk
from runtime import manifest as mf
from runtime.sampling import SamplingParams
from tests.helpers import check_quantized_parity, hf_model, prompt_logits

PROMPTS = [[9707, 11, 1879, 0, 220, 108386], [151644, 872, 198], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


def _np_unpack(q: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The documented layout, written independently: low nibble first, zero point 2^(bits-1)."""
    if bits == 4:
        vals = np.empty((q.shape[0], q.shape[1] * 2), np.int32)
        vals[:, 0::2], vals[:, 1::2] = q & 0xF, q >> 4
    else:
        vals = q.astype(np.int32)
    nb = scales.shape[1]
    w = (vals - (1 << (bits - 1))).reshape(q.shape[0], nb, -1) * scales[:, :, None].astype(np.float64)
    return w.reshape(q.shape[0], -1)[:, :k]


@pytest.mark.parametrize("bits,block,k", [(4, 32, 96), (4, 16, 80), (4, 128, 200), (8, 32, 96), (8, 64, 75)])
def test_quantizer_layout_and_error_bound(bits, block, k):
    g = torch.Generator().manual_seed(bits * 1000 + block + k)
    w = torch.randn(37, k, generator=g) * torch.logspace(-3, 1, 37).unsqueeze(1)  # rows of very different sizes
    w[3] = 0.0  # an all-zero row: scale 1, not a division by zero
    q, s = quantize_rows(w, bits, block)
    nb = -(-k // block)
    assert q.dtype == torch.uint8 and q.shape == (37, nb * block * bits // 8) and s.shape == (37, nb)
    deq = _np_unpack(q.numpy(), s.numpy(), bits, k)
    assert np.allclose(deq, dequantize_rows(q, s, bits, block, k).numpy(), rtol=0, atol=1e-6)
    # symmetric rounding: every weight within half a step, the block's extreme exactly representable
    step = np.repeat(np.abs(s.numpy()), block, axis=1)[:, :k]
    err = np.abs(deq - w.numpy().astype(np.float64))
    # values of the other sign within half a step of the block's extreme clamp at +2^(b-1)-1: within one step
    assert (err <= step * 0.5 + 1e-6 * step).mean() > 0.99 and (err <= step + 1e-7).all()
    assert np.all(deq[3] == 0)
    ext = np.abs(w.numpy()).max(axis=1)
    assert np.allclose(np.abs(deq).max(axis=1), ext, rtol=1e-6)


def test_quant_config_rejects_bad_values():
    with pytest.raises(QuantizeError, match="unknown quantization"):
        QuantConfig.parse("int3")
    with pytest.raises(QuantizeError, match="block size"):
        QuantConfig.parse("int4", 48)
    with pytest.raises(QuantizeError, match="int8 activations"):
        QuantConfig.parse("int8", activations="float")
    assert QuantConfig.parse("int4") == QuantConfig(4, 32, "float")
    assert QuantConfig.parse("int8") == QuantConfig(8, 32, "int8")


VARIANTS = {
    "default": {},  # untied, qkv bias, GQA 4/2, 8 experts top-2
    # tied embeddings (one weight quantized for the gather and the head), renormalised top-k, a dense
    # layer; intermediate sizes of 80 leave a last partial block of 16 in MatMulNBits (K padded)
    "tied_dense": dict(norm_topk_prob=True, tie_word_embeddings=True, mlp_only_layers=[1], num_hidden_layers=3,
                       hidden_size=128, num_attention_heads=8, num_key_value_heads=2, num_experts=6,
                       num_experts_per_tok=3, intermediate_size=80, shared_expert_intermediate_size=80),
}
VARIANTS["tied_dense_bf16"] = VARIANTS["tied_dense"]  # a bf16 checkpoint, as Qwen2-57B ships
# (variant, scheme, activations, dtype)
CASES = [("default", "int4", "float", "float32"), ("default", "int8", "int8", "float32"),
         ("tied_dense", "int4", "float", "float32"), ("tied_dense_bf16", "int8", "int8", "bfloat16"),
         ("default", "int4", "float", "float16"), ("tied_dense", "int4", "int8", "float32")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qck")
    return {name: write_checkpoint(root / name, tiny_config(**kw), seed=5,
                                   dtype="bfloat16" if name.endswith("bf16") else "float32")
            for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def case(request, checkpoints, tmp_path_factory):
    variant, scheme, act, dtype = request.param
    ck = checkpoints[variant]
    art = export(ck, tmp_path_factory.mktemp("qart") / "art", quantize=scheme, quant_activations=act, dtype=dtype)
    return ck, art, QuantConfig.parse(scheme, activations=act), dtype


def _quantized_reference(ck: Path, qc: QuantConfig, compute: str):
    model = hf_model(ck)
    n = fake_quantize_hf(model, qc, torch.float16 if compute == "float16" else torch.float32)
    assert n > 0
    return model


def test_graph_uses_quantized_ops(case):
    ck, art, qc, dtype = case
    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    c = runtime.load(art).config
    sparse = sum(c.is_sparse_layer(i) for i in range(c.num_hidden_layers))
    assert ops.count("QMoE") == sparse and "MoE" not in ops
    whole_blocks = c.hidden_size % qc.block_size == 0  # else the embeddings stay float (GatherBlockQuantized)
    assert ops.count("GatherBlockQuantized") == int(whole_blocks) and ops.count("Gather") == int(not whole_blocks)
    # 4 attention projections a layer, 2 shared-expert (or 3 dense-MLP) linears, the head
    assert ops.count("MatMulNBits") == 4 * c.num_hidden_layers + 2 * sparse + 3 * (c.num_hidden_layers - sparse) + 1
    # left as Gemm: the router and the shared-expert gate of each sparse layer
    assert ops.count("Gemm") == 2 * sparse
    names = {i.name for i in m.graph.initializer}
    gone = ("q_proj.weight", "experts.gate_up", "lm_head.weight") + (("embed_tokens.weight",) if whole_blocks else ())
    assert not any(n.endswith(gone) for n in names)
    q = mf.read(art).quantization
    assert q == qc.to_json()
    # against the checkpoint's size in float32
    limit = (0.2 if qc.bits == 4 else 0.35) if whole_blocks else 0.8
    if c.tie_word_embeddings:  # the head reads the embeddings' quantized bytes, not a copy
        gather_q, head_q = (next(i for i in m.graph.initializer if i.name == f"model.embed_tokens.weight{r}.q{qc.bits}")
                            for r in (".gather", ""))
        assert gather_q.external_data == head_q.external_data
    fp32_bytes = sum(f.stat().st_size for f in ck.glob("*.safetensors")) * (2 if ck.name.endswith("bf16") else 1)
    assert (art / "model.onnx.data").stat().st_size < limit * fp32_bytes


def test_logits_match_transformers_with_the_same_quantized_weights(case):
    ck, art, qc, dtype = case
    engine = runtime.load(art)
    ref = _quantized_reference(ck, qc, engine.manifest.compute_dtype)
    check_quantized_parity(engine, ref, PROMPTS, qc.activations == "int8")


def test_quantization_error_against_the_float_model(case):
    """Informative bound, not parity: quantized logits stay near the float model's (int8 much
    nearer than int4), and the quantized reference is not the float model (the test can tell)."""
    ck, art, qc, dtype = case
    engine = runtime.load(art)
    with torch.no_grad():
        float_logits = hf_model(ck)(torch.tensor([PROMPTS[0]])).logits[0, -1].numpy()
    got = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=1), output_logits=True)[0].logits[0]
    rel = np.linalg.norm(got - float_logits) / np.linalg.norm(float_logits)
    assert 1e-4 < rel < (0.05 if qc.bits == 8 else 0.3), rel


def test_check_command_compares_with_the_quantized_reference(case):
    ck, art, qc, dtype = case
    report = chk.check([art], reference=ck, prompts=2, max_new_tokens=4)
    assert report.ok, report.table()
    assert f"int{qc.bits} weights" in report.table()


def test_check_refuses_mixing_quantized_and_float_runs(checkpoints, tmp_path):
    ck = checkpoints["default"]
    a = export(ck, tmp_path / "f")
    b = export(ck, tmp_path / "q", quantize="int8")
    with pytest.raises(chk.CheckError, match="differently quantized"):
        chk.check([a, b], prompts=1, max_new_tokens=2)
    # the same int4 weights with float and with int8 activations compare, at the int8-activations tolerance
    c = export(ck, tmp_path / "q4", quantize="int4")
    d = export(ck, tmp_path / "q4a8", quantize="int4", quant_activations="int8")
    report = chk.check([c, d], prompts=1, max_new_tokens=2)
    assert report.ok and report.comparisons[0].tolerance == chk.TOLERANCES["int8-activations"], report.table()
    # refused before anything runs (a 57B run is long): the manifests tell
    said: list[str] = []
    with pytest.raises(chk.CheckError, match="differently quantized"):
        chk.check([c, a], prompts=1, max_new_tokens=2, progress=said.append)
    assert not said


def test_check_holds_bf16_weights_to_the_fp32_tolerance(checkpoints, tmp_path):
    """bf16 weights computed in fp32, from an fp32 checkpoint: the reference rounds its float weights
    the same way, so the strict fp32 tolerance applies (float and int4 artifacts)."""
    ck = checkpoints["default"]
    arts = [export(ck, tmp_path / "bf16", dtype="bfloat16"),
            export(ck, tmp_path / "bf16q4", dtype="bfloat16", quantize="int4")]
    report = chk.check(arts, reference=ck, prompts=2, max_new_tokens=4)
    assert report.ok, report.table()
    assert all(c.tolerance == chk.TOLERANCES["float32"] and c.max_abs < 1e-4 for c in report.comparisons)
    assert "bfloat16 float weights" in report.table()


def test_check_builds_one_reference_per_quantization(checkpoints, tmp_path):
    """Two block sizes: each artifact meets the reference quantized with its own blocks."""
    ck = checkpoints["default"]
    arts = [export(ck, tmp_path / f"b{b}", quantize="int4", quant_block_size=b) for b in (16, 32)]
    report = chk.check(arts, reference=ck, prompts=1, max_new_tokens=3)
    assert report.ok and len(report.comparisons) == 2, report.table()
    assert "block 16" in report.table() and "block 32" in report.table()


def test_linked_weights_with_quantization(checkpoints, tmp_path):
    """--link-weights: the float tensors stay in the (bf16) shards, the packed ones in model.onnx.data."""
    ck = checkpoints["tied_dense_bf16"]
    art = export(ck, tmp_path / "q", quantize="int4", dtype="bfloat16", link_weights=True)
    assert (art / "model.onnx.data").is_file() and any(f.suffix == ".safetensors" for f in art.iterdir())
    qc = QuantConfig.parse("int4")
    engine = runtime.load(art)
    got = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=1), output_logits=True)[0].logits[0]
    with torch.no_grad():
        want = _quantized_reference(ck, qc, "float32")(torch.tensor([PROMPTS[0]])).logits[0, -1].numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_export_refuses_bad_quantization_requests(checkpoints, tmp_path):
    ck = checkpoints["default"]
    with pytest.raises(ExportError, match="onnxruntime target"):
        export(ck, tmp_path / "a", target="tensorrt", quantize="int4")
    with pytest.raises(ExportError, match="need --quantize"):
        export(ck, tmp_path / "b", quant_block_size=32)
    with pytest.raises(QuantizeError, match="multiple of the quantization block"):
        export(ck, tmp_path / "c", quantize="int4", quant_block_size=64)  # moe_intermediate_size 32
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_shared_expert_of_size_zero_and_block_size_types(tmp_path):
    ck = write_checkpoint(tmp_path / "ck", tiny_config(shared_expert_intermediate_size=0), seed=2)
    art = export(ck, tmp_path / "q", quantize="int4")
    engine = runtime.load(art)
    got = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=1), output_logits=True)[0].logits[0]
    with torch.no_grad():
        want = _quantized_reference(ck, QuantConfig.parse("int4"), "float32")(torch.tensor([PROMPTS[1]])).logits[0, -1]
    assert np.abs(got - want.numpy()).max() <= 1e-4
    for bad in (32.0, "32", True):
        with pytest.raises(QuantizeError, match="block size"):
            QuantConfig.parse("int4", bad)
    assert QuantConfig.parse("int4", np.int64(16)).block_size == 16


def test_manifest_rejects_a_malformed_quantization_entry(checkpoints, tmp_path):
    art = export(checkpoints["default"], tmp_path / "q", quantize="int4")
    d = json.loads((art / mf.NAME).read_text())
    for field, value in (("bits", 3), ("bits", 8), ("bits", 4.0), ("block_size", 48), ("block_size", 32.0),
                         ("activations", "fp8")):
        bad = json.loads(json.dumps(d))
        bad["quantization"][field] = value
        (art / mf.NAME).write_text(json.dumps(bad))
        with pytest.raises(mf.ManifestError, match="quantization"):
            mf.read(art)
    d["quantization"].update(scheme="int8", bits=8, activations="float")  # a combination export refuses
    (art / mf.NAME).write_text(json.dumps(d))
    with pytest.raises(mf.ManifestError, match="quantization"):
        mf.read(art)


def test_cli_exports_runs_and_checks_an_int4_artifact(tiny_checkpoint, tmp_path):
    from tests.runtime.test_cli import qmoe

    art = tmp_path / "int4"
    r = qmoe("export", tiny_checkpoint, "-o", art, "--quantize", "int4", "--quant-block-size", "16")
    assert r.returncode == 0, r.stderr
    assert mf.read(art).quantization["block_size"] == 16
    r = qmoe("run", art, "--prompt", "Hello", "-n", "4", "--raw")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = qmoe("check", art, "--reference", tiny_checkpoint, "--prompts", "1", "--max-new-tokens", "3")
    assert r.returncode == 0 and "int4 weights" in r.stdout, r.stdout + r.stderr
    # bad requests: one line, non-zero, nothing written
    for args, words in ((("--quantize", "int4", "--target", "tensorrt"), "onnxruntime target"),
                        (("--quant-block-size", "32"), "need --quantize"),
                        (("--quantize", "int8", "--quant-activations", "float"), "int8 activations"),
                        (("--quantize", "int4", "--quant-block-size", "64"), "multiple of the quantization block"),
                        (("--quantize", "int2"), "int2")):
        out = tmp_path / "bad"
        r = qmoe("export", tiny_checkpoint, "-o", out, *args)
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists()


def test_ragged_batch_and_chunked_prefill_agree_with_solo_runs(checkpoints, tmp_path):
    """QMoE and MatMulNBits in the runtime's batching and chunking paths: fp32 logits within 1e-4."""
    art = export(checkpoints["default"], tmp_path / "q", quantize="int4")
    p = SamplingParams(max_new_tokens=4, ignore_eos=True)
    solo = [runtime.load(art).generate([x], p, output_logits=True)[0] for x in PROMPTS]
    for engine in (runtime.load(art), runtime.load(art, prefill_chunk=4)):
        for one, r in zip(solo, engine.generate(PROMPTS, p, output_logits=True)):
            assert r.tokens == one.tokens
            assert np.abs(np.stack(r.logits) - np.stack(one.logits)).max() <= 1e-4
