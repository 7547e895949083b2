"""Next-token selection: greedy or sampled, with transformers' semantics and order.

    logits [B, V] -> [repetition penalty] -> [temperature] -> [top-k] -> [top-p] -> draw

The stages are the ones ``generate`` applies (``RepetitionPenaltyLogitsProcessor``,
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``), each a small pure
function on one row, computed in float64. Greedy (temperature 0) applies the repetition penalty
and takes the first maximum, as transformers does with ``do_sample=False``.

Every row owns a ``numpy.random.Generator(PCG64(seed))`` and draws exactly one uniform number per
sampled step, so a seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from runtime.errors import QmoeError


class SamplingError(QmoeError, ValueError):
    """Invalid sampling parameters or logits; the message names the field or row."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; applies to prompt and generated tokens
    seed: int | None = None  # None = fresh OS entropy
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # empty: the engine fills in the generation config's eos ids
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks, parity tests)

    def __post_init__(self) -> None:
        # JSON requests give lists and a single stop string; store tuples so params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):
            raise SamplingError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise SamplingError(f"stop_token_ids must be a list of token ids, got {type(self.stop_token_ids).__name__}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("temperature", "top_p", "repetition_penalty"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise SamplingError (one line, naming the field) for an invalid value."""
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        _integer("top_k", self.top_k, minimum=0)
        _integer("max_new_tokens", self.max_new_tokens, minimum=1)
        if self.seed is not None:
            _integer("seed", self.seed, minimum=0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop entries must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _integer("stop_token_ids entry", t, minimum=0)
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SamplingError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --- the stages, one row at a time (float64) ------------------------------------------------


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Seen tokens: positive logits divided by the penalty, negative ones multiplied (HF/CTRL)."""
    if penalty == 1.0 or len(seen) == 0:
        return logits
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    # Ids past the lm_head (a padded embedding) cannot be generated; transformers skips them too.
    ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
    out = logits.copy()
    picked = out[ids]
    with np.errstate(over="ignore"):  # a tiny penalty overflows to +inf: _softmax handles it
        out[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 1.0:
        return logits
    finite = np.isfinite(logits)
    with np.errstate(over="ignore"):
        out = logits / temperature
        if np.isinf(out[finite]).any():
            # A tiny temperature (1e-310) overflows: the same distribution from logits shifted to a
            # maximum of 0 (the best tokens stay at 0, the rest go to -inf), instead of inf - inf = NaN.
            out = (logits - logits[finite].max()) / temperature
    return out


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep every token scoring at least the k-th best (ties at the boundary survive, as in HF)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -top_k)[-top_k]
    return np.where(logits < kth, -np.inf, logits)


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Drop the least likely tokens whose total probability is at most 1 - top_p (keep >= 1)."""
    if top_p >= 1.0:
        return logits
    # Removed tokens (-inf) have probability 0 and would be dropped anyway: sort only the rest,
    # which after top-k is a handful instead of the whole vocabulary.
    alive = np.flatnonzero(np.isfinite(logits))
    order = alive[np.argsort(logits[alive], kind="stable")]  # ascending, like transformers
    remove = np.cumsum(_softmax(logits[order])) <= (1.0 - top_p)
    remove[-1] = False  # the most likely token always stays
    out = np.full_like(logits, -np.inf)
    kept = order[~remove]
    out[kept] = logits[kept]
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    # +inf scores (a repetition penalty of 1e-310 divides a logit past float64): they share all the
    # mass, where exp(inf - inf) would give NaN.
    e = np.isposinf(x).astype(np.float64) if np.isposinf(m) else np.exp(x - m)
    return e / e.sum()


def warp_logits(logits: np.ndarray, seen: np.ndarray, params: SamplingParams) -> np.ndarray:
    """One row's logits after every stage that ``params`` enables (float64 [V], -inf = removed)."""
    x = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), seen, params.repetition_penalty)
    if params.greedy:
        return x
    x = apply_temperature(x, params.temperature)
    x = apply_top_k(x, params.top_k)
    return apply_top_p(x, params.top_p)


def token_probabilities(logits: np.ndarray, seen: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution a sampled step draws from (float64 [V]); for tests and logprobs."""
    return _softmax(warp_logits(logits, seen, params))


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw: one uniform number per step, so a seeded stream stays aligned."""
    cdf = np.cumsum(probs)
    # side="right" never lands on a zero-probability token (its cdf equals its predecessor's).
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if index >= len(probs):  # u * total rounded up to total: take the last possible token
        index = int(np.flatnonzero(probs)[-1])
    return index


# --- the sampler ----------------------------------------------------------------------------


class Sampler:
    """Chooses the next token for each row of a batch; one parameter set and generator per row."""

    def __init__(self, params: SamplingParams | Sequence[SamplingParams], batch_size: int) -> None:
        _integer("batch_size", batch_size, minimum=1)
        rows = [params] * batch_size if isinstance(params, SamplingParams) else list(params)
        if len(rows) != batch_size:
            raise SamplingError(f"got {len(rows)} sampling parameter sets for a batch of {batch_size}")
        self.params: tuple[SamplingParams, ...] = tuple(rows)
        self.generators = tuple(np.random.Generator(np.random.PCG64(p.seed)) for p in rows)

    def next(self, logits: np.ndarray, seen: Sequence[np.ndarray]) -> np.ndarray:
        """logits [B, V] and each row's seen ids (prompt + generated) -> next ids int64 [B]."""
        logits = np.asarray(logits)
        batch = len(self.params)
        if logits.ndim != 2 or logits.shape[0] != batch:
            raise SamplingError(f"logits must have shape [{batch}, vocab], got {list(logits.shape)}")
        if len(seen) != batch:
            raise SamplingError(f"seen must hold one id array per row ({batch}), got {len(seen)}")
        out = np.empty(batch, dtype=np.int64)
        for row, (params, rng) in enumerate(zip(self.params, self.generators)):
            out[row] = self._next_row(row, logits[row], np.asarray(seen[row]), params, rng)
        return out

    @staticmethod
    def _next_row(row: int, logits: np.ndarray, seen: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
        if np.isnan(logits).any() or np.isposinf(logits).any() or not np.isfinite(logits).any():
            raise SamplingError(f"logits of row {row} contain NaN or +inf or are all -inf; the model output is broken")
        x = warp_logits(logits, seen, params)
        if params.greedy:
            return int(np.argmax(x))  # first maximum, like torch.argmax
        return draw(_softmax(x), rng)


# --- stop strings ---------------------------------------------------------------------------


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text`` (output is cut there), or None."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def stop_holdback(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters a stream must hold: the longest tail that starts a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest
