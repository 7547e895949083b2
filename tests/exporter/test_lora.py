"""LoRA adapters merged at export (exporter/lora.py), against PEFT applying them to transformers.

The reference is PEFT 0.17+ on transformers' Qwen2MoeForCausalLM: adapters made by PEFT itself
(`target_parameters` on transformers 5's fused experts, targeted Linears, a saved head copy), and
per-expert adapters (transformers 4's layout, most published Qwen-MoE adapters) written by this
file and converted here to PEFT's fused form for the reference (A stacked along the rank, B block
diagonal, as PEFT's own weight conversion describes), since PEFT 0.21 with transformers 5.24
drops per-expert expert keys when it loads them (observed: reported as unexpected keys).
Tolerances: fp32, logits max |delta| <= 1e-4 at every prompt position and 16 greedy steps
identical; other checks through `qmoe check` (its fp32 bound 1e-3 and greedy identity).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import runtime
from exporter.export import ExportError, export
from exporter.lora import LoraError
from exporter.quantize import QuantConfig, fake_quantize_hf
from exporter.tiny import tiny_config, write_checkpoint
from runtime import check as chk
from runtime import manifest as mf
from runtime.cli import main
from tests.helpers import check_quantized_parity, hf_greedy, hf_model, prompt_logits

peft = pytest.importorskip("peft")

PROMPTS = [[9707, 11, 1879, 0, 220, 108386], [151644, 872, 198], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    """A sparse layer then a dense one (mlp_only_layers), 8 experts top-2, untied head."""
    return write_checkpoint(tmp_path_factory.mktemp("lck") / "ck", tiny_config(num_hidden_layers=2, mlp_only_layers=[1]),
                            seed=11)


def peft_adapter(ck: Path, out: Path, seed: int, **config) -> Path:
    """An adapter made and saved by PEFT, with random factors (0.2 std: visible in the logits)."""
    model = hf_model(ck)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(out))
    return out


def peft_reference(ck: Path, *adapters: Path):
    """transformers with the adapters applied by PEFT: one unmerged (its LoRA forward), several
    merged one after another."""
    model = hf_model(ck)
    for i, a in enumerate(adapters):
        model = peft.PeftModel.from_pretrained(model, str(a)).eval()
        if len(adapters) > 1 or i < len(adapters) - 1:
            model = model.merge_and_unload()
    return model


def assert_parity(art: Path, reference, steps: int = 16) -> None:
    engine = runtime.load(art)
    for p in PROMPTS:
        with torch.no_grad():
            want = reference(torch.tensor([p])).logits[0].numpy()
        got = prompt_logits(engine, p)
        assert np.abs(got - want).max() <= 1e-4
    from runtime.sampling import SamplingParams

    results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=steps, ignore_eos=True))
    for p, r in zip(PROMPTS, results):
        assert r.tokens == hf_greedy(reference, p, steps)


# -- a per-expert adapter (transformers 4 layout), written here -----------------------------------

def per_expert_adapter(ck: Path, out: Path, r: int = 4, alpha: float = 8, seed: int = 3) -> tuple[Path, dict]:
    cfg = json.loads((ck / "config.json").read_text())
    H, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    Is, D = cfg["shared_expert_intermediate_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}

    def add(module: str, n_in: int, n_out: int) -> None:
        t[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.2
        t[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.2

    p = "model.layers.0."
    add(p + "self_attn.q_proj", H, cfg["num_attention_heads"] * D)
    add(p + "self_attn.v_proj", H, cfg["num_key_value_heads"] * D)
    for e in range(E):
        add(f"{p}mlp.experts.{e}.gate_proj", H, I)
        add(f"{p}mlp.experts.{e}.up_proj", H, I)
        add(f"{p}mlp.experts.{e}.down_proj", I, H)
    add(p + "mlp.shared_expert.down_proj", Is, H)
    add("model.layers.1.mlp.up_proj", H, cfg["intermediate_size"])  # the dense layer
    out.mkdir(parents=True)
    save_file(t, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj", "gate_proj",
                                                                              "up_proj", "down_proj"],
        "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}))
    return out, t


def to_fused(ck: Path, per_expert: dict, out: Path, r: int = 4, alpha: float = 8) -> Path:
    """The per-expert adapter in PEFT's target_parameters form: per expert, gate and up A stacked
    along the rank and B block-diagonal (rank 2r, so alpha doubles to keep alpha / r)."""
    cfg = json.loads((ck / "config.json").read_text())
    E = cfg["num_experts"]
    pre = "base_model.model.model.layers.0.mlp.experts"
    t = {k: v for k, v in per_expert.items() if ".mlp.experts." not in k}

    def factors(e: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        return per_expert[f"{pre}.{e}.{proj}.lora_A.weight"], per_expert[f"{pre}.{e}.{proj}.lora_B.weight"]

    gu_a, gu_b, dn_a, dn_b = [], [], [], []
    for e in range(E):
        (ga, gb), (ua, ub), (da, db) = factors(e, "gate_proj"), factors(e, "up_proj"), factors(e, "down_proj")
        gu_a.append(torch.cat([ga, ua]))
        gu_b.append(torch.block_diag(gb, ub))
        dn_a.append(da)
        dn_b.append(db)
    # A [E*r, in] row e*r + j; B [out, r*E] column j*E + e (PEFT's ParamWrapper views)
    t[f"{pre}.base_layer.lora_A.weight"] = torch.stack(gu_a).reshape(-1, gu_a[0].shape[-1])
    t[f"{pre}.base_layer.lora_B.weight"] = torch.stack(gu_b, dim=-1).reshape(gu_b[0].shape[0], -1)
    t[f"{pre}.lora_A.weight"] = torch.stack(dn_a).reshape(-1, dn_a[0].shape[-1])
    t[f"{pre}.lora_B.weight"] = torch.stack(dn_b, dim=-1).reshape(dn_b[0].shape[0], -1)
    out.mkdir(parents=True)
    save_file(t, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj", "down_proj",
                                                                              "up_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "rank_pattern": {"gate_up_proj": 2 * r}, "alpha_pattern": {"gate_up_proj": 2 * alpha},
        "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}))
    return out


# -- parity ---------------------------------------------------------------------------------------

def test_peft_adapter_on_every_kind_of_layer(ck, tmp_path):
    """Attention, fused experts (both parameters), shared expert, dense MLP, router (a parameter in
    transformers 5), shared-expert gate and the head (PEFT saves the targeted head whole): the
    artifact computes what PEFT computes."""
    a = peft_adapter(ck, tmp_path / "a", seed=1, r=4, lora_alpha=8,
                     target_modules=ATTN + ["gate_proj", "up_proj", "down_proj", "shared_expert_gate", "lm_head"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
                     rank_pattern={"mlp.gate.weight": 2})
    art = export(ck, tmp_path / "art", lora=[a])
    reference = peft_reference(ck, a)
    assert_parity(art, reference)
    with torch.no_grad():  # the adapter matters: the base model is far off
        base = hf_model(ck)(torch.tensor([PROMPTS[0]])).logits[0].numpy()
    assert np.abs(prompt_logits(runtime.load(art), PROMPTS[0]) - base).max() > 0.1
    rec = mf.read(art).lora
    assert rec is not None and len(rec) == 1 and rec[0]["path"] == str(a.absolute()) and len(rec[0]["sha256"]) == 64


def test_rank_and_alpha_patterns_rslora_and_one_fused_parameter(ck, tmp_path):
    """Per-module ranks and alphas as PEFT matches them, rsLoRA scaling, and only down_proj of the
    fused experts targeted (then the outer, only wrapper holds it)."""
    a = peft_adapter(ck, tmp_path / "a", seed=2, r=4, lora_alpha=6, use_rslora=True,
                     target_modules=["q_proj", "o_proj", "up_proj"], target_parameters=["mlp.experts.down_proj"],
                     rank_pattern={"o_proj": 2, "layers.1.mlp.up_proj": 8}, alpha_pattern={"q_proj": 3})
    art = export(ck, tmp_path / "art", lora=[a])
    assert_parity(art, peft_reference(ck, a), steps=8)


def test_per_expert_adapter_equals_its_fused_form_and_peft(ck, tmp_path):
    per, tensors = per_expert_adapter(ck, tmp_path / "per")
    fused = to_fused(ck, tensors, tmp_path / "fused")
    art = export(ck, tmp_path / "art", lora=[per])
    assert_parity(art, peft_reference(ck, fused), steps=8)
    art2 = export(ck, tmp_path / "art2", lora=[fused])
    e1, e2 = runtime.load(art), runtime.load(art2)
    assert np.abs(prompt_logits(e1, PROMPTS[2]) - prompt_logits(e2, PROMPTS[2])).max() <= 1e-5


def test_fused_expert_checkpoint_with_a_per_expert_adapter(ck, tmp_path):
    """A checkpoint in transformers 5's fused layout (one file) takes per-expert deltas."""
    from exporter.checkpoint import Checkpoint

    c = Checkpoint(ck)
    tensors = {n: c.tensor(n) for n in c.tensors if ".mlp.experts." not in n}
    gu, dn = zip(*[(torch.cat([g, u]), d) for g, u, d in c.experts(0)])
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack(gu)
    tensors["model.layers.0.mlp.experts.down_proj"] = torch.stack(dn)
    fck = tmp_path / "fck"
    fck.mkdir()
    for f in ck.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, fck)
    save_file(tensors, str(fck / "model.safetensors"))
    per, tensors = per_expert_adapter(ck, tmp_path / "per", seed=4)
    art = export(fck, tmp_path / "art", lora=[per])
    assert_parity(art, peft_reference(ck, to_fused(ck, tensors, tmp_path / "fused")), steps=4)


