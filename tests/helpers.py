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
