"""Continuous batching: requests join and leave shared steps over one preallocated KV cache.

    submit -> [check context + plan] -> FIFO of waiting requests -> [admit into a free slot when its
    RopePlan equals the running ones'] -> step: every slot adds its own rows to the cache
    (a prefill chunk, 1 decode token, or 0 = idle) -> [sample per slot] -> [TextStream: deltas,
    stop strings] -> finished / cancelled slots are free for the next request at once

The cache is [max_slots, Hkv, capacity + 1, D] per layer, allocated once; a slot's positions
restart at 0 when a new request takes it, so its stale rows are simply overwritten. The graph takes
per-row chunks (`query_seqlens`), so one step can prefill a joining request while the others decode;
logits are taken at each row's last valid position.

Each request samples with its own `Sampler` (its own PCG64 stream), so it draws the random numbers
it draws alone through `Engine.stream_text`; its logits equal the solo run's up to floating-point
batch variance, not bit for bit: ONNX Runtime's CPU MoE kernel sums in an order that depends on
the other tokens of the call (idle slots' padding rows too), and reused or room-cut prefill
computes K/V in other chunks (~1e-6 in the tiny model's logits). So a greedy request gives the same
tokens unless two logits tie that closely, and a seeded one unless a draw lands that close to a
step of its cumulative distribution (then it takes the neighbouring token and goes on from there);
the tests compare token for token for their cases. vLLM and TensorRT-LLM are not batch-invariant
by default either. All slots share one cos/sin table
set, so requests with different rope plans (rope mode dynamic: short and long requests) never share
steps: a request whose plan differs waits, and the requests queued behind it wait too (the queue's
head goes first, so it cannot starve), until the running ones finish. The queue is in arrival order
(policy "fcfs") or in (priority, arrival) order (policy "priority": a request that keeps getting
overtaken by more urgent ones can wait as long as they keep coming, as in vLLM).

Prefix reuse: a finished request's slot keeps the K/V rows of its prompt and output. A new request
goes to the free slot whose kept tokens share the longest prefix with its prompt and prefills only
the rest (multi-turn chat re-sends the whole history each turn; only the new turn is computed).
Kept rows are dropped when the rope tables change.

Not thread-safe: one thread owns the scheduler (and the engine); others only set `cancelled`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .engine import Engine, GenerationResult, RequestError, TextStream
from .sampling import Sampler, SamplingParams, TokenLogprob, token_logprob
from .speculative import NgramSpeculation
from .yarn import ContextLengthError, RopePlan, check_context, context_limit

# Tokens per request (prompt + max_new_tokens) when the caller sets none, capped by the model's
# context for its rope mode: Qwen2's pretrained window. ONNX Runtime's step time does not grow with
# the capacity (attention reads each slot's own length), and cache pages are touched only once
# written; a longer YaRN context is opt-in because 8 slots x 128k positions is tens of GB on the 57B.
DEFAULT_CAPACITY = 32768
# Prefix sharing between running requests (backends that can copy cache rows): a shorter common
# prefix is recomputed rather than copied, and never makes a request wait.
MIN_SHARED = 16
POLICIES = ("fcfs", "priority")  # the waiting queue's order: arrival, or (priority, arrival)


@dataclass(eq=False)
class Generation:
    """One request in the scheduler. Callbacks run on the scheduler's thread: `on_token` with each
    sampled token id, `on_logprob` with each
    generated token's log-probabilities (only if the params ask for logprobs) before `on_delta`
    with the text it completes (if any), then `on_finish` exactly once (finish_reason "stop" |
    "length", or "cancelled" when `cancelled` was set first), or `on_error` if a step failed.
    Every sampling field applies here but `prompt_logprobs`, which needs the whole prompt's logits:
    the caller scores it (Engine.iter_prompt_logprobs, as the server does between steps)."""

    prompt_ids: list[int]
    params: SamplingParams
    plan: RopePlan
    on_delta: Callable[[str], None] = lambda delta: None
    on_logprob: Callable[[TokenLogprob], None] = lambda logprob: None
    on_token: Callable[[int], None] = lambda token: None  # every sampled token, first (metrics)
    on_finish: Callable[[GenerationResult], None] = lambda result: None
    on_error: Callable[[BaseException], None] = lambda error: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    priority: int = 0  # scheduling policy "priority": lower runs first (vLLM's); equal ones in arrival order
    admitted_at: float | None = None  # time.monotonic() when it got a slot (metrics: queue and prefill time)
    cached_tokens: int = 0  # prompt tokens whose K/V it found in the cache (prefix reuse), not computed again
    result: GenerationResult = field(init=False)

    def __post_init__(self) -> None:
        self.result = GenerationResult(list(self.prompt_ids), logprobs=None if self.params.logprobs is None else [])


@dataclass(eq=False)
class _Slot:
    """A running generation's state: how much of it is in the cache, what it has produced."""

    gen: Generation
    sampler: Sampler
    text: TextStream
    seen: np.ndarray  # prompt + generated ids, for the repetition penalty
    cached: int = 0  # rows of this slot's cache that hold the request's tokens
    admitted: int = 0  # admission order (prompt chunks of a limited step go first to the earliest)
    next_token: int = -1  # the sampled token the next step feeds (-1: still prefilling)
    draft: list[int] = field(default_factory=list)  # speculative tokens the current step feeds after next_token