def test_two_adapters_add_up(ck, tmp_path):
    a = peft_adapter(ck, tmp_path / "a", seed=5, r=2, lora_alpha=4, target_modules=ATTN,
                     target_parameters=["mlp.experts.gate_up_proj"])
    b, _ = per_expert_adapter(ck, tmp_path / "b", seed=6)
    art = export(ck, tmp_path / "art", lora=[a, b])
    fused_b = to_fused(ck, _, tmp_path / "fb")
    assert_parity(art, peft_reference(ck, a, fused_b), steps=4)
    assert len(mf.read(art).lora or []) == 2


def test_pickled_adapter_reads_like_safetensors(ck, tmp_path):
    a = peft_adapter(ck, tmp_path / "a", seed=7, r=4, lora_alpha=8, target_modules=ATTN + ["down_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(a / "adapter_config.json", b)
    from safetensors.torch import load_file

    torch.save(load_file(str(a / "adapter_model.safetensors")), b / "adapter_model.bin")
    art_a, art_b = export(ck, tmp_path / "art_a", lora=[a]), export(ck, tmp_path / "art_b", lora=b)  # one folder
    ea, eb = runtime.load(art_a), runtime.load(art_b)
    assert np.array_equal(prompt_logits(ea, PROMPTS[0]), prompt_logits(eb, PROMPTS[0]))


def test_quantized_export_quantizes_the_merged_weights(ck, tmp_path):
    a = peft_adapter(ck, tmp_path / "a", seed=8, r=4, lora_alpha=8, target_modules=ATTN + ["down_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    art = export(ck, tmp_path / "art", lora=[a], quantize="int4")
    reference = peft_reference(ck, a).merge_and_unload()
    assert fake_quantize_hf(reference, QuantConfig.parse("int4"), torch.float32) > 0
    check_quantized_parity(runtime.load(art), reference, PROMPTS, int8_activations=False)
    report = chk.check([art], reference=ck, prompts=2, max_new_tokens=4)
    assert report.ok, report.table()


def test_check_merges_the_manifest_adapter_and_notices_changes(ck, tmp_path):
    a = peft_adapter(ck, tmp_path / "a", seed=9, r=4, lora_alpha=8, target_modules=ATTN,
                     target_parameters=["mlp.experts.down_proj"])
    art = export(ck, tmp_path / "art", lora=[a], dtype="bfloat16")
    report = chk.check([art], reference=ck, prompts=2, max_new_tokens=4)
    assert report.ok and "LoRA a " in report.table(), report.table()
    # without the adapter the reference is another model: the check would fail
    m = mf.read(art)
    mf.write(art, dataclasses.replace(m, lora=None))
    assert not chk.check([art], reference=ck, prompts=2, max_new_tokens=4).ok
    mf.write(art, m)
    # against a plain export without --reference: different weights, refused
    plain = export(ck, tmp_path / "plain", dtype="bfloat16")
    with pytest.raises(chk.CheckError, match="different LoRA adapters"):
        chk.check([art, plain], prompts=1, max_new_tokens=2)
    f = a / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(chk.CheckError, match="has changed since the export"):
        chk.check([art], reference=ck, prompts=1, max_new_tokens=2)
    shutil.rmtree(a)
    with pytest.raises(chk.CheckError, match="cannot be read now"):
        chk.check([art], reference=ck, prompts=1, max_new_tokens=2)


def test_linked_weights_copy_only_what_the_adapter_changes(ck, tmp_path):
    a = peft_adapter(ck, tmp_path / "a", seed=10, r=4, lora_alpha=8, target_modules=["q_proj"])
    art = export(ck, tmp_path / "art", lora=[a], link_weights=True)
    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    where = {i.name: {d.key: d.value for d in i.external_data}["location"] for i in m.graph.initializer
             if i.external_data}
    assert where["model.layers.0.self_attn.q_proj.weight"] == "model.onnx.data"
    assert where["model.layers.0.self_attn.k_proj.weight"].startswith("model")
    assert where["model.layers.0.self_attn.k_proj.weight"] != "model.onnx.data"
    assert_parity(art, peft_reference(ck, a), steps=4)


# -- refusals -------------------------------------------------------------------------------------

def _adapter(tmp_path: Path, tensors: dict, name: str = "bad", **config) -> Path:
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    return d


def _pair(module: str, n_in: int, n_out: int, r: int = 4) -> dict:
    return {f"base_model.model.{module}.lora_A.weight": torch.zeros(r, n_in),
            f"base_model.model.{module}.lora_B.weight": torch.zeros(n_out, r)}


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("make, message", [
    (lambda t: t / "none", "no such LoRA adapter folder"),
    (lambda t: (t / "empty").mkdir() or t / "empty", "no adapter_config.json"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), peft_type="IA3"), "peft_type 'IA3' is not supported"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), use_dora=True), "DoRA"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), bias="lora_only"), "bias 'lora_only' \\(trained biases\\)"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), alora_invocation_tokens=[1, 2]), "activated LoRA"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), r=0), "r is 0; expected a positive integer"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), lora_alpha="8"), "lora_alpha is '8'; expected a finite number"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), rank_pattern=["q_proj"]), "rank_pattern is \\['q_proj'\\]; expected an "
                                                                        "object"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), alpha_pattern={"q_proj(": 4}), "alpha_pattern key 'q_proj\\(' is not a "
                                                                            "regular expression"),
    (lambda t: _adapter(t, _pair(Q, 64, 64), target_parameters="mlp.experts.down_proj"), "target_parameters is "
                                                                                         "'mlp.experts.down_proj'"),
    (lambda t: _adapter(t, _pair(Q, 32, 64)), "q_proj.weight has lora_A \\[4, 32\\]"),
    (lambda t: _adapter(t, _pair(Q, 64, 64, r=8)), "with r=4"),
    (lambda t: _adapter(t, _pair("model.layers.7.self_attn.q_proj", 64, 64)), "not a Linear of this Qwen2-MoE"),
    (lambda t: _adapter(t, _pair("model.norm", 64, 64)), "adapts model.norm, which is not a Linear"),
    (lambda t: _adapter(t, {f"base_model.model.{Q}.lora_A.weight": torch.zeros(4, 64)}), "has no lora_B partner"),
    (lambda t: _adapter(t, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 151936)}),
     "an embedding LoRA"),
    (lambda t: _adapter(t, {"base_model.model.model.layers.0.mlp.experts.lora_A.weight": torch.zeros(32, 32),
                            "base_model.model.model.layers.0.mlp.experts.lora_B.weight": torch.zeros(64, 32)}),
     "target_parameters \\[\\] name 0"),
    (lambda t: _adapter(t, {"base_model.model.lm_head.base_layer.weight": torch.zeros(5, 64)}),
     "lm_head.base_layer.weight is \\[5, 64\\]"),
])
def test_bad_adapters_are_refused_in_one_line(ck, tmp_path, make, message):
    adapter = make(tmp_path)
    result = CliRunner().invoke(main, ["export", str(ck), "-o", str(tmp_path / "out"), "--lora", str(adapter)])
    assert result.exit_code != 0
    err = result.output.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


