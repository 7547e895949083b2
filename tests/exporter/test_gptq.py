"""GPTQ checkpoints (exporter/gptq.py) exported for ONNX Runtime and run on its CPU kernels.

The GPTQ checkpoints here are written by this file's own packer, which follows AutoGPTQ's
QuantLinear.pack (qweight words along the input dimension, qzeros along the output dimension,
low bits first, zero points stored minus one in the v1 format) and its Quantizer's min/max
parameters (sym: zero point 2^(b-1)). The reference is transformers' Qwen2MoeForCausalLM holding
(q - z) * s computed from the integers before packing, so an unpacking mistake in the exporter
cannot hide in the reference. Tolerances: fp32 compute, logits max |delta| <= 1e-4 at every prompt
position and 16 greedy steps identical; fp16 compute <= 5e-2; int8 activations (8-bit GPTQ):
median relative L2 <= 3%, top-1 >= 90% (as tests/exporter/test_quantize.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

import runtime
from exporter.checkpoint import Checkpoint, CheckpointError
from exporter.export import ExportError, export
from exporter.gptq import GptqError
from exporter.tiny import tiny_config, write_checkpoint
from runtime import check as chk
from runtime.errors import QmoeError
from runtime import manifest as mf
from runtime.cli import main
from tests.helpers import check_quantized_parity, hf_model, prompt_logits

PROMPTS = [[9707, 11, 1879, 0, 220, 108386], [151644, 872, 198], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


# -- an independent GPTQ writer ------------------------------------------------------------------

def gptq_quantize(w: np.ndarray, bits: int, group: int, sym: bool):
    """GPTQ's per-group min/max parameters with plain rounding: w [N, K] -> q [N, K], z [N, G],
    s float16 [N, G] with w ~ (q - z) * s."""
    maxq = (1 << bits) - 1
    N, K = w.shape
    G = K // group
    x = w.reshape(N, G, group).astype(np.float64)
    xmin, xmax = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    tiny = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(tiny, -1, xmin), np.where(tiny, 1, xmax)
    s = ((xmax - xmin) / maxq).astype(np.float16)
    z = np.full((N, G), (maxq + 1) // 2) if sym else np.round(-xmin / s.astype(np.float64)).astype(np.int64)
    q = np.clip(np.round(x / s[..., None].astype(np.float64)) + z[..., None], 0, maxq).astype(np.int64)
    return q.reshape(N, K), z, s


def gptq_pack(q: np.ndarray, z: np.ndarray, s: np.ndarray, bits: int, group: int, v1: bool) -> dict:
    """AutoGPTQ's packing: tensors of one QuantLinear (names without the layer prefix)."""
    per = 32 // bits
    N, K = q.shape
    intweight = q.T.astype(np.uint32)  # [K, N]
    qweight = np.zeros((K // per, N), np.uint32)
    for row in range(K // per):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << np.uint32(bits * j)
    zeros = ((z - 1 if v1 else z).T.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint32)  # [G, N]
    qzeros = np.zeros((zeros.shape[0], N // per), np.uint32)
    for col in range(N // per):
        for j in range(per):
            qzeros[:, col] |= zeros[:, col * per + j] << np.uint32(bits * j)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32),
            "scales": np.ascontiguousarray(s.T), "g_idx": (np.arange(K) // group).astype(np.int32)}


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's WQLinear_GEMM.pack: output column of each nibble


def awq_pack(q: np.ndarray, z: np.ndarray, s: np.ndarray) -> dict:
    """AutoAWQ's GEMM packing: eight outputs per word along N, in AWQ_ORDER, zero points as they are."""
    N, K = q.shape
    intweight, zeros = q.T.astype(np.uint32), z.T.astype(np.uint32)  # [K, N], [G, N]
    qweight = np.zeros((K, N // 8), np.uint32)
    qzeros = np.zeros((zeros.shape[0], N // 8), np.uint32)
    for col in range(N // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << np.uint32(4 * i)
            qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER[i]] << np.uint32(4 * i)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": np.ascontiguousarray(s.T)}


QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "gate_proj", "up_proj",
             "down_proj")  # what AutoGPTQ quantizes in Qwen2-MoE layers (not the router or the shared-expert gate)


def make_gptq(float_ck: Path, out: Path, ref: Path, *, bits: int = 4, group: int = 32, sym: bool = True,
              v1: bool = True, extra: tuple[str, ...] = (), shards: int = 2, awq: bool = False) -> Path:
    """`out`: a GPTQ checkpoint of float_ck; `ref`: the float checkpoint of its dequantized weights."""
    ck = Checkpoint(float_ck)
    cfg = json.loads((float_ck / "config.json").read_text())
    names = list(ck.expected_shapes())
    packed: dict[str, np.ndarray] = {}
    dequant: dict[str, np.ndarray] = {}
    for name in names:
        w = ck.tensor(name).float().numpy()
        layer = name.startswith("model.layers.") and name.endswith("_proj.weight")
        if (layer and name.rsplit(".", 2)[-2] in {n.rsplit(".", 1)[-1] for n in QUANTIZED}) or name in extra:
            q, z, s = gptq_quantize(w, bits, group, sym)
            idx = np.arange(w.shape[1]) // group
            dequant[name] = ((q - z[:, idx]) * s[:, idx].astype(np.float32)).astype(np.float32)
            packed_layer = awq_pack(q, z, s) if awq else gptq_pack(q, z, s, bits, group, v1)
            for suffix, t in packed_layer.items():
                packed[f"{name[:-7]}.{suffix}"] = t
        else:
            packed[name] = ck.tensor(name).to(torch.float16).numpy()  # GPTQ checkpoints ship fp16
            dequant[name] = packed[name].astype(np.float32)
    for folder, tensors, quant in ((out, packed, True), (ref, dequant, False)):
        folder.mkdir(parents=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (float_ck / f).exists():
                shutil.copy2(float_ck / f, folder / f)
        c = dict(cfg)
        if quant and awq:
            c["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True,
                                        "version": "GEMM", "modules_to_not_convert": ["gate"]}
        elif quant:
            c["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
                                        "desc_act": False, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
            c["torch_dtype"] = "float16"
        (folder / "config.json").write_text(json.dumps(c))
        keys = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: np.ascontiguousarray(tensors[k]) for k in keys[i::shards]}
            save_file(part, str(folder / fname))
            weight_map.update(dict.fromkeys(part, fname))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


# (variant config, bits, group, sym, v1, extra quantized layers, dtype)
CASES = {
    "int4-sym-v1": (dict(), 4, 32, True, True, (), "float32"),  # Qwen2-57B-A14B-Instruct-GPTQ-Int4's settings
    "int4-asym-v2-dense": (dict(norm_topk_prob=True, mlp_only_layers=[1], num_hidden_layers=3, intermediate_size=96),
                           4, 16, False, False, ("lm_head.weight", "model.layers.0.mlp.gate.weight"), "float32"),
    "int4-asym-v1-fp16": (dict(), 4, 32, False, True, (), "float16"),
    "int8-asym-v1": (dict(), 8, 32, False, True, (), "float32"),
    "awq-int4": (dict(mlp_only_layers=[1], num_hidden_layers=3, intermediate_size=96), 4, 32, False, False, (),
                 "float32"),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory):
    kw, bits, group, sym, v1, extra, dtype = CASES[request.param]
    root = tmp_path_factory.mktemp("gptq")
    float_ck = write_checkpoint(root / "float", tiny_config(**kw), seed=11)
    gq = make_gptq(float_ck, root / "gptq", root / "ref", bits=bits, group=group, sym=sym, v1=v1, extra=extra,
                   awq=request.param.startswith("awq"))
    art = export(gq, root / "art", dtype=dtype)
    return gq, root / "ref", art, bits, extra


def test_graph_carries_the_gptq_layers(case):
    gq, ref, art, bits, extra = case
    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    c = runtime.load(art).config
    sparse = sum(c.is_sparse_layer(i) for i in range(c.num_hidden_layers))
    assert ops.count("QMoE") == sparse and "MoE" not in ops
    # 4 attention projections a layer, 2 shared-expert (or 3 dense-MLP) linears, plus the extra ones
    linears = 4 * c.num_hidden_layers + 2 * sparse + 3 * (c.num_hidden_layers - sparse)
    assert ops.count("MatMulNBits") == linears + len(extra)
    assert ops.count("Gather") == 1 and "GatherBlockQuantized" not in ops  # embeddings stay float
    q = mf.read(art).quantization
    g = Checkpoint(gq).gptq
    assert q["method"] == g.method and q["bits"] == bits and q["block_size"] == g.group_size
    assert q["symmetric"] == g.sym
    zps = [n for n in m.graph.node if n.op_type in ("MatMulNBits", "QMoE")
           and any(i.endswith(".zero_points") for i in n.input)]
    assert len(zps) == (0 if g.sym else ops.count("MatMulNBits") + ops.count("QMoE"))


def test_logits_match_transformers_with_the_dequantized_weights(case):
    gq, ref, art, bits, extra = case
    engine = runtime.load(art)
    # 8-bit weights run with int8 activations (ONNX Runtime's fast path for them)
    check_quantized_parity(engine, hf_model(ref), PROMPTS, bits == 8)


def test_check_command_uses_the_dequantized_gptq_reference(case):
    gq, ref, art, bits, extra = case
    report = chk.check([art], reference=gq, prompts=2, max_new_tokens=4)
    assert report.ok, report.table()
    assert f"{Checkpoint(gq).gptq.label} int{bits} weights" in report.table()


def test_the_reference_is_not_the_float_model(case, tmp_path):
    """The dequantized reference differs from the float checkpoint by GPTQ's rounding: a test that
    compared the artifact with the float model could not tell quantized weights from float ones."""
    gq, ref, art, bits, extra = case
    float_logits = prompt_logits(runtime.load(export(gq.parent / "float", tmp_path / "f")), PROMPTS[0])
    got = prompt_logits(runtime.load(art), PROMPTS[0])
    rel = np.linalg.norm(got - float_logits) / np.linalg.norm(float_logits)
    assert 1e-4 < rel < (0.05 if bits == 8 else 0.5), rel


@pytest.fixture(scope="module")
def gptq_ck(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gq1")
    float_ck = write_checkpoint(root / "float", tiny_config(), seed=3)
    return make_gptq(float_ck, root / "gptq", root / "ref", shards=1)


def _edit_config(src: Path, dst: Path, **quant) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"].update(quant)
    for k, v in quant.items():
        if v is None:
            del cfg["quantization_config"][k]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _edit_tensors(ck: Path, edit) -> None:
    """edit(tensors) changes the one shard's tensors in place; the index follows."""
    from safetensors.numpy import load_file

    f = next(ck.glob("*.safetensors"))
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(
        tensors, f.name)}))


def _rewrite_tensor(ck: Path, name: str, fn) -> None:
    def edit(tensors):
        tensors[name] = fn(tensors[name])
    _edit_tensors(ck, edit)


@pytest.mark.parametrize("quant,match", [
    (dict(bits=3), "GPTQ bits is 3"),
    (dict(group_size=-1), "per-channel"),
    (dict(group_size=48), "group_size 48"),
    (dict(quant_method="bitsandbytes"), "quant_method is 'bitsandbytes'"),
    (dict(quant_method="awq", version="gemv"), "AWQ version 'gemv' is not supported"),
    (dict(quant_method="awq", zero_point=False), "AWQ without zero points"),
    (dict(quant_method="awq", bits=8), "AWQ bits is 8"),
    (dict(quant_method="awq"), r"q_proj.qweight is I32 \[8, 64\]; 4-bit AWQ with group_size 32 and config.json imply "
                               r"I32 \[64, 8\]"),
    (dict(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
    (dict(pack_dtype="int8"), "pack_dtype 'int8'"),
    (dict(dynamic={r"-:.*down_proj": {}}), "'dynamic'"),
    (dict(sym="yes"), "sym and desc_act must be true or false"),
    (dict(group_size=16), r"q_proj.qzeros is I32 \[2, 8\]; 4-bit GPTQ with group_size 16 and config.json imply I32 "
                          r"\[4, 8\]"),
])
def test_unsupported_or_inconsistent_gptq_configs_get_one_line_errors(gptq_ck, tmp_path, quant, match):
    ck = _edit_config(gptq_ck, tmp_path / "ck", **quant)
    with pytest.raises((GptqError, CheckpointError), match=match):
        export(ck, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_act_order_and_wrapped_zero_points_are_refused(gptq_ck, tmp_path):
    ck = tmp_path / "act"
    shutil.copytree(gptq_ck, ck)
    name = "model.layers.0.self_attn.q_proj.g_idx"
    _rewrite_tensor(ck, name, lambda g: np.ascontiguousarray(g[::-1]))
    with pytest.raises(GptqError, match="act-order"):
        export(ck, tmp_path / "a1")
    # a v1 zero point of 0 stored as -1 reads back as 16 (AutoGPTQ's kernels do so): not 4 bits
    ck2 = _edit_config(gptq_ck, tmp_path / "wrap", sym=False)
    _rewrite_tensor(ck2, "model.layers.0.self_attn.o_proj.qzeros", lambda z: np.full_like(z, -1))
    with pytest.raises(GptqError, match="zero point of 16"):
        export(ck2, tmp_path / "a2")
    # sym=true with zero points other than 8 is an inconsistent checkpoint
    ck3 = tmp_path / "sym"
    shutil.copytree(gptq_ck, ck3)
    _rewrite_tensor(ck3, "model.layers.0.self_attn.o_proj.qzeros", lambda z: np.zeros_like(z))
    with pytest.raises(GptqError, match="sym=true"):
        export(ck3, tmp_path / "a3")
    for d in ("a1", "a2", "a3"):
        assert not (tmp_path / d).exists()


def test_missing_or_misshapen_gptq_tensors(gptq_ck, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(gptq_ck, ck)
    _edit_tensors(ck, lambda t: t.pop("model.layers.1.mlp.experts.3.down_proj.qzeros"))
    with pytest.raises(CheckpointError, match=r"experts.3.down_proj.qzeros not found .*GPTQ layer"):
        Checkpoint(ck)
    ck2 = tmp_path / "ck2"
    shutil.copytree(gptq_ck, ck2)
    _rewrite_tensor(ck2, "model.layers.0.self_attn.k_proj.qweight", lambda q: q[:-1])
    with pytest.raises(CheckpointError, match=r"k_proj.qweight is I32 \[7, 32\].*imply I32 \[8, 32\]"):
        Checkpoint(ck2)
    # a float checkpoint's weight stored as int32 is not a weight
    ck3 = tmp_path / "ck3"
    shutil.copytree(gptq_ck, ck3)
    _rewrite_tensor(ck3, "model.norm.weight", lambda w: w.astype(np.int32))
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype I32"):
        Checkpoint(ck3)


def test_mixed_expert_layers_are_refused(gptq_ck, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(gptq_ck, ck)
    base = "model.layers.0.mlp.experts.2.up_proj"

    def edit(tensors):
        for s in ("qweight", "qzeros", "scales", "g_idx"):
            del tensors[f"{base}.{s}"]
        tensors[f"{base}.weight"] = np.zeros((32, 64), np.float16)
    _edit_tensors(ck, edit)
    with pytest.raises(GptqError, match=r"experts.gate_up mixes GPTQ and float layers \(.*experts.2.up_proj is float"):
        export(ck, tmp_path / "art")


def test_gptq_export_options(gptq_ck, tmp_path):
    with pytest.raises(ExportError, match="already GPTQ-quantized.*--quant-block-size applies with --quantize"):
        export(gptq_ck, tmp_path / "a", quant_block_size=64)
    with pytest.raises(ExportError, match="onnxruntime target"):
        export(gptq_ck, tmp_path / "b", target="tensorrt")
    # int8 activations on top of GPTQ int4 weights (ONNX Runtime's faster CPU path)
    art = export(gptq_ck, tmp_path / "c", quant_activations="int8")
    assert mf.read(art).quantization["activations"] == "int8"


def test_cli_exports_runs_and_checks_a_gptq_checkpoint(gptq_ck, tmp_path):
    r = CliRunner().invoke(main, ["export", str(gptq_ck), "-o", str(tmp_path / "art")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["run", str(tmp_path / "art"), "--prompt", "Hello", "-n", "4"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["check", str(tmp_path / "art"), "--reference", str(gptq_ck), "--max-new-tokens",
                                  "4"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["export", str(gptq_ck), "-o", str(tmp_path / "bad"), "--quant-block-size", "64"])
    assert r.exit_code != 0 and "already GPTQ-quantized" in r.output and "Traceback" not in r.output


def test_check_refuses_a_reference_of_another_quantization(gptq_ck, tmp_path):
    """A GPTQ artifact against a float reference would be compared with the float model quantized
    round-to-nearest (labelled 'GPTQ'), and an RTN artifact against a GPTQ reference with GPTQ's
    weights: both mismatch by the quantization error. One-line error, before any run."""
    art = export(gptq_ck, tmp_path / "gq")
    float_ck = gptq_ck.parent / "float"
    with pytest.raises(chk.CheckError, match="GPTQ weights.*not a GPTQ checkpoint"):
        chk.check([art], reference=float_ck, prompts=1, max_new_tokens=1)
    rtn = export(float_ck, tmp_path / "rtn", quantize="int4")
    with pytest.raises(chk.CheckError, match="is a GPTQ checkpoint.*quantized by qmoe export --quantize"):
        chk.check([rtn], reference=gptq_ck, prompts=1, max_new_tokens=1)
    r = CliRunner().invoke(main, ["check", str(art), "--reference", str(float_ck), "--max-new-tokens", "1"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1, r.output


def test_g_idx_is_optional_only_without_act_order(gptq_ck, tmp_path):
    """Without g_idx a layer's groups are k // group_size; with desc_act true they are a permutation
    only g_idx records, so a missing g_idx must not be read as the identity."""
    ck = tmp_path / "ck"
    shutil.copytree(gptq_ck, ck)
    _edit_tensors(ck, lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".g_idx")]])
    export(ck, tmp_path / "a1")  # desc_act false: k // group_size
    ck2 = _edit_config(ck, tmp_path / "ck2", desc_act=True)
    with pytest.raises(CheckpointError, match=r"g_idx not found .*desc_act"):
        export(ck2, tmp_path / "a2")
    assert not (tmp_path / "a2").exists()


def _header_only_gptq(folder: Path, group: int, bits: int = 4, **config) -> Path:
    """A GPTQ checkpoint of tiny_config(**config) whose shards are headers over holes (the graph
    rewrite reads no tensor data)."""
    from exporter.gptq import GptqConfig
    from exporter.gptq import expected_shapes as gptq_shapes
    from runtime.config import ModelConfig

    folder.mkdir(parents=True)
    cfg = tiny_config(**config)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": True,
                                  "desc_act": False}
    (folder / "config.json").write_text(json.dumps(cfg))
    c, g = ModelConfig.from_file(folder / "config.json"), GptqConfig.from_file(folder / "config.json")
    header, offset = {}, 0
    for name, shape in Checkpoint.expected_shapes_for(c, fused=False).items():
        parts = ({k: ("F16" if d == "float" else d, s) for k, (s, d) in gptq_shapes(name[:-7], *shape, g).items()}
                 if name.startswith("model.layers.") and name.endswith("_proj.weight") else {name: ("F16", shape)})
        for k, (dtype, s) in parts.items():
            n = (4 if dtype == "I32" else 2) * int(np.prod(s))
            header[k] = {"dtype": dtype, "shape": list(s), "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with (folder / "model.safetensors").open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return folder


def test_gptq_errors_do_not_advise_options_gptq_refuses(tmp_path):
    """--quantize/--quant-block-size are refused for GPTQ checkpoints, so their errors must not
    suggest them."""
    # experts whose inputs are not whole groups: QMoE cannot take them
    ck = _header_only_gptq(tmp_path / "ck", 32, moe_intermediate_size=48)
    with pytest.raises(QmoeError, match="group_size 32") as e:
        export(ck, tmp_path / "a")
    assert "--quant-block-size" not in str(e.value) and not (tmp_path / "a").exists()
    # 8-bit GPTQ weights run with int8 activations
    gq8 = _header_only_gptq(tmp_path / "ck8", 32, bits=8)
    with pytest.raises(QmoeError, match="8-bit") as e:
        export(gq8, tmp_path / "b", quant_activations="float")
    assert "--quantize" not in str(e.value) and not (tmp_path / "b").exists()


def test_older_autogptq_quantize_config_json(gptq_ck, tmp_path):
    """Older AutoGPTQ checkpoints keep their settings only in quantize_config.json (no
    quant_method): read from there, the artifact is the same."""
    ck = tmp_path / "old"
    shutil.copytree(gptq_ck, ck)
    cfg = json.loads((ck / "config.json").read_text())
    q = cfg.pop("quantization_config")
    q.pop("quant_method")
    (ck / "config.json").write_text(json.dumps(cfg))
    (ck / "quantize_config.json").write_text(json.dumps(q))
    a, b = export(gptq_ck, tmp_path / "a"), export(ck, tmp_path / "b")
    assert mf.read(b).quantization == mf.read(a).quantization
    assert (a / "model.onnx.data").read_bytes() == (b / "model.onnx.data").read_bytes()
    (ck / "quantize_config.json").write_text("{oops")
    with pytest.raises(GptqError, match="quantize_config.json: not valid JSON"):
        export(ck, tmp_path / "c")


def test_lora_on_gptq_layers_is_refused_and_on_float_ones_merged(gptq_ck, tmp_path):
    """A LoRA cannot be merged into packed integers without requantizing: refused in one line. On
    a layer the GPTQ checkpoint keeps float (the head) it merges, and `qmoe check` agrees."""
    from safetensors.torch import save_file as save_torch

    from exporter.lora import LoraError

    def adapter(name: str, module: str, n_in: int, n_out: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        g = torch.Generator().manual_seed(0)
        save_torch({f"base_model.model.{module}.lora_A.weight": torch.randn(4, n_in, generator=g),
                    f"base_model.model.{module}.lora_B.weight": torch.randn(n_out, 4, generator=g)},
                   str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
        return d

    with pytest.raises(LoraError, match="adapts its packed layer model.layers.0.self_attn.q_proj; merging would "
                                        "need requantizing"):
        export(gptq_ck, tmp_path / "out", lora=[adapter("q", "model.layers.0.self_attn.q_proj", 64, 64)])
    assert not (tmp_path / "out").exists()
    art = export(gptq_ck, tmp_path / "art", lora=[adapter("head", "lm_head", 64, 151936)])
    report = chk.check([art], reference=gptq_ck, prompts=2, max_new_tokens=4)
    assert report.ok, report.table()
    plain = export(gptq_ck, tmp_path / "plain")
    got, base = (prompt_logits(runtime.load(a), PROMPTS[0]) for a in (art, plain))
    assert np.abs(got - base).max() > 0.1  # the head's adapter changed the logits


def test_quantize_on_gptq_quantizes_the_layers_it_keeps_float(gptq_ck, tmp_path):
    """--quantize on a GPTQ checkpoint: its layers as they are, the head and embeddings (float in
    GPTQ) quantized round to nearest; the router and shared-expert gate stay float. Parity with
    transformers holding the dequantized GPTQ weights and the head and embeddings quantized."""
    from exporter.quantize import QuantConfig, fake_quantize_hf

    art = export(gptq_ck, tmp_path / "art", quantize="int4", quant_block_size=16)
    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    c = runtime.load(art).config
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    assert ops.count("MatMulNBits") == 6 * c.num_hidden_layers + 1  # the head too
    assert ops.count("Gemm") == 2 * c.num_hidden_layers  # router and shared-expert gate
    q = mf.read(art).quantization
    assert q["method"] == "gptq" and q["rest"] == QuantConfig.parse("int4", 16).to_json()
    ckpt = Checkpoint(gptq_ck)
    reference = hf_model(gptq_ck.parent / "ref")
    n = fake_quantize_hf(reference, QuantConfig.parse("int4", 16), torch.float32,
                         skip=lambda name: ckpt.is_gptq(chk._checkpoint_name(name)))
    assert n == 2  # embeddings and head
    check_quantized_parity(runtime.load(art), reference, PROMPTS, int8_activations=False)
    report = chk.check([art], reference=gptq_ck, prompts=2, max_new_tokens=4)
    assert report.ok and "the rest int4, block 16" in report.table(), report.table()
    with pytest.raises(chk.CheckError, match="differently quantized"):
        chk.check([art, export(gptq_ck, tmp_path / "plain")], prompts=1, max_new_tokens=1)


def test_int8_rest_on_int4_gptq_is_checked_with_the_int8_activation_tolerance(gptq_ck, tmp_path):
    """--quantize int8 on an int4 GPTQ checkpoint: the GPTQ layers run float activations, the head
    and embeddings int8 ones (the only choice for int8 weights), so `qmoe check` allows for the
    rounded activations as for any int8-activation artifact rather than failing the fp32 bound."""
    art = export(gptq_ck, tmp_path / "art", quantize="int8")
    q = mf.read(art).quantization
    assert q["activations"] == "float" and q["rest"]["activations"] == "int8"
    report = chk.check([art], reference=gptq_ck, prompts=2, max_new_tokens=4)
    assert report.ok and "median rel. L2 <= 3%" in report.table(), report.table()
