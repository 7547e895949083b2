"""The embedded API: load an artifact, generate token ids, chat with streaming text.

    engine = runtime.load("artifacts/tiny")
    results = engine.generate([[9707, 11], [151644]], SamplingParams(max_new_tokens=16))
    for delta in engine.chat([{"role": "user", "content": "hi"}], stream=True): print(delta, end="")

Per request batch: [check context + choose rope tables] -> [allocate KV cache once, sized
prompt + max_new_tokens] -> [prefill: all prompts right-padded in one step] -> [decode steps:
finished rows go idle (query_seqlens 0) and cost no cache writes] -> [stop on eos ids, stop
strings, max_new_tokens].
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import manifest as mf
from . import structured
from .backends import open_backend
from .errors import QmoeError
from .sampling import (
    Sampler,
    SamplingParams,
    TokenLogprob,
    bad_word_sequences,
    match_stop,
    stop_holdback,
    token_logprob,
)
from .tokenizer import Tokenizer
from .tools import validate_tools
from .yarn import RopeMode, RopePlan, check_context, default_rope_mode, plan_tables


class RequestError(QmoeError, ValueError):
    pass


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (eos id or stop string) | "length"
    text: str | None = None  # set by the text-level APIs
    logits: list[np.ndarray] | None = None  # per generated token, [V] float32, if asked for
    logprobs: list[TokenLogprob] | None = None  # per generated token, if SamplingParams.logprobs is set
    # per prompt token (None for the first, else with its rank), if SamplingParams.prompt_logprobs is
    # set (Engine.generate / stream_text; the scheduler leaves them to its caller)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class TokenEvent:
    """One decode step for one row (streaming)."""

    row: int
    token: int
    finished: bool
    finish_reason: str | None
    logprob: TokenLogprob | None = None  # if SamplingParams.logprobs is set


class _RowView:
    """The caller's `cancelled` set (global row indices) seen from a sub-batch (local indices)."""

    def __init__(self, cancelled: set[int], rows: list[int]) -> None:
        self.cancelled, self.rows = cancelled, rows

    def __iter__(self) -> Iterator[int]:
        return (i for i, g in enumerate(self.rows) if g in self.cancelled)

    def __bool__(self) -> bool:
        return any(g in self.cancelled for g in self.rows)