class BatchScheduler:
    def __init__(self, engine: Engine, max_slots: int = 8, capacity: int | None = None,
                 speculation: NgramSpeculation | None = None, max_step_tokens: int | None = None,
                 policy: str = "fcfs") -> None:
        """speculation: n-gram draft tokens verified in each decode step (runtime/speculative.py).
        max_step_tokens: the most tokens one step runs (vLLM's max_num_batched_tokens; None: each
        prefilling request runs up to a prefill chunk), at least max_slots: decoding requests always
        step, so a long prompt's prefill cannot stall them for more than this many tokens' time.
        policy: "fcfs" (arrival order) or "priority" (submit's priority, then arrival)."""
        if max_slots < 1:
            raise RequestError(f"max_slots must be >= 1, got {max_slots}")
        limit = context_limit(engine.config, engine.rope_mode)
        if capacity is not None and capacity < 2:
            raise RequestError(f"capacity must be >= 2 tokens, got {capacity}")
        self.engine = engine
        self.max_slots = max_slots
        if capacity is None:  # a TensorRT engine's profile bounds the cache (minus the spare row)
            capacity = min(DEFAULT_CAPACITY, getattr(engine.backend, "max_capacity", DEFAULT_CAPACITY + 1) - 1)
        self.capacity = min(limit, capacity)
        # +1: the spare row an idle entry may point at (see Engine.stream_tokens)
        self._cache = engine.backend.new_cache(max_slots, self.capacity + 1)
        self._plan: RopePlan | None = None  # the tables bound to the cache
        self._slots: list[_Slot | None] = [None] * max_slots
        # Prefix cache: the tokens whose K/V a free slot still holds (rows [0, len)) from its last
        # request; a new request that starts with them skips their prefill (valid for one plan).
        self._kept: list[list[int]] = [[] for _ in range(max_slots)]
        self.reused_tokens = 0  # prompt tokens served from kept K/V instead of prefill (monitoring, tests)
        self.copied_tokens = 0  # of those, copied from a running request's rows
        self.admitted_tokens = 0  # prompt tokens of every request admitted to a slot
        self._copy = bool(getattr(engine.backend, "can_copy_rows", False))
        self._last = np.zeros(max_slots, np.int32)  # seqlens_k of each slot's latest step (idle rows keep it)
        self._waiting: deque[Generation] = deque()
        self.steps = 0
        self.max_batch = 0  # most slots that ever shared one step (monitoring, tests)
        self.speculation = speculation
        if max_step_tokens is not None and (isinstance(max_step_tokens, bool) or not isinstance(max_step_tokens, int)
                                            or max_step_tokens < max_slots):
            raise RequestError(f"max_num_batched_tokens (tokens per step) must be an integer >= the batch slots "
                               f"({max_slots}), got {max_step_tokens!r}")
        self.max_step_tokens = max_step_tokens
        if policy not in POLICIES:
            raise RequestError(f"the scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self._admissions = 0
        self.draft_tokens = 0  # speculative tokens fed (monitoring, tests)
        self.accepted_tokens = 0  # of those, the ones verification kept

    # --- requests ----------------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None) -> tuple[SamplingParams, RopePlan]:
        """The request's parameters (eos ids filled in) and rope plan; raises before any compute
        (RequestError, ContextLengthError) for a request this scheduler cannot run."""
        p = self.engine._params(sampling)
        self.engine.check_prompt(prompt_ids)
        n, m = len(prompt_ids), p.max_new_tokens
        plan = check_context(self.engine.config, self.engine.rope_mode, n, m)
        if n + m > self.capacity:
            raise ContextLengthError(
                f"prompt has {n} tokens and max_new_tokens is {m} ({n + m} in total), over the server's "
                f"per-request capacity of {self.capacity}; shorten the prompt or lower max_new_tokens")
        return p, plan

    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None, priority: int = 0,
               **callbacks) -> Generation:
        """Queue a request (checked first); it starts at the first step with a free slot and a
        matching plan. With policy "priority", the queue is ordered by priority (lower first), then
        arrival; running requests are never preempted."""
        p, plan = self.check(prompt_ids, sampling)
        if priority != 0 and self.policy != "priority":
            raise RequestError("priority needs the scheduling policy 'priority' (qmoe serve --scheduling-policy "
                               "priority)")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RequestError(f"priority must be an integer, got {priority!r}")
        gen = Generation(list(map(int, prompt_ids)), p, plan, priority=priority, **callbacks)
        if self.policy == "priority":  # before the first queued request of a higher value
            at = next((i for i, g in enumerate(self._waiting) if g.priority > priority), len(self._waiting))
            self._waiting.insert(at, gen)
        else:
            self._waiting.append(gen)
        return gen

    def has_work(self) -> bool:
        return bool(self._waiting) or any(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def cache_usage(self) -> float:
        """The fraction of the KV cache's rows that running requests hold (vLLM's kv_cache_usage_perc;
        a finished request's kept rows count as free: the next request may overwrite them)."""
        return sum(s.cached for s in self._slots if s is not None) / (self.max_slots * self.capacity)

    # --- steps -------------------------------------------------------------------------------

    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones, run one step for every running slot. A
        failing step ends every running request with on_error, then raises."""
        self._drop_cancelled()
        self._admit()
        if not self.running:
            return
        try:
            logits, q = self._run_step()
            self._sample(logits, q)
        except Exception as e:
            for b, slot in enumerate(self._slots):
                if slot is not None:
                    self._slots[b] = None
                    slot.gen.on_error(e)
            raise

    def _drop_cancelled(self) -> None:
        for b, slot in enumerate(self._slots):
            if slot is not None and slot.gen.cancelled.is_set():
                self._finish(b, "cancelled")
        for gen in [g for g in self._waiting if g.cancelled.is_set()]:
            self._waiting.remove(gen)
            gen.result.finish_reason = "cancelled"
            gen.on_finish(gen.result)

    def _admit(self) -> None:
        free = [b for b, s in enumerate(self._slots) if s is None]
        postponed: list[Generation] = []
        while free and self._waiting:
            gen = self._waiting[0]
            if self.running and gen.plan != self._plan:
                break  # it waits for the running requests to finish; so do those behind it (FIFO)
            if gen.plan != self._plan:
                self._bind(gen.plan)
            if self._copy and self._prefilling(gen):
                # its prefix is being computed: it copies the rows in a later step, and keeps a free
                # slot meanwhile (the one with the least kept K/V), so later requests cannot take them all
                postponed.append(self._waiting.popleft())
                free.remove(min(free, key=lambda i: len(self._kept[i])))
                continue
            self._waiting.popleft()
            try:  # checked at submit; a constraint that still fails to build ends only its request
                sampler = Sampler(gen.params, 1, self.engine.matchers(gen.params, 1))
            except Exception as e:  # noqa: BLE001
                gen.on_error(e)
                continue
            # the free slot whose kept tokens share the longest prefix with this prompt; at least
            # the prompt's last token is always run, for its logits
            common = {b: _common_prefix(self._kept[b], gen.prompt_ids) for b in free}
            b = max(free, key=lambda i: (common[i], -len(self._kept[i])))
            reuse = min(common[b], len(gen.prompt_ids) - 1)
            src, shared = self._running_prefix(gen) if self._copy else (-1, 0)
            if min(shared, len(gen.prompt_ids) - 1) > max(reuse, MIN_SHARED - 1):
                # a running request computed more of it: copy into the free slot whose kept K/V
                # (a finished chat, say) is the least to lose
                reuse = min(shared, len(gen.prompt_ids) - 1)
                b = min(free, key=lambda i: len(self._kept[i]))
                self.engine.backend.copy_rows(self._cache, src, b, reuse)
                self.copied_tokens += reuse
            free.remove(b)
            self.reused_tokens += reuse
            self.admitted_tokens += len(gen.prompt_ids)
            self._kept[b] = []
            self._admissions += 1
            gen.admitted_at = time.monotonic()
            gen.cached_tokens = reuse
            self._slots[b] = _Slot(gen, sampler, TextStream(
                self.engine.tokenizer, gen.params, gen.result), np.array(gen.prompt_ids, np.int64), cached=reuse,
                admitted=self._admissions)
        self._waiting.extendleft(reversed(postponed))

    def _running_prefix(self, gen: Generation) -> tuple[int, int]:
        """The running slot whose cache rows share the longest prefix with gen's prompt, and that length."""
        best = (-1, 0)
        for b, slot in enumerate(self._slots):
            if slot is not None:
                tokens = (slot.gen.prompt_ids + slot.gen.result.tokens)[: slot.cached]
                best = max(best, (b, _common_prefix(tokens, gen.prompt_ids)), key=lambda x: x[1])
        return best

    def _prefilling(self, gen: Generation) -> bool:
        """A running request is still prefilling a prefix of at least MIN_SHARED tokens that gen's
        prompt starts with (n choices of one prompt; requests with one long system prompt): gen
        waits until its rows are computed, then copies them, rather than computing the same K/V in
        the same steps."""
        limit = len(gen.prompt_ids) - 1
        for slot in self._slots:
            if slot is not None and slot.next_token < 0:
                common = min(_common_prefix(slot.gen.prompt_ids, gen.prompt_ids), limit)
                if common >= MIN_SHARED and common > slot.cached:
                    return True
        return False

    def _bind(self, plan: RopePlan) -> None:
        self.engine.bind_rope(self._cache, plan, self.capacity + 1)
        self._plan = plan
        self._kept = [[] for _ in range(self.max_slots)]  # K/V rotated with other tables

    def _run_step(self) -> tuple[np.ndarray, np.ndarray]:
        """One backend step: each slot's new rows, right-padded. Returns logits [B, N, V] (N: 1,
        or 1 + the longest draft: a drafting slot gets the logits of every row it feeds) and Q [B]."""
        B = self.max_slots
        cache_rows = self.capacity + 1
        # Every row of a step, idle or not, needs room for the step's padded chunk (S rows) after
        # its past tokens (GroupQueryAttention checks past + S <= cache rows for each row): prefill
        # chunks shrink while another request runs close to the capacity.
        room = min((cache_rows - s.cached for s in self._slots if s is not None), default=cache_rows)
        chunk = max(1, min(self.engine.prefill_chunk, room))
        q = np.zeros(B, np.int32)
        rows: list[list[int]] = [[] for _ in range(B)]
        active = [(b, s) for b, s in enumerate(self._slots) if s is not None]
        decoding = [(b, s) for b, s in active if s.next_token >= 0]
        # The step's token budget (max_step_tokens): every decoding request's token first, then its
        # drafts, then prompt chunks in admission order; a prefill that gets nothing waits a step.
        # Drafts leave one token to the prompt chunks when a request prefills (budget >= max_slots:
        # there is one), or drafts accepted every step would hold its prefill until they finish.
        budget = (self.max_step_tokens - len(decoding)) if self.max_step_tokens is not None else None
        reserve = int(len(decoding) < len(active))
        for b, slot in decoding:
            # draft tokens fit the tokens left to generate, every row's room for the step, the
            # longest step the engine takes (its prefill chunk: a TensorRT engine's max_chunk) and the budget
            left = slot.gen.params.max_new_tokens - len(slot.gen.result.tokens) - 1
            limit = min(left, room - 1, self.engine.prefill_chunk - 1, budget - reserve if budget is not None else left)
            slot.draft = [] if self.speculation is None else self.speculation.propose(slot.seen, limit)
            rows[b] = [slot.next_token, *slot.draft]
            self.draft_tokens += len(slot.draft)
            if budget is not None:
                budget -= len(slot.draft)
        for b, slot in sorted(((b, s) for b, s in active if s.next_token < 0), key=lambda x: x[1].admitted):
            take = chunk if budget is None else min(chunk, budget)  # prefill: the next chunk of the prompt
            rows[b] = slot.gen.prompt_ids[slot.cached: slot.cached + take]
            if budget is not None:
                budget -= len(rows[b])
        for b, _ in active:
            q[b] = len(rows[b])
        S = int(q.max())
        ids = np.zeros((B, S), np.int64)  # [B, max Q]
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        for b, slot in enumerate(self._slots):
            if slot is not None and (q[b] > 0 or slot.cached > 0):
                # a prefill left out of this step (q 0) keeps its rows: cached + S fits, as room counts it
                slot.cached += int(q[b])
                self._last[b] = slot.cached - 1
            elif slot is not None:  # left out before its first row: nothing of it to keep
                self._last[b] = min(int(self._last[b]) + 1, cache_rows - S) - 1
            else:
                # Idle: past = last + 1 rows stay untouched (its kept K/V); the padded chunk may
                # write after them, so past moves down where S rows would not fit, and the kept
                # tokens from there on are forgotten.
                past = min(int(self._last[b]) + 1, cache_rows - S)
                self._last[b] = past - 1
                del self._kept[b][past:]
        wanted = 1 + max((len(s.draft) for _, s in decoding), default=0)
        at = np.repeat(np.maximum(q - 1, 0)[:, None], wanted, axis=1).astype(np.int64)  # [B, N]: last row
        for b, slot in decoding:
            if slot.draft:
                at[b, : q[b]] = np.arange(q[b])  # every row a drafting slot feeds
        logits = self.engine.backend.step(self._cache, ids, q, self._last.copy(), at)
        self.steps += 1
        self.max_batch = max(self.max_batch, int((q > 0).sum()))
        return logits, q

    def _sample(self, logits: np.ndarray, q: np.ndarray) -> None:
        for b, slot in enumerate(self._slots):
            if slot is None or q[b] == 0:
                continue
            gen = slot.gen
            if slot.next_token < 0 and slot.cached < len(gen.prompt_ids):
                continue  # more prompt chunks to go
            draft, slot.draft = slot.draft, []  # only a decoding slot drafts
            fed = slot.cached - int(q[b])  # rows before this step
            # Verify: sample each fed row in order, as plain decoding would; a sample equal to the
            # draft token keeps it (its K/V is valid), the first that differs (or the row after
            # the last draft token) is the step's last token.
            for j in range(len(draft) + 1):
                tok, going = self._take(b, slot, logits[b: b + 1, j, :])
                kept = j < len(draft) and tok == draft[j]
                self.accepted_tokens += int(kept)  # the one that ends the request too (a stop token or string)
                if not going:  # finished, or failed: rows up to j hold valid K/V
                    break
                if kept:
                    continue
                slot.next_token = tok
                break
            if draft:  # drop the rejected draft tokens' rows
                valid = fed + j + 1
                slot.cached = valid
                self._last[b] = valid - 1
                if self._slots[b] is None:
                    self._kept[b] = self._kept[b][:valid]

    def _take(self, b: int, slot: _Slot, row: np.ndarray) -> tuple[int, bool]:
        """Samples one token for slot b from `row` [1, V] and hands it on: (the token, -1 if
        sampling failed; whether the request goes on: False once it ended (stop, length, a stop
        string, or a failure), its slot free then)."""
        gen = slot.gen
        try:
            tok = int(slot.sampler.next(row, [slot.seen], [slot.seen[len(gen.prompt_ids):]])[0])
        except Exception as e:  # noqa: BLE001  this request's grammar or sampling failed (a
            # grammar past llguidance's limits, penalties past float64): it ends, the others go on
            self._slots[b] = None
            gen.on_error(e)
            return -1, False
        slot.seen = np.append(slot.seen, tok)
        p = gen.params
        n = len(gen.result.tokens) + 1
        reason = "stop" if tok in slot.text.stop_ids else ("length" if n == p.max_new_tokens else None)
        gen.on_token(tok)
        lp = None if p.logprobs is None else token_logprob(row[0], tok, p.logprobs)
        if lp is not None:
            gen.on_logprob(lp)
        delta = slot.text.push(tok, reason, lp)
        if delta:
            gen.on_delta(delta)
        if slot.text.stopped:
            self._finish(b, gen.result.finish_reason)
            return tok, False
        if reason:
            tail = slot.text.finish()
            if tail:
                gen.on_delta(tail)
            self._finish(b, gen.result.finish_reason)
            return tok, False
        return tok, True

    def _finish(self, b: int, reason: str) -> None:
        slot = self._slots[b]
        assert slot is not None
        self._slots[b] = None
        # rows [0, cached) hold the K/V of exactly these tokens (the last sampled one is never fed)
        self._kept[b] = (slot.gen.prompt_ids + slot.gen.result.tokens)[: slot.cached]
        slot.gen.result.finish_reason = reason
        slot.gen.on_finish(slot.gen.result)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def stream(scheduler: BatchScheduler, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
           ) -> Iterator[str]:
    """Runs one request to completion on a scheduler nobody else steps (e.g. `qmoe chat`), yielding
    its text deltas; the request's checks raise before the first delta."""
    deltas: deque[str] = deque()
    errors: list[BaseException] = []
    gen = scheduler.submit(prompt_ids, sampling, on_delta=deltas.append, on_error=errors.append)

    def run() -> Iterator[str]:
        try:
            while scheduler.has_work():
                scheduler.step()
                while deltas:
                    yield deltas.popleft()
        finally:
            gen.cancelled.set()  # a consumer that stops early frees the slot
            if scheduler.has_work():
                scheduler.step()
        if errors:
            raise errors[0]

    return run()
