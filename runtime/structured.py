"""Structured output: generation constrained to a JSON schema, a regular expression, a list of
choices or a Lark grammar, through llguidance (the constraint engine vLLM, SGLang and llama.cpp use).

    StructuredOutput (in SamplingParams) -> [compile: llguidance grammar, checked against the
    tokenizer before any compute] -> per request: Matcher -> each step: token mask (-inf for every
    token the grammar forbids now) applied to the raw logits before bias, penalties and filters
    -> the sampled token advances the matcher -> once the grammar is complete only eos is allowed

JSON is compact by default (", " and ": " separators, no free whitespace): a grammar that allows
any whitespace lets a weak or unlucky model emit whitespace forever, the failure vLLM users avoid
with `--disable-any-whitespace`. Log-probabilities stay the model's own (before the mask), as vLLM
reports them by default.

llguidance needs a tokenizer description built from the tokenizer's JSON (about 2 s for Qwen2's
151k tokens); it is built once per Tokenizer, on the first constrained request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from . import request_json
from .errors import QmoeError
from .tokenizer import Tokenizer

KINDS = ("json_schema", "regex", "choice", "grammar")
# llguidance's JSON options: compact separators, no whitespace the schema does not ask for.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(QmoeError, ValueError):
    """A constraint that cannot be compiled (bad schema, regex or grammar); one line."""


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. `spec`: a JSON schema (JSON text), a regular expression, a JSON
    list of strings (choice), or a Lark grammar (grammar). Build with the classmethods."""

    kind: str
    spec: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredOutputError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise StructuredOutputError(f"structured output spec must be a string, got {type(self.spec).__name__}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str | bool = True) -> "StructuredOutput":
        """Output is JSON matching `schema` (a dict or JSON text; True: any JSON value)."""
        if isinstance(schema, str):
            try:
                schema = request_json.loads(schema)
            except request_json.RequestJSONError as e:
                raise StructuredOutputError(f"the JSON schema is not valid JSON ({e})") from None
        if schema is True:
            schema = {}  # JSON Schema's `true`: any value
        if schema is False or not isinstance(schema, dict):
            raise StructuredOutputError("a JSON schema must be an object (or true)" if schema is not False
                                        else "the JSON schema false matches nothing")
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))  # key order kept: it is the output's

    @classmethod
    def json_object(cls) -> "StructuredOutput":
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> "StructuredOutput":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> "StructuredOutput":
        if not isinstance(options, (list, tuple)) or not options or \
                not all(isinstance(o, str) and o for o in options):
            raise StructuredOutputError("choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(dict.fromkeys(options)), ensure_ascii=False))

    @classmethod
    def grammar(cls, text: str) -> "StructuredOutput":
        """A Lark grammar (llguidance's dialect) or a llama.cpp GBNF grammar."""
        return cls("grammar", text)


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency of the package
        raise StructuredOutputError("structured output needs llguidance (pip install llguidance)") from None
    return llguidance


@lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """llguidance's view of the tokenizer (ids past the tokenizer, a padded head, are never allowed)."""
    llg = _llguidance()
    eos = list(tokenizer.eos_token_ids) or None
    return llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)