class Engine:
    def __init__(self, artifact: str | Path, backend: str = "auto", device: str = "auto",
                 rope_mode: RopeMode | None = None, prefill_chunk: int = 2048, threads: int | None = None) -> None:
        for name, v in (("prefill_chunk", prefill_chunk), ("threads", 1 if threads is None else threads)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise RequestError(f"{name} must be an integer >= 1, got {v!r}")
        self.prefill_chunk = prefill_chunk
        self.artifact = Path(artifact)
        self.manifest = mf.read(self.artifact)
        self.config = self.manifest.config
        self.backend = open_backend(self.artifact, self.manifest, backend, device, threads)
        # a TensorRT engine's prefill profile bounds the chunk it accepts
        self.prefill_chunk = min(self.prefill_chunk, getattr(self.backend, "max_chunk", self.prefill_chunk))
        self.tokenizer = Tokenizer.from_dir(self.artifact)
        self.rope_mode: RopeMode = rope_mode or default_rope_mode(self.config)
        check_context(self.config, self.rope_mode, 0, 0)  # validates the mode for this model

    # --- token level ------------------------------------------------------------------------

    def _params(self, sampling: SamplingParams | None) -> SamplingParams:
        p = sampling or SamplingParams()
        if not p.stop_token_ids:
            p = replace(p, stop_token_ids=tuple(self.tokenizer.eos_token_ids))
        V = self.config.vocab_size
        if any(t >= V for t, _ in p.logit_bias):
            raise RequestError(f"logit_bias keys must be token ids in [0, {V}), got "
                               f"{next(t for t, _ in p.logit_bias if t >= V)}")
        if p.allowed_token_ids is not None:
            n = min(V, self.tokenizer.vocab_size)  # vLLM: ids the tokenizer has
            if any(t >= n for t in p.allowed_token_ids):
                raise RequestError(f"allowed_token_ids must be token ids in [0, {n}), got "
                                   f"{next(t for t in p.allowed_token_ids if t >= n)}")
            if p.min_tokens and set(p.allowed_token_ids) <= set(p.stop_token_ids):
                raise RequestError("min_tokens cannot be combined with allowed_token_ids that are all stop tokens "
                                   "(nothing could be generated before min_tokens)")
        if p.bad_words:  # vLLM's tokenization; the same ids each time, so this is idempotent
            found = bad_word_sequences(p.bad_words, self.tokenizer.encode)
            p = replace(p, bad_words_token_ids=tuple(dict.fromkeys(p.bad_words_token_ids + found)))
        if any(t >= V for seq in p.bad_words_token_ids for t in seq):
            raise RequestError(f"bad_words_token_ids must be token ids in [0, {V})")
        if p.structured is not None:
            if not set(self.tokenizer.eos_token_ids) <= set(p.stop_token_ids):
                raise RequestError("structured output ends with one of the tokenizer's eos tokens, which "
                                   "stop_token_ids must all include")
            structured.check(p.structured, self.tokenizer, V)
        return p

    def matchers(self, p: SamplingParams, rows: int) -> list[structured.Matcher] | None:
        """Each row's structured-output state for `p` (None: unconstrained)."""
        return structured.matchers(p.structured, self.tokenizer, self.config.vocab_size, rows)

    def check_prompt(self, ids: Sequence[int]) -> None:
        """Raises RequestError for an empty prompt or a token id outside the vocabulary."""
        if len(ids) == 0:
            raise RequestError("every prompt needs at least one token")
        V = self.config.vocab_size
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise RequestError("prompt token ids must be integers")
        if any(not 0 <= int(t) < V for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {V})")

    def bind_rope(self, cache, plan: RopePlan, rows: int) -> None:
        """Binds the plan's cos/sin tables to a cache of `rows` positions. Tables shorter than the
        cache are padded: the spare row is never a real position, but GQA wants the rows."""
        cos, sin = plan_tables(self.config, plan, rows)
        if len(cos) < rows:
            cos, sin = (np.pad(t, ((0, rows - len(t)), (0, 0)), mode="edge") for t in (cos, sin))
        self.backend.bind_rope(cache, cos, sin)

    def stream_tokens(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
                      rope_mode: RopeMode | None = None, on_logits: Callable[[int, np.ndarray], None] | None = None,
                      cancelled: set[int] | None = None) -> Iterator[TokenEvent]:
        """Yields each generated token of each row as it is produced (rows are batched). Rows the
        consumer adds to `cancelled` between tokens (a stop string, a gone client) go idle."""
        p = self._params(sampling)
        if len(prompts) == 0:
            raise RequestError("every prompt needs at least one token")
        for x in prompts:
            self.check_prompt(x)
        prompts = [list(map(int, x)) for x in prompts]
        mode = rope_mode or self.rope_mode
        # Each row's own plan (rope mode dynamic: a short request keeps the unscaled tables whatever
        # else is in the batch); one cache binds one table set, so rows of different plans run as
        # separate batches, one after the other.
        plans = [check_context(self.config, mode, len(x), p.max_new_tokens) for x in prompts]
        for plan in dict.fromkeys(plans):
            rows = [i for i, q in enumerate(plans) if q == plan]
            sub_logits = None if on_logits is None else (lambda i, row, rows=rows: on_logits(rows[i], row))
            sub_cancelled = _RowView(cancelled, rows) if cancelled is not None else None
            for ev in self._stream_batch([prompts[i] for i in rows], p, plan, sub_logits, sub_cancelled):
                yield replace(ev, row=rows[ev.row])

    def _stream_batch(self, prompts: list[list[int]], p: SamplingParams, plan: RopePlan,
                      on_logits: Callable[[int, np.ndarray], None] | None,
                      cancelled: "set[int] | _RowView | None") -> Iterator[TokenEvent]:
        """stream_tokens for rows that share one rope plan (row indices local to `prompts`)."""
        B = len(prompts)
        lengths = np.array([len(x) for x in prompts], np.int32)
        S = int(lengths.max())
        # +1: idle rows of a decode step point one past their last token (the tensorrt graph's
        # ScatterND writes there), which must stay inside the buffer.
        capacity = S + p.max_new_tokens + 1
        cache = self.backend.new_cache(B, capacity)
        self.bind_rope(cache, plan, capacity)
        sampler = Sampler(p, B, self.matchers(p, B))

        ids = np.zeros((B, S), np.int64)
        for i, x in enumerate(prompts):
            ids[i, : len(x)] = x
        seen = [np.array(x, np.int64) for x in prompts]
        logits = self._prefill(cache, ids, lengths)
        cache_len = lengths.copy()
        active = np.ones(B, bool)
        stop_ids = p.stops(self.tokenizer.eos_token_ids)
        for n in range(p.max_new_tokens):
            nxt = sampler.next(logits[:, 0, :], seen, [x[len(prompt):] for x, prompt in zip(seen, prompts)], active)
            for i in np.flatnonzero(active):
                tok = int(nxt[i])
                if on_logits is not None:
                    on_logits(int(i), logits[i, 0].copy())
                seen[i] = np.append(seen[i], tok)
                reason = "stop" if tok in stop_ids else ("length" if n + 1 == p.max_new_tokens else None)
                if reason:
                    active[i] = False
                lp = None if p.logprobs is None else token_logprob(logits[i, 0], tok, p.logprobs)
                yield TokenEvent(int(i), tok, reason is not None, reason, lp)
            if not active.any():
                return
            if cancelled:
                active[[i for i in cancelled if 0 <= i < B]] = False
            if not active.any():
                return
            step_len = active.astype(np.int32)  # idle rows: query_seqlens 0, cache untouched
            cache_len = cache_len + step_len
            logits = self.backend.step(cache, np.where(active, nxt, 0)[:, None], step_len, cache_len - 1,
                                       np.zeros((B, 1), np.int64))

    def _prefill(self, cache, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Prompts in chunks of `prefill_chunk` positions: attention scratch stays bounded
        ([heads, chunk, context] rather than [heads, prompt, prompt] for a 32k prompt). Rows whose
        prompt ended in an earlier chunk are idle (query_seqlens 0). Returns each row's last-token
        logits [B, 1, V]."""
        B, S = ids.shape
        out: np.ndarray | None = None
        for c0 in range(0, S, self.prefill_chunk):
            c1 = min(S, c0 + self.prefill_chunk)
            q = np.clip(lengths - c0, 0, c1 - c0).astype(np.int32)  # valid rows of this chunk
            last = np.clip(lengths - 1 - c0, 0, c1 - c0 - 1)[:, None].astype(np.int64)
            # a row of length 0 (beam search prefills one row of its cache) is idle from the start
            logits = self.backend.step(cache, ids[:, c0:c1], q, np.maximum(np.minimum(lengths, c1) - 1, 0), last)
            if out is None:
                out = logits
            here = (lengths - 1 >= c0) & (lengths - 1 < c1)
            out[here] = logits[here]
        assert out is not None
        return out

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0, max_new_tokens: int = 0,
                        rope_mode: RopeMode | None = None, chunk: int = 128,
                        rank: bool = False) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first),
        with the `top` likeliest alternatives (and its rank with `rank`): what `echo` with
        `logprobs` and vLLM's `prompt_logprobs` return, and what evaluation harnesses score a text
        with. The rope tables are those a request of len(ids) + max_new_tokens would use, as its
        generation does."""
        out: list[TokenLogprob | None] = []
        for part in self.iter_prompt_logprobs(ids, top, max_new_tokens, rope_mode, chunk, rank):
            out.extend(part)
        return out

    def iter_prompt_logprobs(self, ids: Sequence[int], top: int = 0, max_new_tokens: int = 0,
                             rope_mode: RopeMode | None = None, chunk: int = 128, rank: bool = False,
                             ) -> Iterator[list[TokenLogprob | None]]:
        """prompt_logprobs one chunk of positions at a time (a server interleaves them with its
        other requests' steps). The prompt runs through its own cache; each chunk's logits
        ([chunk, V] float32, 78 MB for Qwen2's vocabulary at 128) are all kept. Checks raise at
        the first next()."""
        self.check_prompt(ids)
        ids = [int(t) for t in ids]
        plan = check_context(self.config, rope_mode or self.rope_mode, len(ids), max_new_tokens)
        capacity = len(ids) + 1
        cache = self.backend.new_cache(1, capacity)
        self.bind_rope(cache, plan, capacity)
        yield [None]
        step = max(1, min(chunk, self.prefill_chunk))
        for c0 in range(0, len(ids) - 1, step):  # the last token predicts nothing in the prompt
            c1 = min(len(ids) - 1, c0 + step)
            n = c1 - c0
            logits = self.backend.step(cache, np.array([ids[c0:c1]], np.int64), np.array([n], np.int32),
                                       np.array([c1 - 1], np.int32), np.arange(n, dtype=np.int64)[None])
            yield [token_logprob(logits[0, i], ids[c0 + i + 1], top, rank) for i in range(n)]

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | None = None,
                 rope_mode: RopeMode | None = None, output_logits: bool = False) -> list[GenerationResult]:
        """Generates for several token-id prompts of any lengths at once."""
        p = self._params(sampling)
        results = [GenerationResult(list(map(int, x)), logits=[] if output_logits else None,
                                    logprobs=None if p.logprobs is None else []) for x in prompts]
        if p.prompt_logprobs is not None:  # scored through a cache of their own, as the server's echo
            for r in results:
                r.prompt_logprobs = self.prompt_logprobs(r.prompt_tokens, p.prompt_logprobs, p.max_new_tokens,
                                                         rope_mode, rank=True)
        on_logits = (lambda i, row: results[i].logits.append(row)) if output_logits else None  # type: ignore[union-attr]
        streams = [TextStream(self.tokenizer, p, r) for r in results]
        texts: list[list[str]] = [[] for _ in results]
        cancelled: set[int] = set()
        for ev in self.stream_tokens(prompts, p, rope_mode, on_logits, cancelled):
            texts[ev.row].append(streams[ev.row].push(ev.token, ev.finish_reason, ev.logprob))
            if streams[ev.row].stopped and not ev.finished:
                cancelled.add(ev.row)  # a stop string: this row generates no more
        for r, stream, text in zip(results, streams, texts):
            r.text = "".join(text) + stream.finish()
        return results

    # --- text level -------------------------------------------------------------------------

    def complete(self, prompt: str, sampling: SamplingParams | None = None, stream: bool = False,
                 rope_mode: RopeMode | None = None):
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        return self._text(ids, sampling, stream, rope_mode)

    def chat(self, messages: Sequence[dict], sampling: SamplingParams | None = None, stream: bool = False,
             rope_mode: RopeMode | None = None, tools: Sequence[dict] | None = None):
        """A reply to a ChatML conversation: the whole text, or an iterator of text deltas. tools:
        OpenAI's function list, rendered into the prompt (runtime.tools.parse reads the calls)."""
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True,
                                         tools=validate_tools(tools) if tools else None)
        return self._text(ids, sampling, stream, rope_mode)

    def _text(self, ids: list[int], sampling, stream: bool, rope_mode):
        p = self._params(sampling)
        self._validate(ids, p, rope_mode)
        gen = self.stream_text(ids, p, rope_mode)
        if stream:
            return gen
        return "".join(d for d in gen)

    def _validate(self, ids: list[int], p: SamplingParams, rope_mode) -> None:
        # Errors before the first delta, so a streaming caller sees them at call time.
        check_context(self.config, rope_mode or self.rope_mode, len(ids), p.max_new_tokens)

    def stream_text(self, ids: list[int], sampling: SamplingParams | None = None, rope_mode=None,
                    result: GenerationResult | None = None) -> Iterator[str]:
        """Text deltas of one completion; never splits a UTF-8 character, never emits a stop
        string (text that might start one is held back until it cannot) unless
        include_stop_str_in_output. With prompt_logprobs, `result.prompt_logprobs` is set before
        the first delta."""
        p = self._params(sampling)
        text = TextStream(self.tokenizer, p, result if result is not None else GenerationResult(list(ids)))
        if p.prompt_logprobs is not None:
            text.result.prompt_logprobs = self.prompt_logprobs(ids, p.prompt_logprobs, p.max_new_tokens, rope_mode,
                                                               rank=True)
        cancelled: set[int] = set()
        for ev in self.stream_tokens([ids], p, rope_mode, cancelled=cancelled):
            delta = text.push(ev.token, ev.finish_reason if ev.finished else None, ev.logprob)
            if delta:
                yield delta
            if text.stopped:
                cancelled.add(0)
                return
            if ev.finished:
                break
        tail = text.finish()
        if tail:
            yield tail


