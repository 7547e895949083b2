"""The Qwen2 tokenizer files against transformers, tiktoken and known Qwen2 ids."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from tokenizers import Tokenizer as BackendTokenizer
from transformers import AutoTokenizer

from exporter.qwen_tokenizer import (
    QwenRanksError,
    load_ranks,
    qwen_ranks_path,
    tokenizer_file_contents,
    write_tokenizer_files,
)
from runtime.tokenizer import QWEN2_PATTERN, bytes_to_unicode

SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

CURATED = [
    "Hello, world! 你好",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see—they've gone.",
    "I'M SHOUTING, YOU'RE NOT, HE'D KNOW",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\r\n",
    "    leading spaces and trailing   ",
    "数字 1234567890 和 3.14159 以及 ١٢٣",
    "今天天气很好，我们去公园散步吧！然后吃火锅。",
    "日本語のテキストとカタカナ、ひらがな。",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇨🇳 ❤️",
    "Ünïcödé àccents: café naïve résumé Ångström",
    "e\u0301 composed vs \u00e9 precomposed (NFC)",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "tabs\tand\t\tmore\ttabs\n\n\n\nnewlines\r\n\r\nwindows",
    "http://example.com/path?query=1&b=2#frag",
    "a" * 200,
    "=" * 70 + "\n" + "-" * 33,
    "    \n    \n",
    "'s 't 're 've 'm 'll 'd 'S 'T",
    "",
]

ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" \t\n\r    ")
    + list(".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
    + list("你好世界中文字符测试的一是在不了有和人这")
    + list("éèàüößñçøå") + ["e\u0301", "a\u0308"]
    + list("Привет") + list("مرحبا") + list("αβγ")
    + ["😀", "🎉", "👍🏽", "🇨🇳", "\u200d", "\u00a0", "\u3000"]
    + ["'s", "'t", "'re", "'ll", "'D", "\r\n", "    ", "123", "x" * 5]
)


def random_texts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 80))) for _ in range(n)]


TEXTS = CURATED + random_texts(400)


@pytest.fixture(scope="module")
def tiktoken_encoding() -> tiktoken.Encoding:
    """Qwen's own tokenizer: tiktoken over the same ranks with the Qwen2 split pattern."""
    return tiktoken.Encoding(
        "qwen2-reference",
        pat_str=QWEN2_PATTERN,
        mergeable_ranks=load_ranks(qwen_ranks_path()),
        special_tokens=SPECIALS,
    )


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def tiktoken_ids(enc: tiktoken.Encoding, text: str) -> list[int]:
    # Qwen's tiktoken tokenizer NFC-normalises before encoding, as the tokenizer.json normalizer does.
    return enc.encode(unicodedata.normalize("NFC", text), disallowed_special=())


def test_writes_the_four_files(tokenizer_dir: Path):
    names = sorted(p.name for p in tokenizer_dir.iterdir())
    assert names == ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]


def test_known_qwen2_ids(hf_tokenizer):
    assert hf_tokenizer.encode("Hello, world! 你好") == [9707, 11, 1879, 0, 220, 108386]
    for token, token_id in SPECIALS.items():
        assert hf_tokenizer.convert_tokens_to_ids(token) == token_id
        assert hf_tokenizer.encode(token) == [token_id]
    assert len(hf_tokenizer) == 151646
    assert type(hf_tokenizer).__name__ == "Qwen2Tokenizer"
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.pad_token == "<|endoftext|>"
    assert hf_tokenizer.bos_token is None


def test_ids_equal_tiktoken(hf_tokenizer, tokenizer_dir: Path, tiktoken_encoding):
    backend = BackendTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    hf_batch = hf_tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    backend_batch = [e.ids for e in backend.encode_batch(TEXTS, add_special_tokens=False)]
    mismatches = [
        t for t, hf_ids, be_ids in zip(TEXTS, hf_batch, backend_batch)
        if not (hf_ids == be_ids == tiktoken_ids(tiktoken_encoding, t))
    ]
    assert not mismatches, f"{len(mismatches)} texts differ from tiktoken, first: {mismatches[0]!r}"


def test_round_trip_mixed_text(hf_tokenizer):
    for text in CURATED:
        nfc = unicodedata.normalize("NFC", text)
        assert hf_tokenizer.decode(hf_tokenizer.encode(text)) == nfc


def test_specials_inside_text_map_to_their_ids(hf_tokenizer, tiktoken_encoding):
    text = "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>"
    ids = hf_tokenizer.encode(text)
    assert ids == tiktoken_encoding.encode(text, allowed_special="all")
    assert ids[0] == 151644 and ids.count(151645) == 1 and ids[-1] == 151643
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi there\n"


def test_chat_template_is_chatml_with_default_system(hf_tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected
    with_system = [{"role": "system", "content": "Be brief."}, msgs[0]]
    assert hf_tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_tokenizer_config_fields(tokenizer_dir: Path):
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert (cfg["eos_token"], cfg["pad_token"], cfg["bos_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert cfg["model_max_length"] == 32768 and cfg["errors"] == "replace" and cfg["split_special_tokens"] is False
    assert {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()} == {v: k for k, v in SPECIALS.items()}


def test_vocab_is_the_ranks_and_one_merge_per_multibyte_token(tokenizer_dir: Path):
    ranks = load_ranks(qwen_ranks_path())
    byte_map = bytes_to_unicode()
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == len(ranks) == 151643
    assert all(vocab["".join(byte_map[b] for b in token)] == rank for token, rank in ranks.items())
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) - 1 == sum(len(t) > 1 for t in ranks) == 151387
    # Each merge produces a vocab token, and merge priority follows the produced token's rank.
    produced = [vocab["".join(line.split(" "))] for line in lines[1:]]
    assert all(x < y for x, y in zip(produced, produced[1:]))


def test_output_is_deterministic(tmp_path: Path, tokenizer_dir: Path):
    rebuilt = tokenizer_file_contents.__wrapped__()  # bypass the per-process cache
    for name, data in rebuilt.items():
        assert (tokenizer_dir / name).read_bytes() == data, name
    write_tokenizer_files(tmp_path)
    assert all((tmp_path / n).read_bytes() == (tokenizer_dir / n).read_bytes() for n in rebuilt)


def test_malformed_ranks_are_rejected(tmp_path: Path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(QwenRanksError, match=r"bad.tiktoken:2: expected"):
        load_ranks(bad)
    gap = tmp_path / "gap.tiktoken"
    gap.write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(QwenRanksError, match="not the distinct integers"):
        load_ranks(gap)
