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
from tests.helpers import hf_greedy, hf_model

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
    n = len(prompt)
    cache = engine.backend.new_cache(1, n)
    from tests.helpers import rope_cache

    engine.backend.bind_rope(cache, *rope_cache(engine.config.head_dim, engine.config.rope_theta, n))
    lengths = np.array([n], np.int32)
    logits = engine.backend.step(cache, np.array([prompt]), lengths, lengths - 1, np.arange(n)[None])
    with torch.no_grad():
        ref = hf_model(ck)(torch.tensor([prompt])).logits[0].numpy()
    assert logits.shape == (1, n, engine.config.vocab_size)
    assert np.abs(logits[0] - ref).max() <= 1e-4


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
