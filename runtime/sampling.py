"""Next-token selection: greedy or sampled, with transformers' semantics and order.

    logits [B, V] -> [logit bias] -> [repetition penalty] -> [presence / frequency penalty]
        -> greedy: first maximum | sampled: [temperature] -> [top-k] -> [top-p] -> [min-p] -> draw

The stages are the ones ``generate`` applies, in its order (``SequenceBiasLogitsProcessor`` with
one-token sequences, ``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``), each a small pure function on one
row, computed in float64. transformers has no presence/frequency penalty: they follow OpenAI's
definition as vLLM applies it (after the repetition penalty, counting generated tokens only).
Greedy (temperature 0) applies the bias and penalties and takes the first maximum, as transformers
does with ``do_sample=False``.

Before every stage, masks set tokens to -inf (vLLM's request fields, vLLM v1's semantics): the
structured-output constraint, ``allowed_token_ids`` (every other token), ``bad_words`` (the last
token of a banned sequence whose other tokens end the generated ids) and ``min_tokens`` (the stop
token ids, eos included even with ignore_eos, until min_tokens tokens are generated; under a
structured output that allows only stop tokens the constraint wins). A row that no token survives
fails alone (SamplingError).

Log-probabilities (``logprobs``) are those of the model's own distribution, log-softmax of the raw
logits before any mask or stage, as vLLM reports them by default (its ``raw_logprobs`` mode).

Every row owns a ``numpy.random.Generator(PCG64(seed))`` and draws exactly one uniform number per
sampled step, so a seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtime.errors import QmoeError
from runtime.structured import Matcher, StructuredOutput


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
    ignore_eos: bool = False  # eos does not stop (stop_token_ids beyond it still do): benchmarks, parity tests
    min_p: float = 0.0  # 0 = off; keeps tokens with probability >= min_p x the top one's
    presence_penalty: float = 0.0  # [-2, 2]; subtracted once from each token already generated
    frequency_penalty: float = 0.0  # [-2, 2]; subtracted per occurrence in the generated tokens
    logit_bias: Any = ()  # {token id: bias in [-100, 100]} added to the raw logits; stored as sorted pairs
    logprobs: int | None = None  # None = off; k = each token's log-probability and the k likeliest (<= 20)
    structured: StructuredOutput | None = None  # JSON schema / regex / choice / grammar the output must match
    # vLLM's (v1 semantics):
    min_tokens: int = 0  # stop token ids (eos too, even with ignore_eos) and stop strings wait for this many tokens
    allowed_token_ids: tuple[int, ...] | None = None  # None = off; else only these ids can be generated
    bad_words: tuple[str, ...] = ()  # words never generated (tokenized by the engine, as vLLM does)
    # the token sequences banned: the engine adds bad_words' (vLLM's update_from_tokenizer); may be set directly
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    include_stop_str_in_output: bool = False  # the matched stop string (or stop token's text) stays in the text
    skip_special_tokens: bool = True  # False: special tokens render in the text (and logprob token strings)
    prompt_logprobs: int | None = None  # None = off; k = each prompt token's log-probability, rank and top k (<= 20)

    def __post_init__(self) -> None:
        # JSON requests give lists and a single stop string; store tuples so params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):
            raise SamplingError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise SamplingError(f"stop_token_ids must be a list of token ids, got {type(self.stop_token_ids).__name__}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)):
                raise SamplingError(f"allowed_token_ids must be a list of token ids, got "
                                    f"{type(self.allowed_token_ids).__name__}")
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if not isinstance(self.bad_words, (list, tuple)):
            raise SamplingError(f"bad_words must be a list of strings, got {type(self.bad_words).__name__}")
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        sequences = self.bad_words_token_ids
        if not isinstance(sequences, (list, tuple)) or not all(isinstance(x, (list, tuple)) for x in sequences):
            raise SamplingError(f"bad_words_token_ids must be a list of token id lists, got {sequences!r}"[:200])
        object.__setattr__(self, "bad_words_token_ids", tuple(tuple(x) for x in sequences))
        for name in ("temperature", "top_p", "repetition_penalty", "min_p", "presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        self.validate()

    def validate(self) -> None:
        """Raise SamplingError (one line, naming the field) for an invalid value."""
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise SamplingError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_TOP_LOGPROBS:
                raise SamplingError(f"logprobs must be at most {MAX_TOP_LOGPROBS} alternatives, got {self.logprobs}")
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
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise SamplingError(f"structured must be a runtime.structured.StructuredOutput, got "
                                    f"{type(self.structured).__name__}")
            if self.ignore_eos:
                raise SamplingError("ignore_eos cannot be combined with structured output (a complete output "
                                    "allows only eos)")
        _integer("min_tokens", self.min_tokens, minimum=0)
        if self.min_tokens > self.max_new_tokens:
            raise SamplingError(f"min_tokens must be at most the maximum number of new tokens ({self.max_new_tokens}), "
                                f"got {self.min_tokens}")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise SamplingError("allowed_token_ids must not be empty (leave it out to allow every token)")
            for t in self.allowed_token_ids:
                _integer("allowed_token_ids entry", t, minimum=0)
        for w in self.bad_words:
            if not isinstance(w, str) or not w.strip():
                raise SamplingError(f"bad_words entries must be non-empty strings (not only whitespace), got {w!r}")
        for seq in self.bad_words_token_ids:
            if not seq:
                raise SamplingError("bad_words_token_ids entries must be non-empty lists of token ids")
            for t in seq:
                _integer("bad_words_token_ids entry", t, minimum=0)
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.prompt_logprobs is not None:
            _integer("prompt_logprobs", self.prompt_logprobs, minimum=0)
            if self.prompt_logprobs > MAX_TOP_LOGPROBS:
                raise SamplingError(f"prompt_logprobs must be at most {MAX_TOP_LOGPROBS} alternatives, got "
                                    f"{self.prompt_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def stops(self, eos_ids: Sequence[int]) -> frozenset[int]:
        """The ids that end the generation: stop_token_ids, less the model's eos ids with
        ignore_eos (other stop ids still stop, as in vLLM)."""
        return frozenset(set(self.stop_token_ids) - set(eos_ids) if self.ignore_eos else self.stop_token_ids)


def bad_word_sequences(words: Sequence[str], encode: Callable[[str], list[int]]) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenization of bad_words (SamplingParams.update_from_tokenizer): each word without its
    leading whitespace, and with one space before it when that starts with another token and has
    as many tokens (the word inside a text). `encode` adds no special tokens."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(encode(word.lstrip()))
        out.append(bare)
        spaced = tuple(encode(" " + word.lstrip()))
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return tuple(out)


MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI and vLLM cap them
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a bias: -100 bans a token, 100 forces it


class LogitBias(tuple):
    """Sorted (token id, bias) pairs (a tuple: equal and hashable as one), with the ids and biases
    also as arrays, built once: a step adds them with one indexed add, whatever their number."""

    ids: np.ndarray
    values: np.ndarray

    def __new__(cls, pairs: Sequence[tuple[int, float]]) -> "LogitBias":
        self = super().__new__(cls, pairs)
        self.ids = np.array([t for t, _ in pairs], np.int64)
        self.values = np.array([b for _, b in pairs], np.float64)
        return self


def _bias_pairs(value: Any) -> LogitBias:
    """{id: bias} (JSON gives ids as strings) or pairs -> LogitBias, validated."""
    if isinstance(value, LogitBias):  # already checked (dataclasses.replace of a SamplingParams)
        return value
    items = value.items() if isinstance(value, dict) else value
    if not isinstance(items, (list, tuple, type({}.items()))):
        raise SamplingError(f"logit_bias must map token ids to numbers, got {type(value).__name__}")
    out: dict[int, float] = {}
    item: Any
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise SamplingError(f"logit_bias must map token ids to numbers, got the entry {item!r}")
        key, bias = item
        token = key
        if isinstance(key, str) and key.isascii() and key.isdecimal() and len(key) <= 18:
            token = int(key)
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
            raise SamplingError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        bias = _number("logit_bias value", bias)
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise SamplingError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")
        out[int(token)] = bias
    return LogitBias(sorted(out.items()))


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SamplingError(f"{name} must be an integer >= {minimum}, got {value!r}")


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded with `seed` (n > 1): choice 0 keeps the seed,
    the others get independent streams derived from (seed, index) by numpy's SeedSequence."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0])


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


def apply_logit_bias(logits: np.ndarray, bias: LogitBias) -> np.ndarray:
    """Adds each (token id, bias); ids past the lm_head (a padded embedding) are skipped."""
    if not bias:
        return logits
    keep = bias.ids < logits.shape[-1]
    out = logits.copy()
    out[bias.ids[keep]] += bias.values[keep]
    return out


def apply_presence_frequency(logits: np.ndarray, generated: np.ndarray, presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit -= frequency x count + presence x (count > 0), over generated ids."""
    if (presence == 0 and frequency == 0) or len(generated) == 0:
        return logits
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    keep = (ids >= 0) & (ids < logits.shape[-1])
    ids, counts = ids[keep], counts[keep]
    out = logits.copy()
    out[ids] -= frequency * counts + presence
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 1.0:
        return logits
    with np.errstate(over="ignore"):
        out = logits / temperature
        if np.isinf(out).any():
            finite = np.isfinite(logits)
            if np.isinf(out[finite]).any():
                # A tiny temperature (1e-310) overflows: the same distribution from logits shifted to a
                # maximum of 0 (the best tokens stay at 0, the rest go to -inf), instead of inf - inf = NaN.
                out = (logits - logits[finite].max()) / temperature
    return out


