"""Reference computations shared by tests: transformers as the independent reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def hf_model(checkpoint: Path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], new_tokens: int, eos: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding through transformers' own incremental path (its KV cache, one token per
    forward). Not `generate`: in transformers 5.24 `generate` returned logits that differ from the
    model's own forward on these random checkpoints (observed; both with and without cache)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(ids, cache=cache, use_cache=True).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            if tok in eos:
                break
            ids = torch.tensor([[tok]])
    return out


def rope_cache(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.arange(positions)[:, None] * inv[None]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def prompt_logits(engine, prompt: list[int]) -> np.ndarray:
    """[len(prompt), V]: the logits of every prompt position from one backend step (logits_indices
    selects all rows), with plain RoPE tables."""
    n = len(prompt)
    cache = engine.backend.new_cache(1, n)
    engine.backend.bind_rope(cache, *rope_cache(engine.config.head_dim, engine.config.rope_theta, n))
    lengths = np.array([n], np.int32)
    logits = engine.backend.step(cache, np.array([prompt]), lengths, lengths - 1, np.arange(n)[None])
    assert logits.shape == (1, n, engine.config.vocab_size)
    return logits[0]


def check_quantized_parity(engine, reference, prompts: list[list[int]], int8_activations: bool) -> None:
    """A quantized artifact against transformers holding the same (dequantized) weights, on the
    last prompt's every position: top-1 agrees at >= 90% of them; float activations: logits max
    |delta| <= 1e-4 in fp32 (and then 16 greedy steps of every prompt identical), <= 5e-2 in fp16;
    int8 activations (rounded per block on the fly: ~1% relative L2 per position, except where the
    rounding flips a near-tied expert choice, seen: 21% at one of 11 positions): the median
    position's relative L2 <= 3%."""
    import torch

    from runtime.sampling import SamplingParams

    prompt = prompts[-1]
    logits = prompt_logits(engine, prompt)
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0].numpy()
    assert (logits.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    if int8_activations:
        rel = np.linalg.norm(logits - want, axis=1) / np.linalg.norm(want, axis=1)
        assert np.median(rel) <= 0.03, rel
        return
    atol = 5e-2 if engine.manifest.compute_dtype == "float16" else 1e-4
    assert np.abs(logits - want).max() <= atol
    if atol == 1e-4:  # fp32 compute: the greedy paths are the same
        results = engine.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
        for p, r in zip(prompts, results):
            assert r.tokens == hf_greedy(reference, p, 16)


def hf_chain(params):
    """transformers' logits processors in generate()'s order for a runtime SamplingParams (the
    reference of tests/runtime/test_sampling.py and scripts/bench_sampler.py)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    chain = LogitsProcessorList()
    if params.logit_bias:
        chain.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in params.logit_bias]))
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature not in (0.0, 1.0):
        chain.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        chain.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        chain.append(MinPLogitsWarper(params.min_p))
    return chain


def run_requests(scheduler, requests) -> list[tuple]:
    """Submits (prompt ids, SamplingParams) pairs to a BatchScheduler nobody else steps, steps it
    until it is idle, and returns each request's (GenerationResult, text from its deltas)."""
    texts: list[list[str]] = [[] for _ in requests]
    gens = [scheduler.submit(ids, p, on_delta=texts[i].append) for i, (ids, p) in enumerate(requests)]
    while scheduler.has_work():
        scheduler.step()
    return [(g.result, "".join(t)) for g, t in zip(gens, texts)]