class TextStream:
    """One completion's generated ids -> text deltas (the continuous-batching scheduler uses it too).

    Never splits a UTF-8 character (StreamDecoder; special tokens render unless
    skip_special_tokens); holds back text that might start a stop string until it cannot; cuts at
    the first stop string (`stopped`: generate no more), after it with include_stop_str_in_output
    (then nothing is held back, as in vLLM). With min_tokens, a stop string must end past the text
    of the first min_tokens tokens (vLLM v1's detokenizer). A stop token id (eos unless ignore_eos)
    is counted in `result.tokens` but adds no text unless include_stop_str_in_output. Call
    `finish()` after the last token.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, result: GenerationResult) -> None:
        self.params, self.result = params, result
        self.stop_ids = params.stops(tokenizer.eos_token_ids)
        self.stopped = False
        self._decoder = tokenizer.stream_decoder(params.skip_special_tokens)
        # decoded text: `_emitted` characters already returned (kept only to match a stop string
        # that starts in them, include_stop_str_in_output), then the held-back rest
        self._text = ""
        self._emitted = 0
        self._guard = 0  # characters of _text no stop string may end in (min_tokens)
        include = params.include_stop_str_in_output
        self._keep = max(map(len, params.stop), default=1) - 1 if include else 0

    def push(self, token: int, finish_reason: str | None = None, logprob: TokenLogprob | None = None) -> str:
        """Records one token (finish_reason: the token ends the generation; logprob: its
        log-probability, kept in `result.logprobs`); returns the text now safe to emit."""
        r, p = self.result, self.params
        r.tokens.append(token)
        if logprob is not None:
            if r.logprobs is None:
                r.logprobs = []
            r.logprobs.append(logprob)
        if finish_reason:
            r.finish_reason = finish_reason
        if token in self.stop_ids and not p.include_stop_str_in_output:
            return ""
        self._text += self._decoder.push(token)
        return self._scan(final=False)

    def finish(self) -> str:
        """The held-back tail (cut at a stop string that only the flushed text completes)."""
        if self.stopped:
            return ""
        self._text += self._decoder.flush()
        return self._scan(final=True)

    def _scan(self, final: bool) -> str:
        p = self.params
        if len(self.result.tokens) <= p.min_tokens:
            self._guard = len(self._text)
        hit = match_stop(self._text, p.stop, self._guard) if p.stop else None
        if hit is not None:
            start, stop = hit
            self.result.finish_reason, self.stopped = "stop", True
            out = self._text[self._emitted: start + len(stop) if p.include_stop_str_in_output else start]
            self._text, self._emitted, self._guard = "", 0, 0
            return out
        held = 0 if final or p.include_stop_str_in_output else stop_holdback(self._text[self._emitted:], p.stop)
        safe = len(self._text) - held
        out = self._text[self._emitted: safe]
        drop = max(0, safe - self._keep)  # what no later stop string can start in
        self._text, self._emitted, self._guard = self._text[drop:], safe - drop, max(0, self._guard - drop)
        return out


def load(artifact: str | Path, backend: str = "auto", device: str = "auto", rope_mode: RopeMode | None = None,
         prefill_chunk: int = 2048) -> Engine:
    return Engine(artifact, backend=backend, device=device, rope_mode=rope_mode, prefill_chunk=prefill_chunk)