def test_truncated_adapter_file_is_refused(ck, tmp_path):
    d = _adapter(tmp_path, _pair(Q, 64, 64))
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(LoraError, match="truncated"):
        export(ck, tmp_path / "out", lora=[d])


def test_head_lora_on_tied_embeddings_and_gptq_layers_are_refused(tmp_path):
    tied = write_checkpoint(tmp_path / "tied", tiny_config(tie_word_embeddings=True), seed=1)
    d = _adapter(tmp_path, _pair("lm_head", 64, 151936))
    with pytest.raises(LoraError, match="ties to the embeddings"):
        export(tied, tmp_path / "out", lora=[d])
    d2 = _adapter(tmp_path, {"base_model.model.lm_head.base_layer.weight": torch.zeros(151936, 64)}, name="copy")
    with pytest.raises(LoraError, match="tied to the embeddings"):
        export(tied, tmp_path / "out", lora=[d2])


def test_two_head_copies_are_refused(ck, tmp_path):
    copy = {"base_model.model.lm_head.base_layer.weight": torch.zeros(151936, 64)}
    a, b = _adapter(tmp_path, copy, name="a"), _adapter(tmp_path, copy, name="b")
    with pytest.raises(LoraError, match="two adapters each carry a whole copy of lm_head.weight"):
        export(ck, tmp_path / "out", lora=[a, b])


