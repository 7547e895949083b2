"""runtime.tokenizer against transformers' Qwen2Tokenizer on the same files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from runtime.errors import QmoeError
from runtime.tokenizer import (
    ChatMessageError,
    ChatTemplateError,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
)

TEXTS = [
    "Hello, world! 你好",
    "def main():\n\tprint('hi')  # comment\r\n\n    return 0\n",
    "混合 text with 数字 123 and emoji 😀🎉👍🏽 👨‍👩‍👧‍👦",
    "e\u0301 vs \u00e9, Ångström, naïve",
    "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>",
    "literal <|im_start without closing and <|unknown|>",
    "   spaces   \n\n\n",
    "🦜🪿 rare emoji and 𠀀𠀁 rare CJK (4-byte UTF-8)",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "写一首诗"},
        {"role": "assistant", "content": "春眠不觉晓 🌸"},
        {"role": "user", "content": "Now in English, with {{ braces }} and {% raw %}"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "a\n\tb  "},
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "content": '{"result": 4}'},
    ],
]


def random_texts(n: int, seed: int = 7) -> list[str]:
    pool = list("abcXYZ019 \t\n\r.,'!?-_") + list("你好世界的") + ["😀", "👍🏽", "é", "e\u0301", "🦜", "𠀀", "'ll"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(150)]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def hf(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def copy_dir(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_ids_equal_transformers(tok: Tokenizer, hf):
    texts = TEXTS + random_texts(150)
    expected = hf(texts, add_special_tokens=False)["input_ids"]
    assert [tok.encode(t) for t in texts] == expected
    assert tok.encode("Hello, world! 你好") == [9707, 11, 1879, 0, 220, 108386]


def test_vocab_and_merges_give_same_ids_as_tokenizer_json(tok: Tokenizer, tokenizer_dir: Path, tmp_path: Path):
    folder = copy_dir(tokenizer_dir, tmp_path / "no_json", skip=("tokenizer.json",))
    from_merges = Tokenizer.from_dir(folder)
    texts = TEXTS + random_texts(150, seed=99)
    assert [from_merges.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert from_merges.special_ids == tok.special_ids == frozenset({151643, 151644, 151645})


def test_special_tokens_in_text(tok: Tokenizer):
    assert tok.encode("<|im_start|>") == [151644]
    assert tok.encode("<|im_end|>") == [151645]
    assert tok.encode("<|endoftext|>") == [151643]
    assert tok.token_to_id("<|im_end|>") == 151645


@pytest.mark.parametrize("skip", [True, False])
def test_decode_equals_transformers(tok: Tokenizer, hf, skip: bool):
    for text in TEXTS:
        ids = hf.encode(text)
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_equals_transformers(tok: Tokenizer, hf, conv: int, add_generation_prompt: bool):
    msgs = CONVERSATIONS[conv]
    ref = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt) == ref
    ref_ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert tok.encode_chat(msgs, add_generation_prompt) == list(ref_ids)


def test_template_helpers_behave_like_transformers(tokenizer_dir: Path, tmp_path: Path):
    folder = copy_dir(tokenizer_dir, tmp_path / "custom")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = (
        "{% if messages|length > 2 %}{{ raise_exception('only two messages, got ' ~ messages|length) }}{% endif %}"
        "{% for m in messages %}\n  {{ m | tojson }}\n    {% if m.role == 'user' %}U{% endif %}\n{% endfor %}"
        "{{ eos_token }}|{{ pad_token }}|{{ bos_token }}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    ours, ref = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(str(folder))
    msgs = [{"role": "user", "content": "<b>é & \"q\"</b>"}, {"role": "assistant", "content": "ok"}]
    rendered = ours.apply_chat_template(msgs, add_generation_prompt=False)
    assert rendered == ref.apply_chat_template(msgs, tokenize=False)
    assert "<b>é" in rendered  # tojson keeps HTML and non-ASCII as they are
    with pytest.raises(ChatTemplateError, match="only two messages, got 3"):
        ours.apply_chat_template(msgs + msgs[:1])


def test_a_template_that_fails_in_python_is_a_chat_template_error(tokenizer_dir: Path, tmp_path: Path):
    folder = copy_dir(tokenizer_dir, tmp_path / "broken")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    for template, message in [("{{ 1/0 }}", "ZeroDivisionError"), ("{{ messages + 1 }}", "TypeError")]:
        cfg["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
        with pytest.raises(ChatTemplateError, match=f"chat template failed: {message}"):
            Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "hi"}])


def test_eos_ids_prefer_generation_config(tokenizer_dir: Path, tmp_path: Path, tok: Tokenizer):
    assert tok.eos_token_ids == (151645,)
    folder = copy_dir(tokenizer_dir, tmp_path / "gen")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "pad_token_id": 151643}))
    assert Tokenizer.from_dir(folder).eos_token_ids == (151645, 151643)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id"):
        Tokenizer.from_dir(folder)


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hi"], r"messages\[0\] must be an object"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\].role is 'robot'"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], r"messages\[1\].content must be a string"),
        ([{"role": "user", "content": ["x"]}], r"messages\[0\].content must be a string"),
    ],
)
def test_bad_messages_are_rejected(tok: Tokenizer, messages, match):
    with pytest.raises(ChatMessageError, match=match) as e:
        tok.apply_chat_template(messages)
    assert "\n" not in str(e.value) and isinstance(e.value, QmoeError) and isinstance(e.value, ValueError)


def test_missing_files_are_reported(tmp_path: Path, tokenizer_dir: Path):
    with pytest.raises(TokenizerError, match="no tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    folder = copy_dir(tokenizer_dir, tmp_path / "bare", skip=("tokenizer.json", "merges.txt"))
    with pytest.raises(TokenizerError, match="no tokenizer.json and no vocab.json"):
        Tokenizer.from_dir(folder)


STREAM_TEXTS = [
    "你好，世界！今天天气很好。",
    "emoji 😀🎉👍🏽👨‍👩‍👧‍👦🦜🪿 end",
    "𠀀𠀁𠀂 rare CJK then ASCII",
    "mixed 中文 and English, 日本語のテキスト 🇨🇳",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_deltas_concatenate_to_full_decode(tok: Tokenizer, text: str):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stream_decoder_holds_back_partial_characters(tok: Tokenizer):
    ids = tok.encode("🦜𠀀")
    # Both characters are rare enough to be split into byte tokens; otherwise this test proves nothing.
    assert len(ids) > 2 and any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    assert "" in deltas[:-1] and "".join(deltas) == "🦜𠀀"


def test_stream_decoder_specials_and_truncated_tail(tok: Tokenizer):
    ids = tok.encode("<|im_start|>assistant\n好<|im_end|>")
    dec = tok.stream_decoder(skip_special_tokens=True)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "assistant\n好"
    partial = tok.encode("🦜")[:-1]
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in partial] == [""] * len(partial)
    assert dec.flush().endswith("\ufffd")  # the ids ended mid-character: flush says so


def test_config_and_tokenizer_json_must_agree_on_special_ids(tokenizer_dir: Path, tmp_path: Path):
    folder = copy_dir(tokenizer_dir, tmp_path / "disagree")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"]["151646"] = cfg["added_tokens_decoder"].pop("151645")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(TokenizerError, match="'<\\|im_end\\|>' has id 151646 but the tokenizer gives 151645"):
        Tokenizer.from_dir(folder)
