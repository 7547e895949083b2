"""Qwen2 tokenizer for the runtime: encode, decode, chat template, incremental detokenizing.

Built on the ``tokenizers`` library (no transformers, no torch). A checkpoint folder holds either
``tokenizer.json`` or ``vocab.json`` + ``merges.txt``; both give the same ids because both go
through the byte-level BPE pipeline Qwen2 uses (``build_byte_level_bpe``, also used by the
exporter to write tokenizer.json, so the pipeline is defined once).

The chat template is rendered the way transformers renders it (sandboxed jinja2 with
trim_blocks/lstrip_blocks, ``raise_exception``, a ``tojson`` that does not escape HTML, the
special tokens as variables), so prompts are byte-identical to ``apply_chat_template``.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from runtime import request_json
from runtime.errors import QmoeError

# Qwen2's pre-tokenizer split: like GPT-4's cl100k pattern but digits are split one by one.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_ROLES = ("system", "user", "assistant", "tool")
REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(QmoeError, ValueError):
    """Tokenizer files that cannot be used; the message names the file."""


class ChatMessageError(QmoeError, ValueError):
    """Chat messages that are not a list of {role, content} strings."""


class ChatTemplateError(QmoeError, ValueError):
    """A chat template that is missing, does not compile or raised while rendering."""


@dataclass(frozen=True)
class SpecialToken:
    id: int
    content: str


# --- the byte-level BPE pipeline ------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def build_byte_level_bpe(
    vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], specials: Sequence[SpecialToken]
) -> BackendTokenizer:
    """A ``tokenizers`` tokenizer with Qwen2's pipeline; specials must follow the vocab in id order."""
    model = BPE(
        vocab=dict(vocab),
        merges=list(merges),
        dropout=None,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=False,
    )
    tok = BackendTokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Qwen2's post-processor only keeps offsets untrimmed; it adds no tokens.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for sp in sorted(specials, key=lambda s: s.id):
        tok.add_special_tokens([AddedToken(sp.content, special=True, normalized=False)])
        got = tok.token_to_id(sp.content)
        if got != sp.id:
            raise TokenizerError(
                f"special token {sp.content!r} should have id {sp.id} but the vocabulary gives it {got} "
                f"(vocabulary has {len(vocab)} tokens; special ids must follow it without gaps)"
            )
    return tok


# --- loading a checkpoint folder ------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read JSON ({e})") from None


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _specials_from_config(config: Mapping[str, Any], source: Path) -> list[SpecialToken]:
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{source}: added_tokens_decoder must be an object of id -> token")
    specials = []
    for key, value in decoder.items():
        content = _token_content(value)
        if not str(key).isdigit() or content is None:
            raise TokenizerError(f"{source}: added_tokens_decoder entry {key!r} needs an integer id and a content")
        specials.append(SpecialToken(int(key), content))
    return sorted(specials, key=lambda s: s.id)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{n}: expected two space-separated pieces, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _load_backend(folder: Path, specials: list[SpecialToken]) -> BackendTokenizer:
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            return BackendTokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust side raises a plain Exception
            raise TokenizerError(f"{tokenizer_json}: cannot load ({str(e).splitlines()[0]})") from None
    vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_json.is_file() and merges_txt.is_file()):
        raise TokenizerError(f"{folder}: no tokenizer.json and no vocab.json + merges.txt")
    vocab = _read_json(vocab_json)
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{vocab_json}: expected an object of token -> id")
    return build_byte_level_bpe(vocab, _read_merges(merges_txt), specials)