def test_manifest_rejects_a_malformed_lora_entry(ck, tmp_path):
    a = _adapter(tmp_path, _pair(Q, 64, 64))
    art = export(ck, tmp_path / "art", lora=[a])
    d = json.loads((art / mf.NAME).read_text())
    good = d["lora"][0]
    # file: the weights file's name in the adapter folder (was a TypeError in qmoe check --reference)
    for bad in ([{"path": 3}], [{**good, "file": 3}], [{**good, "file": "../other/adapter_model.bin"}]):
        d["lora"] = bad
        (art / mf.NAME).write_text(json.dumps(d))
        with pytest.raises(mf.ManifestError, match="lora is"):
            mf.read(art)


def test_tensorrt_target_holds_the_merged_weights(ck, tmp_path):
    """The merge happens before any target's graph: the tensorrt artifact's float16 q_proj is
    W + alpha / r * B A, rounded to float16 once."""
    from onnx import numpy_helper

    from exporter.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(1)
    t = {f"base_model.model.{Q}.lora_A.weight": torch.randn(4, 64, generator=g),
         f"base_model.model.{Q}.lora_B.weight": torch.randn(64, 4, generator=g)}
    a = _adapter(tmp_path, t, lora_alpha=6)
    art = export(ck, tmp_path / "art", target="tensorrt", lora=[a])
    m = onnx.load(str(art / "model.onnx"))
    got = next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == f"{Q}.weight")
    w = Checkpoint(ck).tensor(f"{Q}.weight")  # no adapter attached: the stored weight
    want = (w.float() + 1.5 * t[f"base_model.model.{Q}.lora_B.weight"] @ t[f"base_model.model.{Q}.lora_A.weight"])
    assert got.dtype == np.float16
    # rounded once from float32 (summation order may move the float32 sum by an ulp: 1e-3 relative)
    np.testing.assert_allclose(got.astype(np.float32), want.numpy(), rtol=1e-3, atol=1e-3)
    assert np.abs(got.astype(np.float32) - w.float().numpy()).max() > 1


