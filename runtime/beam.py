"""Beam search with transformers' semantics (`generate(num_beams=K, do_sample=False)`).

    prompt -> [prefill row 0 of a K-row cache] -> each step: log-softmax of every live beam's
    next-token logits + its running score -> the best max(2, 1 + #eos) * K continuations
      -> those ending in eos (or at max_new_tokens) among the best K become finished hypotheses,
         scored sum_logprob / generated_length ** length_penalty; the best K others run on
      -> the cache rows are gathered by parent beam -> stop when the finished hypotheses cannot
         be beaten (early_stopping False: transformers' heuristic; True: K finished; "never":
         the canonical bound) or at max_new_tokens
    -> the best `num_return_sequences` hypotheses, best first

This mirrors transformers 5's vectorised `_beam_search` step for step (candidate counts, which
candidates may finish, the length penalty's length, the early-stop heuristic), so the same logits
give the same sequences; the test compares with transformers itself. Scores are float64 here
(transformers: float32), which matters only for exact ties.

The K beams share one request: the prompt is prefilled once and its K/V copied as beams fork, so
the cache holds K rows of prompt + max_new_tokens. Reordering rows is a host copy: ONNX Runtime's
CPU provider only (the CUDA provider and TensorRT refuse beam search with a one-line error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .errors import QmoeError

if TYPE_CHECKING:
    from .engine import Engine
    from .yarn import RopeMode

MAX_BEAMS = 16
NEG = -1.0e9  # transformers' "impossible" score
MAX_PENALTY_LOG = 600.0  # |length_penalty| * ln(max_new_tokens) at most: length ** length_penalty in [1e-260, 1e260]


class BeamSearchError(QmoeError, ValueError):
    pass


@dataclass(frozen=True)
class BeamSearchParams:
    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0  # exponent on the generated length; > 0 favours longer outputs
    early_stopping: bool | str = False  # False | True | "never", as transformers
    num_return_sequences: int = 1
    stop_token_ids: tuple[int, ...] = ()  # empty: the model's eos ids
    ignore_eos: bool = False  # the model's eos ids end no beam (other stop_token_ids still do, as in sampling)

    def __post_init__(self) -> None:
        def whole(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
                bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise BeamSearchError(f"{name} must be an integer {bound}, got {v!r}")

        whole("num_beams", 1, MAX_BEAMS)
        whole("max_new_tokens", 1)
        whole("num_return_sequences", 1, int(self.num_beams))
        lp = self.length_penalty
        try:  # (an integer beyond float's range: an OverflowError)
            finite = not isinstance(lp, bool) and isinstance(lp, (int, float)) and math.isfinite(lp)
        except OverflowError:
            finite = False
        if not finite:
            raise BeamSearchError(f"length_penalty must be a finite number, got {lp!r}"[:200])
        # scores are divided by length ** length_penalty, lengths up to max_new_tokens: keep that a
        # float (Python's ** raises OverflowError past 1e308; transformers fails the same way)
        if abs(lp) * math.log(self.max_new_tokens) > MAX_PENALTY_LOG:
            raise BeamSearchError(f"length_penalty must be in [-{MAX_PENALTY_LOG / math.log(self.max_new_tokens):.4g}, "
                                  f"{MAX_PENALTY_LOG / math.log(self.max_new_tokens):.4g}] for max_new_tokens "
                                  f"{self.max_new_tokens} (length ** length_penalty must stay a float), got {lp!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise BeamSearchError(f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise BeamSearchError("stop_token_ids must be a list of token ids")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class Beam:
    tokens: list[int]  # generated ids (an eos that ended it included)
    score: float  # sum of log-probabilities / len(tokens) ** length_penalty
    finish_reason: str  # "stop" (an eos token) | "length"
    text: str = ""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first (stable among equals, as torch.topk on CPU
    tends to be; exact ties are not expected with real logits)."""
    k = min(k, values.shape[-1])
    part = np.argpartition(-values, k - 1)[:k]
    return part[np.argsort(-values[part], kind="stable")]


def beam_search(engine: "Engine", prompt: Sequence[int], params: BeamSearchParams,
                rope_mode: "RopeMode | None" = None) -> list[Beam]:
    """The best `num_return_sequences` beams for one token-id prompt, best first."""
    steps = beam_steps(engine, prompt, params, rope_mode)
    for _ in steps:
        pass
    return steps.result