# --- chat template --------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which would change prompts; transformers overrides it too.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandbox transformers uses."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as plain dicts; one-line error naming the first bad message. An assistant message
    may carry OpenAI's `tool_calls` (its content then may be null), a tool message its
    `tool_call_id`: see assistant_calls."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatMessageError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatMessageError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise ChatMessageError(f"messages[{i}].role is {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise ChatMessageError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        message: dict[str, Any] = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = assistant_calls(calls, f"messages[{i}]")
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if m.get(key) is not None:
                    if not isinstance(m[key], str):
                        raise ChatMessageError(f"messages[{i}].{key} must be a string")
                    message[key] = m[key]
        out.append(message)
    return out


def assistant_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` for the template, each {"id", "type": "function",
    "function": {"name", "arguments": object}}: OpenAI sends the arguments as JSON text; templates
    write the object (vLLM passes them the same way)."""
    if not isinstance(value, list):
        raise ChatMessageError(f"{where}.tool_calls must be a list of calls")
    out = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ChatMessageError(f'{where}.tool_calls[{j}] must be {{"type": "function", "function": '
                                   f'{{"name": ..., "arguments": ...}}}}')
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:  # a client's JSON text: too deep, a huge integer or a lone surrogate is its error too
                args = request_json.loads(args or "{}")
            except request_json.RequestJSONError as e:
                raise ChatMessageError(f"{where}.tool_calls[{j}].function.arguments is not valid JSON ({e})") from None
        if not isinstance(args, dict):
            raise ChatMessageError(f"{where}.tool_calls[{j}].function.arguments must be a JSON object")
        out.append({"id": str(call.get("id") or ""), "type": "function", "function": {"name": name, "arguments": args}})
    return out


TOOL_TEMPLATE_PATH = Path(__file__).with_name("qwen_tools.jinja")
# A conversation without tools: a template that renders it like qmoe's tool template is ChatML
# with Qwen's default system prompt, so conversations with tools may use qmoe's template.
_PROBE = ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
          [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}])


@lru_cache(maxsize=1)
def tool_template() -> str:
    """qmoe's ChatML template with Hermes-format tool calling (runtime/qwen_tools.jinja)."""
    return TOOL_TEMPLATE_PATH.read_text(encoding="utf-8")


def renders_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (one that does not would drop them)."""
    return template is not None and re.search(r"\btools\b", template) is not None


# --- the tokenizer --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # identity equality: comparing Rust backends means nothing
class Tokenizer:
    backend: BackendTokenizer
    chat_template: str | None
    special_tokens: Mapping[str, str]  # bos_token/eos_token/pad_token/unk_token -> content
    eos_token_ids: tuple[int, ...]
    special_ids: frozenset[int]
    source: str

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        folder = Path(path)
        config_path = folder / "tokenizer_config.json"
        if not config_path.is_file():
            raise TokenizerError(f"{folder}: no tokenizer_config.json")
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object")
        specials = _specials_from_config(config, config_path)
        backend = _load_backend(folder, specials)
        for sp in specials:
            if backend.token_to_id(sp.content) != sp.id:
                raise TokenizerError(
                    f"{config_path}: added token {sp.content!r} has id {sp.id} but the tokenizer gives "
                    f"{backend.token_to_id(sp.content)}; the tokenizer files disagree"
                )
        # Specials declared in tokenizer.json but not in tokenizer_config still count as special.
        special_ids = {s.id for s in specials} | {
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        }
        special_tokens = {
            name: content
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (content := _token_content(config.get(name))) is not None
        }
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{config_path}: chat_template must be a string (named templates are not supported)")
        eos_ids = _eos_ids(folder, backend, special_tokens.get("eos_token"))
        return cls(backend, template, special_tokens, eos_ids, frozenset(special_ids), str(folder))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (regular + added); the model may pad beyond it."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special tokens written in the text map to their ids, as in transformers."""
        # Qwen2 adds no BOS, and chat templates carry their own specials.
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a byte-level BPE piece can be part of a UTF-8 character;
        an added token is its text). b"" for an id the tokenizer does not have (a padded head)."""
        added = self.backend.get_added_tokens_decoder().get(int(token_id))
        if added is not None:
            return added.content.encode("utf-8")
        piece = self.backend.id_to_token(int(token_id))
        if piece is None:
            return b""
        to_byte = _unicode_to_bytes()
        if all(c in to_byte for c in piece):
            return bytes(to_byte[c] for c in piece)
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text. `tools` (OpenAI's function list) and assistant `tool_calls` need a
        template that renders them: the model's own if it reads `tools`, else qmoe's Qwen tool
        template where the model's renders plain conversations identically (ChatML)."""
        checked = validate_messages(messages)
        tooling = bool(tools) or any("tool_calls" in m for m in checked)
        return self._render(self._template(tooling), checked, add_generation_prompt, list(tools) if tools else None)

    def _template(self, tooling: bool) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(f"{self.source}: tokenizer_config.json has no chat_template")
        if not tooling or renders_tools(self.chat_template):
            return self.chat_template
        if not self.chatml_compatible:
            raise ChatTemplateError("the chat template does not render tools or tool calls and is not ChatML; give "
                                    "one that does (qmoe serve --chat-template FILE)")
        return tool_template()

    @cached_property
    def chatml_compatible(self) -> bool:
        """Whether the model's template renders conversations without tools exactly as qmoe's tool
        template does (then that template can add tools to them)."""
        if self.chat_template is None:
            return False
        with contextlib.suppress(ChatTemplateError):
            return all(self._render(self.chat_template, m, g, None) == self._render(tool_template(), m, g, None)
                       for m in _PROBE for g in (True, False))
        return False

    def _render(self, source: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[Any] | None) -> str:
        template = compile_chat_template(source)
        try:
            return template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None
        except Exception as e:  # noqa: BLE001  (a template's own bug: {{ 1/0 }}, {{ messages + 1 }})
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools))

    def with_chat_template(self, source: str) -> "Tokenizer":
        """This tokenizer with another chat template (checked to compile)."""
        compile_chat_template(source)
        return replace(self, chat_template=source)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


def _eos_ids(folder: Path, backend: BackendTokenizer, eos_token: str | None) -> tuple[int, ...]:
    """generation_config.json's eos list (what generation stops on) else tokenizer_config's eos."""
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = _read_json(gen_path)
        eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise TokenizerError(f"{gen_path}: eos_token_id must be an id or a list of ids, got {eos!r}")
            return tuple(ids)
    if eos_token is None:
        return ()
    eos_id = backend.token_to_id(eos_token)
    if eos_id is None:
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: eos_token {eos_token!r} is not in the vocabulary")
    return (eos_id,)


class StreamDecoder:
    """Turns generated ids into text deltas that never end inside a UTF-8 character.

    Byte-level BPE tokens can split a character; decoding such a prefix ends in U+FFFD, so the
    delta is held back until the character completes. Only a short window of ids is re-decoded
    per token (from the last emitted boundary), so the cost does not grow with the output.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: a character boundary before the last emitted text
        self._read = 0  # everything before this id has been emitted

    def _text(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        emitted = self._text(self._prefix, self._read)
        full = self._text(self._prefix, len(self._ids))
        if full.endswith(REPLACEMENT_CHAR) or len(full) <= len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(emitted) :]

    def flush(self) -> str:
        """Whatever is held back (possibly ending in U+FFFD if the ids stop mid-character)."""
        emitted = self._text(self._prefix, self._read)
        full = self._text(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return full[len(emitted) :]