# The filters work on candidate sets (token ids ascending and their logits), not on the whole
# vocabulary: a full sort of 152k logits costs ~10 ms a row, and a sampler running on the host must
# keep up with a GPU's decode step for every row of a batch. Tokens outside the set have probability
# 0; adding their zeros to a sum changes nothing, so draws equal those over the whole vocabulary.

_NUCLEUS_TRIES = (256, 4096, 32768)  # top-p without top-k: candidate counts tried before a full sort


def _head(x: np.ndarray, k: int) -> np.ndarray:
    """Positions of every value at least the k-th largest (ties included), ascending; 0 < k < len(x).
    A strided subsample's k-th largest is at most the whole array's, so the values at or above it
    (about stride x k of them) hold the answer: select there instead of in the whole array."""
    stride = max(1, len(x) // max(64 * k, 1024))
    sample = x[::stride]
    if stride > 1 and len(sample) > k:
        near = np.flatnonzero(x >= np.partition(sample, -k)[-k])
        return near[x[near] >= np.partition(x[near], -k)[-k]]
    return np.flatnonzero(x >= np.partition(x, -k)[-k])


def _top_k(ids: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every token scoring at least the k-th best (ties at the boundary survive, as in HF)."""
    if k <= 0 or k >= len(x):
        return ids, x
    keep = _head(x, k)
    return ids[keep], x[keep]


def _top_p(ids: np.ndarray, x: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """transformers' rule: sort ascending (stable: among equal logits the lower id counts as
    smaller) and drop the tokens whose cumulative probability is at most 1 - top_p; the likeliest
    token always stays. When the likeliest few hundred tokens (every tie of the last one included)
    hold at least top_p, every other token is dropped, so only they need sorting; a flatter
    distribution takes a larger head, sized from how much the first one held."""
    if top_p >= 1.0:
        return ids, x
    probs = _softmax(x)
    first = _NUCLEUS_TRIES[0]
    if first < len(x):
        head = _head(x, first)
        mass = probs[head].sum()
        if mass >= top_p:
            return _nucleus(ids, x, probs, head, top_p)
        # a flat tail holds about mass / first per token: skip heads that cannot reach top_p
        for m in _NUCLEUS_TRIES[1:]:
            if m < len(x) and m * mass / first >= top_p:
                head = _head(x, m)
                if probs[head].sum() >= top_p:
                    return _nucleus(ids, x, probs, head, top_p)
    return _nucleus(ids, x, probs, np.arange(len(x)), top_p)


def _nucleus(ids: np.ndarray, x: np.ndarray, probs: np.ndarray, head: np.ndarray,
             top_p: float) -> tuple[np.ndarray, np.ndarray]:
    # transformers' sums: ascending, starting from the mass of the tokens below the head (all
    # dropped), so an exact tie with 1 - top_p rounds the same way. The order among equal logits
    # does not change the sums (equal values): an unstable sort counts the tokens that stay, and
    # the tie at the boundary is then settled the stable way (among equal logits the higher ids
    # stay; head is ascending).
    order = head[np.argsort(x[head])]
    below = probs.sum() - probs[head].sum() if len(head) < len(x) else 0.0
    cum = below + np.cumsum(probs[order])
    n = max(1, len(order) - int(np.count_nonzero(cum <= 1.0 - top_p)))
    last = x[order[len(order) - n]]
    over, tied = head[x[head] > last], head[x[head] == last]
    keep = np.sort(np.concatenate((over, tied[len(tied) - (n - len(over)):])))
    return ids[keep], x[keep]


def _min_p(ids: np.ndarray, x: np.ndarray, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop tokens less likely than min_p x the likeliest token's probability (keep >= 1)."""
    if min_p <= 0:
        return ids, x
    probs = _softmax(x)
    keep = np.flatnonzero(probs >= min_p * probs.max())
    return ids[keep], x[keep]


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    # +inf scores (a repetition penalty of 1e-310 divides a logit past float64): they share all the
    # mass, where exp(inf - inf) would give NaN.
    if np.isposinf(m):
        e = np.isposinf(x).astype(np.float64)
    else:  # exp in place: into a new array numpy's exp is ~5x slower here (measured, 152k float64)
        e = np.subtract(x, m, dtype=np.float64)
        np.exp(e, out=e)
    e /= e.sum()
    return e


def _penalised(logits: np.ndarray, seen: np.ndarray, params: SamplingParams,
               generated: np.ndarray | None) -> np.ndarray:
    x = apply_logit_bias(np.asarray(logits, dtype=np.float64), params.logit_bias)
    x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if generated is not None:
        x = apply_presence_frequency(x, generated, params.presence_penalty, params.frequency_penalty)
    return x


def candidates(logits: np.ndarray, seen: np.ndarray, params: SamplingParams,
               generated: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A sampled step's possible tokens: (ids ascending, their logits after every stage), float64.
    Every other token has probability 0."""
    x = apply_temperature(_penalised(logits, seen, params, generated), params.temperature)
    ids = np.arange(len(x))
    if not np.isneginf(x).any():
        alive = (ids, x)
    else:  # a tiny temperature sends all but the best to -inf: they cannot be drawn
        keep = np.flatnonzero(x > -np.inf)
        alive = (keep, x[keep])
    if len(alive[0]) == 0:
        return alive  # nothing can be drawn: the sampler says so for its row
    ids, x = _top_k(*alive, params.top_k)
    ids, x = _top_p(ids, x, params.top_p)
    return _min_p(ids, x, params.min_p)


def warp_logits(logits: np.ndarray, seen: np.ndarray, params: SamplingParams,
                generated: np.ndarray | None = None) -> np.ndarray:
    """One row's logits after every stage that ``params`` enables (float64 [V], -inf = removed).
    seen: prompt + generated ids (repetition penalty); generated: the generated ids alone
    (presence / frequency penalties; None = no tokens generated yet)."""
    if params.greedy:
        return _penalised(logits, seen, params, generated)
    ids, x = candidates(logits, seen, params, generated)
    out = np.full(np.shape(logits)[-1], -np.inf)
    out[ids] = x
    return out


def token_probabilities(logits: np.ndarray, seen: np.ndarray, params: SamplingParams,
                        generated: np.ndarray | None = None) -> np.ndarray:
    """The distribution a sampled step draws from (float64 [V]); for tests."""
    return _softmax(warp_logits(logits, seen, params, generated))


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model, and the `top` likeliest tokens'
    (id, log-probability), most likely first (ties: lower id first); `rank` (if asked for): 1 +
    the number of tokens strictly likelier (vLLM's)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


def chat_logprob(entry: TokenLogprob, tokenizer: Any, skip_special_tokens: bool = True) -> dict[str, Any]:
    """One TokenLogprob in OpenAI chat's shape ({token, logprob, bytes, top_logprobs: [{token,
    logprob, bytes}]}), as `qmoe serve` and the Triton model send it: each id decoded alone (a
    special token is "" unless skip_special_tokens is false; a piece of a UTF-8 character decodes
    to U+FFFD, `bytes` has its real bytes). tokenizer: a runtime.tokenizer.Tokenizer."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token], skip_special_tokens=skip_special_tokens)
        return {"token": text, "logprob": logprob, "bytes": list(tokenizer.token_bytes(token)) if text else []}

    return {**one(entry.token, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}


def token_logprob(logits: np.ndarray, token: int, top: int = 0, rank: bool = False) -> TokenLogprob:
    """log-softmax of one row's raw logits (float64) at `token`, plus the `top` likeliest tokens
    (and the token's rank with `rank`)."""
    x = np.asarray(logits)
    m = float(x.max())
    e = np.subtract(x, m, dtype=np.float64)
    logz = m + float(np.log(np.exp(e, out=e).sum()))  # in place: see _softmax
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, x.shape[-1])
        head = _head(x, k) if k < x.shape[-1] else np.arange(x.shape[-1])  # every tie at the boundary too
        order = head[np.lexsort((head, -x[head]))][:k]  # logit descending, then id
        best = tuple((int(i), float(x[i]) - logz) for i in order)
    place = int(np.count_nonzero(x > x[token])) + 1 if rank else None
    return TokenLogprob(int(token), float(x[token]) - logz, best, place)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw: one uniform number per step, so a seeded stream stays aligned. `probs`
    (float64, the caller's temporary) is overwritten with its running sum: in place, as numpy
    is several times slower writing 152k sums into a new array (see _softmax)."""
    cdf = np.cumsum(probs, out=probs)
    # side="right" never lands on a zero-probability token (its cdf equals its predecessor's).
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if index >= len(cdf):  # u * total rounded up to total: take the last possible token
        index = int(np.flatnonzero(np.diff(cdf, prepend=0.0))[-1])
    return index


# --- masks (vLLM's request fields) ---------------------------------------------------------


def banned_tokens(sequences: Sequence[Sequence[int]], generated: np.ndarray | None) -> list[int]:
    """vLLM's bad words rule: the last token of every sequence whose other tokens end the generated
    ids (a one-token sequence: always)."""
    gen = () if generated is None else generated
    out = []
    for seq in sequences:
        k = len(seq) - 1
        if k > len(gen):
            continue
        if k == 0 or all(int(a) == b for a, b in zip(gen[len(gen) - k:], seq[:k])):
            out.append(seq[k])
    return out


def apply_masks(row: int, logits: np.ndarray, params: SamplingParams, generated: np.ndarray | None,
                allowed: np.ndarray | None = None, constrained: bool = False) -> np.ndarray:
    """allowed_token_ids (`allowed`: its ids as an array), bad_words and min_tokens: the tokens they
    forbid now at -inf. Ids past the row (a smaller test vocabulary) are skipped. min_tokens yields
    to a structured output (`constrained`) that allows only stop tokens; otherwise a row left with
    no token raises SamplingError."""
    V = logits.shape[-1]
    x = logits
    masked = False
    if allowed is not None:
        ids = allowed[allowed < V]
        x = np.full(V, -np.inf)
        x[ids] = logits[ids]
        masked = True
    banned = banned_tokens(params.bad_words_token_ids, generated) if params.bad_words_token_ids else []
    if banned:
        if not masked:
            x = np.array(x, np.float64)
        x[[t for t in banned if t < V]] = -np.inf
        masked = True
    if masked and not np.isfinite(x).any():
        raise SamplingError(f"row {row}: no token is left: allowed_token_ids, bad_words and the structured output "
                            "exclude every one")
    done = 0 if generated is None else len(generated)
    if done < params.min_tokens and params.stop_token_ids:
        stops = [t for t in params.stop_token_ids if t < V]
        y = np.array(x, np.float64)
        y[stops] = -np.inf
        if np.isfinite(y).any():
            return y
        if not constrained:
            raise SamplingError(f"row {row}: min_tokens forbids the stop tokens and nothing else is allowed")
        # a complete structured output allows only eos: the constraint wins over min_tokens
    return x


# --- the sampler ----------------------------------------------------------------------------


class Sampler:
    """Chooses the next token for each row of a batch; one parameter set and generator per row."""

    def __init__(self, params: SamplingParams | Sequence[SamplingParams], batch_size: int,
                 matchers: Sequence[Matcher | None] | None = None) -> None:
        """matchers: each row's structured-output state (None: unconstrained)."""
        _integer("batch_size", batch_size, minimum=1)
        rows = [params] * batch_size if isinstance(params, SamplingParams) else list(params)
        if len(rows) != batch_size:
            raise SamplingError(f"got {len(rows)} sampling parameter sets for a batch of {batch_size}")
        self.params: tuple[SamplingParams, ...] = tuple(rows)
        self.generators = tuple(np.random.Generator(np.random.PCG64(p.seed)) for p in rows)
        self.matchers: tuple[Matcher | None, ...] = tuple(matchers) if matchers is not None else (None,) * batch_size
        if len(self.matchers) != batch_size:
            raise SamplingError(f"got {len(self.matchers)} matchers for a batch of {batch_size}")
        # allowed_token_ids as arrays, built once per row
        self._allowed = tuple(None if p.allowed_token_ids is None
                              else np.unique(np.asarray(p.allowed_token_ids, np.int64)) for p in rows)

    def next(self, logits: np.ndarray, seen: Sequence[np.ndarray],
             generated: Sequence[np.ndarray] | None = None, active: np.ndarray | None = None) -> np.ndarray:
        """logits [B, V], each row's seen ids (prompt + generated) and generated ids (presence /
        frequency penalties; None: nothing generated yet) -> next ids int64 [B]. Rows where
        `active` is False (finished) draw nothing and get 0."""
        logits = np.asarray(logits)
        batch = len(self.params)
        if logits.ndim != 2 or logits.shape[0] != batch:
            raise SamplingError(f"logits must have shape [{batch}, vocab], got {list(logits.shape)}")
        if len(seen) != batch:
            raise SamplingError(f"seen must hold one id array per row ({batch}), got {len(seen)}")
        if generated is not None and len(generated) != batch:
            raise SamplingError(f"generated must hold one id array per row ({batch}), got {len(generated)}")
        out = np.zeros(batch, dtype=np.int64)
        for row, (params, rng, matcher) in enumerate(zip(self.params, self.generators, self.matchers)):
            if active is not None and not active[row]:
                continue
            gen = None if generated is None else np.asarray(generated[row])
            out[row] = self._next_row(row, logits[row], np.asarray(seen[row]), params, rng, gen, matcher,
                                      self._allowed[row])
            if matcher is not None:
                matcher.consume(int(out[row]))
        return out

    @staticmethod
    def _next_row(row: int, logits: np.ndarray, seen: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                  generated: np.ndarray | None, matcher: Matcher | None = None,
                  allowed: np.ndarray | None = None) -> int:
        if np.isnan(logits).any() or np.isposinf(logits).any() or not np.isfinite(logits).any():
            raise SamplingError(f"logits of row {row} contain NaN or +inf or are all -inf; the model output is broken")
        if matcher is not None:
            logits = matcher.mask(logits)
        logits = apply_masks(row, logits, params, generated, allowed, constrained=matcher is not None)
        if params.greedy:
            return int(np.argmax(_penalised(logits, seen, params, generated)))  # first maximum, like torch.argmax
        ids, x = candidates(logits, seen, params, generated)
        if len(ids) == 0:  # penalties past float64 (or a bias under a grammar) sent every logit to -inf
            raise SamplingError(f"row {row}: every token has probability 0 after the penalties; lower them")
        return int(ids[draw(_softmax(x), rng)])


# --- stop strings ---------------------------------------------------------------------------


def match_stop(text: str, stop: Sequence[str], after: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in ``text`` that ends past position `after` (min_tokens: the text
    of the first tokens cannot hold one): (where it starts, the string), or None."""
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s, max(0, after - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text`` (output is cut there), or None."""
    hit = match_stop(text, stop)
    return None if hit is None else hit[0]


def stop_holdback(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters a stream must hold: the longest tail that starts a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


# Sampling fields a request (or generation_config.json) may set; top_k, min_p and repetition_penalty are vLLM's.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(artifact: str | Path, temperature: float = 1.0) -> dict[str, Any]:
    """Sampling values for fields a request leaves out: those generation_config.json sets (as vLLM
    does), greedy if it says do_sample=false; a temperature it leaves out is 1 with do_sample=true,
    else `temperature` (serve: OpenAI's 1; qmoe run: greedy)."""
    path = Path(artifact) / "generation_config.json"
    try:
        gen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QmoeError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(gen, dict):
        raise QmoeError(f"{path}: expected a JSON object")
    if gen.get("do_sample") is False:
        return {"temperature": 0.0}
    unset = 1.0 if gen.get("do_sample") is True else temperature
    defaults = {"temperature": unset, **{k: gen[k] for k in SAMPLING_FIELDS if gen.get(k) is not None}}
    try:
        SamplingParams(**defaults)
    except SamplingError as e:
        raise QmoeError(f"{path}: {e}") from None
    return defaults