class beam_steps:  # noqa: N801  (an iterator used like a function)
    """beam_search one model step per next(): a server runs other requests' steps in between.
    `.result` holds the beams once the iterator is exhausted."""

    def __init__(self, engine: "Engine", prompt: Sequence[int], params: BeamSearchParams,
                 rope_mode: "RopeMode | None" = None) -> None:
        from .yarn import check_context

        backend = engine.backend
        if not getattr(backend, "can_copy_rows", False):
            raise BeamSearchError(f"beam search reorders K/V rows on the host: it runs on ONNX Runtime's CPU provider, "
                                  f"not on {getattr(backend, 'name', 'this backend')} "
                                  f"({getattr(backend, 'device', '?')})")
        engine.check_prompt(prompt)
        self.engine, self.p = engine, params
        self.prompt = [int(t) for t in prompt]
        self.plan = check_context(engine.config, rope_mode or engine.rope_mode, len(self.prompt),
                                  params.max_new_tokens)
        # as SamplingParams.stop_ids: ignore_eos drops the model's eos ids, other stop ids still stop
        model_eos = tuple(engine.tokenizer.eos_token_ids)
        self.eos = tuple(t for t in (params.stop_token_ids or model_eos) if not (params.ignore_eos and t in model_eos))
        self.result: list[Beam] = []
        self._it = self._run()

    def __iter__(self) -> "beam_steps":
        return self

    def __next__(self) -> None:
        return next(self._it)

    def _run(self) -> Iterator[None]:
        engine, p, backend = self.engine, self.p, self.engine.backend
        K, L, N = p.num_beams, len(self.prompt), p.max_new_tokens
        keep = max(2, 1 + len(self.eos)) * K
        # one beam: transformers' generate runs greedy search, which ends at the first eos whatever
        # early_stopping and length_penalty say; a finished hypothesis fills the one slot, so stop then
        early_stopping = True if K == 1 else p.early_stopping
        capacity = L + N + 1
        cache = backend.new_cache(K, capacity)
        engine.bind_rope(cache, self.plan, capacity)
        ids = np.zeros((K, L), np.int64)
        ids[0] = self.prompt
        lengths = np.zeros(K, np.int32)
        lengths[0] = L
        logits = engine._prefill(cache, ids, lengths)[:, 0, :]  # row 0's; rows 1.. are idle
        yield

        running = np.zeros((K, N), np.int64)  # generated tokens of each running beam
        run_scores = np.full(K, NEG)
        run_scores[0] = 0.0
        done_tokens: list[list[int]] = [[] for _ in range(K)]  # finished hypotheses (K slots)
        done_scores = np.full(K, NEG)
        done_eos = np.zeros(K, bool)
        done_filled = np.zeros(K, bool)  # transformers' is_sent_finished
        heuristic_open = True  # transformers' is_early_stop_heuristic_unsatisfied
        eos = np.array(self.eos, np.int64)
        for t in range(N):  # t tokens generated so far
            cur_len = L + t
            logp = _log_softmax(logits) + run_scores[:, None]  # [K, V]
            V = logp.shape[-1]
            flat = logp.reshape(-1)
            cand = _top(flat, keep)
            cand_scores, parents, tokens = flat[cand], cand // V, cand % V
            is_eos = np.isin(tokens, eos) if len(eos) else np.zeros(len(cand), bool)
            hits = is_eos | (t + 1 == N)  # stopping criteria: an eos token, or max length
            # the running beams: the best K candidates that did not stop
            running_scores = cand_scores + hits * NEG
            nxt = _top(running_scores, K)
            new_running = np.zeros_like(running)
            new_running[:, :t] = running[parents[nxt], :t]
            new_running[:, t] = tokens[nxt]
            # finished hypotheses: among the best K candidates, those that stopped
            finishing = hits & (np.arange(len(cand)) < K)
            penalised = cand_scores / float(t + 1) ** p.length_penalty
            all_full = bool(done_filled.all()) and early_stopping is True
            penalised = penalised + (NEG if all_full else 0.0) + (0.0 if heuristic_open else NEG) + ~finishing * NEG
            merged_scores = np.concatenate([done_scores, penalised])
            order = _top(merged_scores, K)
            new_tokens, new_scores, new_eos, new_filled = [], np.empty(K), np.zeros(K, bool), np.zeros(K, bool)
            for j, m in enumerate(order):
                if m < K:
                    new_tokens.append(done_tokens[m])
                    new_eos[j], new_filled[j] = done_eos[m], done_filled[m]
                else:
                    c = m - K
                    new_tokens.append([*running[parents[c], :t].tolist(), int(tokens[c])])
                    new_eos[j], new_filled[j] = bool(is_eos[c]), bool(finishing[c])
                new_scores[j] = merged_scores[m]
            done_tokens, done_scores, done_eos, done_filled = new_tokens, new_scores, new_eos, new_filled
            running, run_scores = new_running, running_scores[nxt]
            beam_parents = parents[nxt]
            # transformers' stop conditions, after the step
            best_len = (N if early_stopping == "never" and p.length_penalty > 0.0 else t + 1)
            best_running = run_scores[0] / float(best_len) ** p.length_penalty
            worst_done = done_scores.min() if done_filled.any() else NEG
            heuristic_open = heuristic_open and bool(best_running > worst_done)
            if not heuristic_open or (done_filled.all() and early_stopping is True) or hits.all():
                break
            # next step: reorder the K/V rows by parent beam, then feed each beam's new token
            backend.reorder_rows(cache, beam_parents, cur_len)
            step_len = np.ones(K, np.int32)
            logits = backend.step(cache, running[:, t][:, None], step_len, np.full(K, cur_len, np.int32),
                                  np.zeros((K, 1), np.int64))[:, 0, :]
            yield
        beams = []
        for j in range(p.num_return_sequences):
            tokens_j = done_tokens[j]
            reason = "stop" if done_eos[j] else "length"
            beams.append(Beam(tokens_j, float(done_scores[j]), reason,
                              engine.tokenizer.decode(tokens_j, skip_special_tokens=True)))
        self.result = beams
