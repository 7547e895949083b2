"""ONNX Runtime (CPU) artifacts vs transformers' Qwen2MoeForCausalLM, fp32, random checkpoints.

Tolerances: prefill logits max |delta| <= 1e-4 (fp32; observed ~3e-6); greedy tokens identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import runtime
from exporter.export import export
from exporter.tiny import tiny_config, write_checkpoint
from runtime.sampling import SamplingParams
from tests.helpers import hf_greedy, hf_model, prompt_logits

VARIANTS = {
    # the embedded default's architecture: GQA 4/2, 8 experts top-2, norm_topk_prob false, untied
    "default": {},
    # renormalised top-k, tied embeddings, a dense layer listed in mlp_only_layers, GQA 8/2, head_dim 16
    "norm_tied_dense": dict(norm_topk_prob=True, tie_word_embeddings=True, mlp_only_layers=[1], num_hidden_layers=3,
                            hidden_size=128, num_attention_heads=8, num_key_value_heads=2, num_experts=6,
                            num_experts_per_tok=3),
    # MHA (kv heads = heads), top-1 of 4 experts, dense layers from decoder_sparse_step=2, head_dim 32
    "mha_sparse_step": dict(num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=1,
                            decoder_sparse_step=2, num_hidden_layers=2, shared_expert_intermediate_size=48),
}

PROMPTS = [[9707, 11, 1879, 0, 220, 108386], [151644, 872, 198], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    ck = write_checkpoint(root / "ck", tiny_config(**VARIANTS[request.param]), seed=3)
    return ck, export(ck, root / "art")


def test_prefill_logits_match_transformers(variant):
    ck, art = variant
    engine = runtime.load(art)
    hf = hf_model(ck)
    results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=1), output_logits=True)
    for prompt, r in zip(PROMPTS, results):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert np.abs(r.logits[0] - ref).max() <= 1e-4


def test_all_prompt_positions_match_transformers(variant):
    """logits_indices selects any rows: every prompt position against transformers' forward."""
    ck, art = variant
    engine = runtime.load(art)
    prompt = PROMPTS[2]
    logits = prompt_logits(engine, prompt)
    with torch.no_grad():
        ref = hf_model(ck)(torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(logits - ref).max() <= 1e-4


def test_greedy_32_steps_ragged_batch_matches_transformers(variant):
    ck, art = variant
    engine = runtime.load(art)
    hf = hf_model(ck)
    p = SamplingParams(max_new_tokens=32, ignore_eos=True)  # no eos: always 32 steps
    results = engine.generate(PROMPTS, p)
    for prompt, r in zip(PROMPTS, results):
        assert r.tokens == hf_greedy(hf, prompt, 32)
        assert len(r.tokens) == 32 and r.finish_reason == "length"


def test_batch_equals_single(variant):
    """A row's tokens do not depend on the other rows of its batch (ragged padding, idle rows)."""
    _, art = variant
    engine = runtime.load(art)
    p = SamplingParams(max_new_tokens=8, ignore_eos=True)
    batched = engine.generate(PROMPTS, p)
    for prompt, r in zip(PROMPTS, batched):
        assert engine.generate([prompt], p)[0].tokens == r.tokens


@pytest.mark.parametrize("overrides, rope_mode, prompt_len", [
    # no shared expert (intermediate size 0: empty weights), rope_theta 1e6
    (dict(shared_expert_intermediate_size=0, rope_theta=1e6), None, 11),
    # YaRN x4 over a 16-position window, a prompt past it
    (dict(max_position_embeddings=64, rope_scaling={"type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 16}), "static", 25),
])
def test_a_checkpoint_saved_by_transformers_5_matches(tmp_path, overrides, rope_mode, prompt_len):
    """transformers >= 5 saves the rope settings as `rope_parameters` (no top-level rope_theta or
    rope_scaling): read them, or the model silently runs with theta 10000 and no YaRN. Prefill
    logits <= 1e-4 as above."""
    import json
    import shutil

    ck = write_checkpoint(tmp_path / "ck", tiny_config(**overrides), seed=3)
    hf = hf_model(ck)
    hf.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_theta" not in saved
    for f in ck.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "generation")):
            shutil.copy(f, tmp_path / "saved" / f.name)
    art = export(tmp_path / "saved", tmp_path / "art")
    engine = runtime.load(art, rope_mode=rope_mode)
    assert engine.config.rope_theta == overrides.get("rope_theta", tiny_config()["rope_theta"])
    prompt = list(range(100, 100 + prompt_len))
    got = engine.generate([prompt], SamplingParams(max_new_tokens=1), output_logits=True)[0].logits[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_a_head_stored_beside_tied_embeddings_is_used_like_transformers(tmp_path):
    """tie_word_embeddings true, yet the checkpoint holds a different lm_head.weight: transformers
    then does not tie (it warns) and projects with the stored head; so does the artifact."""
    import json

    from safetensors.torch import load_file, save_file

    ck = write_checkpoint(tmp_path / "ck", tiny_config(tie_word_embeddings=True), seed=3)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shard = ck / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    embed_shape = tiny_config()["vocab_size"], tiny_config()["hidden_size"]
    tensors["lm_head.weight"] = torch.randn(embed_shape, generator=torch.Generator().manual_seed(0)) / 8
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = shard.name
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    hf = hf_model(ck)
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    engine = runtime.load(export(ck, tmp_path / "art"))
    assert not engine.config.tie_word_embeddings
    for prompt in PROMPTS:
        got = engine.generate([prompt], SamplingParams(max_new_tokens=1), output_logits=True)[0].logits[0]
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert np.abs(got - ref).max() <= 1e-4
