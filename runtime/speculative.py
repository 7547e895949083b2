"""Speculative decoding with n-gram (prompt lookup) drafts: vLLM's "ngram" method.

    a decoding request's tokens (prompt + output) -> [the longest suffix n-gram, n in
    [ngram_min, ngram_max], found earlier in them] -> the k tokens that followed it (the draft)
    -> one step feeds the sampled token + the draft and takes logits at every position
    -> [verify: sample each position in order; keep going while the sample equals the draft token]
    -> 1 .. k + 1 tokens per step; the K/V of rejected draft tokens is dropped (the request's
       cache length is set back, their rows are overwritten later)

Verification samples every position exactly as plain decoding would (the same sampler, the same
one uniform number per token, penalties, grammar and stop checks token by token) and accepts a
draft token only when the sample equals it, so the output is the one plain decoding gives, token
for token, greedy or seeded, up to the floating-point batch variance every batched step has. (For
a deterministic draft this is exact rejection sampling: a draft token is kept with probability
p(token), and a rejected position keeps its own sample, drawn from p.) Nothing is learnt or
approximated: drafts only decide how many positions one step computes.

Drafts pay where outputs repeat their context (editing code, quoting, extraction, summaries) and
cost a little where they do not (longer steps; on a GPU a decode step is bound by reading the
weights, so a few more tokens are nearly free; on a MoE each extra token may read more experts).
Off by default, as in vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import QmoeError

MAX_TOKENS = 32  # draft tokens per step


class SpeculationError(QmoeError, ValueError):
    """An invalid speculative config; one line."""


@dataclass(frozen=True)
class NgramSpeculation:
    tokens: int  # draft tokens per step (vLLM's num_speculative_tokens)
    ngram_max: int = 4  # longest suffix n-gram looked up (vLLM's prompt_lookup_max)
    ngram_min: int = 2  # shortest (vLLM's prompt_lookup_min)

    def __post_init__(self) -> None:
        for name, label in (("tokens", "num_speculative_tokens"), ("ngram_max", "prompt_lookup_max"),
                            ("ngram_min", "prompt_lookup_min")):  # vLLM's names
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpeculationError(f"{label} must be an integer >= 1, got {v!r}")
        if self.tokens > MAX_TOKENS:
            raise SpeculationError(f"num_speculative_tokens must be at most {MAX_TOKENS}, got {self.tokens}")
        if self.ngram_min > self.ngram_max:
            raise SpeculationError(f"prompt_lookup_min ({self.ngram_min}) must be <= prompt_lookup_max ({self.ngram_max})")

    @classmethod
    def from_config(cls, value: str | dict[str, Any]) -> "NgramSpeculation":
        """vLLM's --speculative-config: {"method": "ngram", "num_speculative_tokens": k,
        "prompt_lookup_max": n, "prompt_lookup_min": m} (JSON text or a dict)."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise SpeculationError(f"the speculative config is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise SpeculationError("the speculative config must be a JSON object")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SpeculationError(f"speculative config: {unknown[0]!r} is not supported (known: {', '.join(sorted(known))})")
        if value.get("method", "ngram") != "ngram":
            raise SpeculationError(f"speculative config: method {value.get('method')!r} is not supported; only \"ngram\"")
        if "num_speculative_tokens" not in value:
            raise SpeculationError("speculative config: num_speculative_tokens is required")
        # null is unset, as in vLLM; a bad value is named as given (before the other is derived from it)
        high, low = value.get("prompt_lookup_max"), value.get("prompt_lookup_min")
        for label, v in (("prompt_lookup_max", high), ("prompt_lookup_min", low)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise SpeculationError(f"{label} must be an integer >= 1, got {v!r}")
        high = (4 if low is None else low) if high is None else high
        low = min(2, high) if low is None else low
        return cls(value["num_speculative_tokens"], high, low)

    def propose(self, tokens: np.ndarray, limit: int) -> list[int]:
        """Up to min(self.tokens, limit) draft tokens: those that followed the latest earlier
        occurrence of the longest suffix n-gram of `tokens` (none: [])."""
        k = min(self.tokens, limit)
        L = len(tokens)
        if k <= 0:
            return []
        for n in range(min(self.ngram_max, L - 1), self.ngram_min - 1, -1):
            suffix = tokens[L - n:]
            # starts i < L - n whose n tokens equal the suffix (the suffix itself excluded)
            hits = np.flatnonzero(tokens[: L - n] == suffix[0])
            for j in range(1, n):
                if len(hits) == 0:
                    break
                hits = hits[tokens[hits + j] == suffix[j]]
            if len(hits):
                start = int(hits[-1]) + n
                return [int(t) for t in tokens[start: start + k]]
        return []