def test_fused_adapter_on_a_one_expert_model(tmp_path):
    """num_experts 1: PEFT's fused factors are then [r, in] and [out, r], Linear-shaped, but still
    the experts' (the delta was dropped: both the export's reads and the check's reference)."""
    from exporter.checkpoint import Checkpoint
    from exporter.lora import merge_into

    one = write_checkpoint(tmp_path / "one", tiny_config(num_experts=1, num_experts_per_tok=1), seed=2)
    a = peft_adapter(one, tmp_path / "a", seed=12, r=4, lora_alpha=8, target_modules=["q_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    want = dict(peft_reference(one, a).merge_and_unload().named_parameters())
    c = Checkpoint(one, lora=[a])
    for L in range(2):
        gate, up, down = c.expert(L, 0)
        p = f"model.layers.{L}.mlp.experts."
        assert torch.allclose(torch.cat([gate, up]), want[p + "gate_up_proj"][0], atol=1e-5)
        assert torch.allclose(down, want[p + "down_proj"][0], atol=1e-5)
    model = hf_model(one)
    merge_into(model, c.lora)
    got = dict(model.named_parameters())
    assert all(torch.allclose(got[n], want[n], atol=1e-5) for n in want)


def test_output_folder_must_not_hold_the_adapter(ck, tmp_path):
    """--force replaces the output folder: one holding (or being) an adapter folder would delete the
    adapter, as the checkpoint is guarded against."""
    (tmp_path / "work").mkdir()
    a = _adapter(tmp_path / "work", _pair(Q, 64, 64), name="adapter")
    for out in (tmp_path / "work", a):
        with pytest.raises(ExportError, match="must not be the checkpoint folder or contain it or its shards, or a "
                                            "LoRA adapter"):
            export(ck, out, lora=[a], force=True)
        assert (a / "adapter_model.safetensors").is_file() and (a / "adapter_config.json").is_file()


def test_untargeted_embedding_copies_replace_the_checkpoints(ck, tmp_path):
    """save_embedding_layers=True stores the embeddings and head whole even when untargeted; PEFT
    loads those copies into the model, and so does the export (a changed copy shows it)."""
    from safetensors.torch import load_file

    a = peft_adapter(ck, tmp_path / "a", seed=13, r=4, lora_alpha=8, target_modules=["q_proj"])
    model = peft.get_peft_model(hf_model(ck), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.load_adapter(str(a), adapter_name="default")
    model.save_pretrained(str(tmp_path / "b"), save_embedding_layers=True)
    t = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.weight" in t and "base_model.model.lm_head.weight" in t
    t["base_model.model.model.embed_tokens.weight"] += 0.5
    t["base_model.model.lm_head.weight"] *= 1.5
    save_file(t, str(tmp_path / "b" / "adapter_model.safetensors"))
    art = export(ck, tmp_path / "art", lora=[tmp_path / "b"])
    assert_parity(art, peft_reference(ck, tmp_path / "b"), steps=4)
    plain = export(ck, tmp_path / "plain", lora=[a])  # the same factors, no copies: other logits
    got, base = (prompt_logits(runtime.load(x), PROMPTS[0]) for x in (art, plain))
    assert np.abs(got - base).max() > 0.1


def test_check_merges_the_file_it_hashed_and_adapters_commute(ck, tmp_path):
    """A .bin adapter stays the reference's after a .safetensors appears beside it (the folder would
    offer that one first); the same adapters in another order hold the same weights."""
    a = peft_adapter(ck, tmp_path / "a", seed=14, r=4, lora_alpha=8, target_modules=ATTN)
    b = peft_adapter(ck, tmp_path / "b", seed=15, r=2, lora_alpha=2, target_modules=["o_proj"],
                     target_parameters=["mlp.experts.down_proj"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(a / "adapter_config.json", pickled)
    from safetensors.torch import load_file

    torch.save(load_file(str(a / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    ab = export(ck, tmp_path / "ab", lora=[pickled, b])
    shutil.copy(b / "adapter_model.safetensors", pickled / "adapter_model.safetensors")  # another adapter's weights
    report = chk.check([ab], reference=ck, prompts=1, max_new_tokens=2)
    assert report.ok, report.table()
    (pickled / "adapter_model.safetensors").unlink()
    ba = export(ck, tmp_path / "ba", lora=[b, pickled])
    report = chk.check([ab, ba], prompts=1, max_new_tokens=4)
    assert report.ok, report.table()


def test_adapter_on_a_shared_expert_of_size_0(tmp_path):
    """shared_expert_intermediate_size 0: PEFT still wraps the empty Linears, and saves factors
    with no bytes ([r, 0] for down_proj's lora_A); those are still r rows (read as none, the merge
    failed with a matmul shape error)."""
    ck = write_checkpoint(tmp_path / "ck", tiny_config(num_hidden_layers=1, shared_expert_intermediate_size=0), seed=6)
    with warnings.catch_warnings():  # PEFT and torch on the zero-element factors
        warnings.simplefilter("ignore")
        a = peft_adapter(ck, tmp_path / "a", seed=17, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    art = export(ck, tmp_path / "art", lora=[a])
    assert_parity(art, peft_reference(ck, a), steps=4)
    report = chk.check([art], reference=ck, prompts=2, max_new_tokens=4)
    assert report.ok, report.table()


def test_embedding_copies_of_a_tied_model(tmp_path):
    """PEFT's save_embedding_layers on a tied model stores the one tensor twice, as the embeddings
    and as the head; loading writes the head's copy last, so it is the embeddings PEFT runs (the
    head's copy was refused as a head the checkpoint does not have)."""
    from safetensors.torch import load_file

    tied = write_checkpoint(tmp_path / "tied", tiny_config(num_hidden_layers=1, tie_word_embeddings=True), seed=5)
    a = peft_adapter(tied, tmp_path / "a", seed=16, r=4, lora_alpha=8, target_modules=["q_proj"])
    model = peft.get_peft_model(hf_model(tied), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.load_adapter(str(a), adapter_name="default")
    model.save_pretrained(str(tmp_path / "b"), save_embedding_layers=True)
    f = tmp_path / "b" / "adapter_model.safetensors"
    t = load_file(str(f))
    embed, head = "base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"
    assert torch.equal(t[embed], t[head])
    t[embed] += 0.5
    t[head] = t[embed] * 1.5  # they differ: the head's copy is the one PEFT keeps
    save_file(t, str(f))
    art = export(tied, tmp_path / "art", lora=[tmp_path / "b"], quantize="int4")
    reference = peft_reference(tied, tmp_path / "b").merge_and_unload()
    assert torch.equal(reference.model.embed_tokens.weight, t[head])
    fake_quantize_hf(reference, QuantConfig.parse("int4"), torch.float32)
    check_quantized_parity(runtime.load(art), reference, PROMPTS, int8_activations=False)
    report = chk.check([art], reference=tied, prompts=2, max_new_tokens=4)
    assert report.ok, report.table()


def test_cli_says_which_adapters_went_in(ck, tmp_path):
    a = _adapter(tmp_path, {**_pair(Q, 64, 64), **_pair("model.layers.1.self_attn.o_proj", 64, 64)}, lora_alpha=16)
    b = _adapter(tmp_path, _pair(Q, 64, 64, r=2), name="b", r=2)
    r = CliRunner().invoke(main, ["export", str(ck), "-o", str(tmp_path / "art"), "--lora", str(a), "--lora", str(b)])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("merged LoRA")]
    assert len(lines) == 2
    assert str(a.absolute()) in lines[0] and "r=4, lora_alpha=16, 2 adapted" in lines[0]
    assert str(b.absolute()) in lines[1] and "r=2, lora_alpha=8, 1 adapted" in lines[1]