@lru_cache(maxsize=256)
def _grammar(spec: StructuredOutput) -> str:
    llg = _llguidance()
    M = llg.LLMatcher
    try:
        if spec.kind == "json_schema":
            return M.grammar_from_json_schema(spec.spec, overrides=JSON_OPTIONS)
        if spec.kind == "regex":
            return M.grammar_from_regex(spec.spec)
        if spec.kind == "choice":  # one regex alternation: a Lark rule per option caps at 2000 of them
            return M.grammar_from_regex("|".join(_regex_literal(o) for o in json.loads(spec.spec)))
        return llg.grammar_from("grammar", spec.spec)  # Lark, or GBNF converted to Lark
    except (ValueError, TypeError) as e:
        raise StructuredOutputError(f"invalid {spec.kind}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _regex_literal(text: str) -> str:
    """`text` as a regex matching exactly it (llguidance's Rust regex syntax)."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~" else c for c in text)


# Bounds on what one request may ask llguidance to build, so a pathological constraint is refused
# up front instead of stalling the worker thread (a compile runs once per spec, then is copied).
MAX_SPEC_CHARS = 1 << 20


@lru_cache(maxsize=64)
def _template(spec: StructuredOutput, tokenizer: Tokenizer, vocab_size: int) -> Any:
    """The constraint compiled for this tokenizer, checked by computing its first mask (a grammar
    with no finite string fails there); generations start from copies of it."""
    if len(spec.spec) > MAX_SPEC_CHARS:
        raise StructuredOutputError(f"the {spec.kind} is {len(spec.spec)} characters, over the limit of {MAX_SPEC_CHARS}")
    llg = _llguidance()
    tok = _ll_tokenizer(tokenizer, vocab_size)
    grammar = _grammar(spec)
    message = llg.LLMatcher.validate_grammar(grammar, tok)
    if message:
        raise StructuredOutputError(f"invalid {spec.kind}: {message.splitlines()[0]}")
    matcher = llg.LLMatcher(tok, grammar, log_level=0)
    probe = matcher.deep_copy()
    bits = np.zeros((vocab_size + 31) // 32, np.int32)
    if not probe.is_error():
        probe.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
    for m in (matcher, probe):
        if m.is_error():
            raise StructuredOutputError(f"invalid {spec.kind}: {_first_line(m.get_error())}")
    return matcher


def _first_line(message: str) -> str:
    return message.splitlines()[0] if message else "llguidance gave no reason"


def check(spec: StructuredOutput, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raises StructuredOutputError (one line) if the constraint does not compile for this
    tokenizer or cannot produce a first token; compiles it once for the generations to come."""
    _template(spec, tokenizer, vocab_size)


class Matcher:
    """One generation's position in its grammar: masks a row of logits, then takes the sampled token."""

    def __init__(self, spec: StructuredOutput, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._matcher = _template(spec, tokenizer, vocab_size).deep_copy()
        self._bits = np.zeros((vocab_size + 31) // 32, np.int32)

    def allowed(self) -> np.ndarray:
        """bool [V]: the tokens the grammar allows next (eos once it is complete)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            raise StructuredOutputError(f"structured output failed: {_first_line(self._matcher.get_error())}")
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The row with every forbidden token at -inf (float64 copy)."""
        return np.where(self.allowed(), np.asarray(logits, np.float64), -np.inf)

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise StructuredOutputError(f"structured output failed at token {token}: "
                                        f"{_first_line(self._matcher.get_error())}")


def matchers(spec: StructuredOutput | None, tokenizer: Tokenizer, vocab_size: int, rows: int) -> list[Matcher] | None:
    return None if spec is None else [Matcher(spec, tokenizer, vocab_size) for _ in range(rows)]


# --- requests -------------------------------------------------------------------------------

# vLLM's request fields, each naming one kind of constraint.
VLLM_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def from_request(body: dict[str, Any]) -> tuple[StructuredOutput | None, str | None]:
    """The constraint an OpenAI-style request asks for, and the field that asked: OpenAI's
    `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema":
    ...}}), vLLM's `structured_outputs` ({"json" | "regex" | "choice" | "grammar": ...}) or its
    older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. At most one.
    Raises StructuredOutputError whose message starts with the field's name."""
    asked: list[tuple[str, str, Any]] = []  # (field, kind, value)
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise StructuredOutputError('response_format must be {"type": "text" | "json_object" | "json_schema"}')
        if fmt["type"] == "json_object":
            asked.append(("response_format", "json", {"type": "object"}))
        elif fmt["type"] == "json_schema":
            inner = fmt.get("json_schema")
            if not isinstance(inner, dict) or not isinstance(inner.get("schema"), (dict, bool)):
                raise StructuredOutputError('response_format json_schema needs "json_schema": {"name": ..., '
                                            '"schema": {...}}')
            asked.append(("response_format", "json", inner["schema"]))
    options = body.get("structured_outputs")
    if options is not None:
        if not isinstance(options, dict):
            raise StructuredOutputError("structured_outputs must be an object with one of json, regex, choice, grammar")
        unknown = sorted(set(options) - {"json", "regex", "choice", "grammar", "json_object", "backend"})
        if unknown:
            raise StructuredOutputError(f"structured_outputs: {unknown[0]} is not supported by this server")
        for key in ("json", "regex", "choice", "grammar"):
            if options.get(key) is not None:
                asked.append(("structured_outputs", key, options[key]))
        if options.get("json_object") is True:
            asked.append(("structured_outputs", "json", {"type": "object"}))
    for name, key in VLLM_FIELDS.items():
        if body.get(name) is not None:
            asked.append((name, key, body[name]))
    if not asked:
        return None, None
    if len(asked) > 1:
        raise StructuredOutputError(f"{asked[0][0]}: only one structured output constraint per request, got "
                                    f"{', '.join(sorted({a[0] for a in asked}))}")
    name, key, value = asked[0]
    try:
        if key == "json":
            return StructuredOutput.json_schema(value), name
        if key == "choice":
            return StructuredOutput.choice(value), name
        if not isinstance(value, str) or not value:
            raise StructuredOutputError(f"a {key} must be a non-empty string")
        return (StructuredOutput.regex(value) if key == "regex" else StructuredOutput.grammar(value)), name
    except StructuredOutputError as e:
        raise StructuredOutputError(f"{name}: {e}") from None
