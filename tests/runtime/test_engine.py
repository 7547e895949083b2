"""The engine on real artifacts: YaRN modes end to end vs transformers, streaming, stops, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from exporter.export import export
from exporter.tiny import tiny_config, write_checkpoint
from runtime.engine import RequestError
from runtime.sampling import SamplingError, SamplingParams
from runtime.yarn import ContextLengthError, RopeModeError
from tests.helpers import hf_model

# A tiny YaRN model whose original window is 32 positions, so positions past it run end to end.
YARN = dict(max_position_embeddings=128,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})


@pytest.fixture(scope="module")
def yarn_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("yarn")
    ck = write_checkpoint(root / "ck", tiny_config(**YARN), seed=5)
    return ck, export(ck, root / "art")


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return runtime.load(tiny_artifact)


def _prompt(n: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(n).integers(0, 150000, n)]


def test_long_request_uses_yarn_and_matches_transformers(yarn_model):
    """40 prompt tokens > the 32-position original window: dynamic mode runs YaRN like transformers."""
    ck, art = yarn_model
    engine = runtime.load(art)
    assert engine.rope_mode == "dynamic"
    prompt = _prompt(40)
    r = engine.generate([prompt], SamplingParams(max_new_tokens=1), output_logits=True)[0]
    with torch.no_grad():
        ref = hf_model(ck)(torch.tensor([prompt])).logits[0, -1].numpy()
    assert np.abs(r.logits[0] - ref).max() <= 1e-4


def test_static_mode_matches_transformers_on_short_text(yarn_model):
    """transformers always applies YaRN (static); so does our static mode, also for short text."""
    ck, art = yarn_model
    prompt = _prompt(10)
    r = runtime.load(art, rope_mode="static").generate([prompt], SamplingParams(max_new_tokens=1), output_logits=True)
    with torch.no_grad():
        ref = hf_model(ck)(torch.tensor([prompt])).logits[0, -1].numpy()
    assert np.abs(r[0].logits[0] - ref).max() <= 1e-4


def test_dynamic_short_request_is_bit_identical_to_unscaled(yarn_model):
    _, art = yarn_model
    prompt = _prompt(12)
    p = SamplingParams(max_new_tokens=8, ignore_eos=True)
    dyn = runtime.load(art, rope_mode="dynamic").generate([prompt], p, output_logits=True)[0]
    none = runtime.load(art, rope_mode="none").generate([prompt], p, output_logits=True)[0]
    static = runtime.load(art, rope_mode="static").generate([prompt], p, output_logits=True)[0]
    assert dyn.tokens == none.tokens
    assert all(np.array_equal(a, b) for a, b in zip(dyn.logits, none.logits))
    assert not np.allclose(static.logits[0], none.logits[0], atol=1e-3)  # YaRN really changes short text


def test_dynamic_rows_of_one_batch_keep_their_own_tables(yarn_model):
    """Rope mode dynamic in a ragged batch: a short row keeps the unscaled tables and a long row gets
    YaRN, each as in its solo run (the rows run as two batches), rows in their places. Logits within
    1e-4, not bit for bit: the two short rows share a batch, and the MoE is not batch-invariant
    (runtime/batching.py); the wrong tables would be off by ~1."""
    _, art = yarn_model
    engine = runtime.load(art)
    short, long_, short2 = _prompt(5), _prompt(40), _prompt(9)
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    together = engine.generate([short, long_, short2], p, output_logits=True)
    for prompt, got in zip([short, long_, short2], together):
        alone = engine.generate([prompt], p, output_logits=True)[0]
        assert got.prompt_tokens == prompt and got.tokens == alone.tokens
        assert max(np.abs(a - b).max() for a, b in zip(got.logits, alone.logits)) <= 1e-4
    assert engine.generate([short], p)[0].tokens == runtime.load(art, rope_mode="none").generate([short], p)[0].tokens


def test_context_limits_per_mode(yarn_model):
    _, art = yarn_model
    none = runtime.load(art, rope_mode="none")
    with pytest.raises(ContextLengthError, match="over the limit of 32 for rope mode 'none'"):
        none.generate([_prompt(30)], SamplingParams(max_new_tokens=3))
    dyn = runtime.load(art)
    with pytest.raises(ContextLengthError, match="over the limit of 128 for rope mode 'dynamic'"):
        dyn.generate([_prompt(100)], SamplingParams(max_new_tokens=29))
    assert len(dyn.generate([_prompt(100)], SamplingParams(max_new_tokens=28, ignore_eos=True))[0].tokens) == 28


def test_rope_mode_needs_rope_scaling(tiny_artifact):
    with pytest.raises(RopeModeError, match="rope mode 'static' needs rope_scaling"):
        runtime.load(tiny_artifact, rope_mode="static")


def test_streaming_text_equals_full_decode_on_chinese(engine):
    msgs = [{"role": "user", "content": "请用中文介绍一下大型语言模型。你好，世界！"}]
    p = SamplingParams(max_new_tokens=40, temperature=0.9, seed=7)
    deltas = list(engine.chat(msgs, p, stream=True))
    full = engine.chat(msgs, p)
    assert "".join(deltas) == full
    ids = engine.tokenizer.encode_chat(msgs)
    tokens = engine.generate([ids], p)[0].tokens
    eos = set(engine.tokenizer.eos_token_ids)
    assert full == engine.tokenizer.decode([t for t in tokens if t not in eos])
    # no delta ends inside a character unless the model itself produced invalid bytes
    assert all("\ufffd" not in d for d in deltas) or "\ufffd" in full


def test_seeded_sampling_is_reproducible(engine):
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=11, ignore_eos=True)
    a = engine.generate([[9707, 11]], p)[0].tokens
    assert a == engine.generate([[9707, 11]], p)[0].tokens
    from dataclasses import replace

    assert a != engine.generate([[9707, 11]], replace(p, seed=12))[0].tokens


def test_stop_strings_cut_text_and_stream(engine):
    p = SamplingParams(max_new_tokens=24, ignore_eos=True)
    full = engine.complete("Hello", p)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    cut = full[: full.find(stop)]
    from dataclasses import replace

    ps = replace(p, stop=(stop,))
    assert engine.complete("Hello", ps) == cut
    deltas = list(engine.complete("Hello", ps, stream=True))
    assert "".join(deltas) == cut
    r = engine.generate([engine.tokenizer.encode("Hello")], ps)[0]
    assert r.finish_reason == "stop" and r.text == cut and len(r.tokens) < 24


def test_eos_stops_generation(engine):
    """Force eos: make every token a stop token."""
    p = SamplingParams(max_new_tokens=10, stop_token_ids=tuple(range(engine.config.vocab_size)))
    r = engine.generate([[9707]], p)[0]
    assert len(r.tokens) == 1 and r.finish_reason == "stop" and r.text == ""


def test_bad_inputs(engine):
    with pytest.raises(RequestError, match="every prompt needs at least one token"):
        engine.generate([[]])
    with pytest.raises(RequestError, match=r"prompt token ids must be in \[0, 151936\)"):
        engine.generate([[151936]])
    with pytest.raises(SamplingError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ContextLengthError):
        engine.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=40000), stream=True)
    from runtime.tokenizer import ChatMessageError

    with pytest.raises(ChatMessageError):
        engine.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(RopeModeError, match="unknown rope mode"):
        engine.generate([[1]], rope_mode="sometimes")
    with pytest.raises(RequestError, match="prompt token ids must be integers"):
        engine.generate([[1.7, 2.2]])
    with pytest.raises(RequestError, match="prompt token ids must be integers"):
        engine.generate([[True, 5]])
    assert engine.generate(np.array([[9707, 11]]), SamplingParams(max_new_tokens=1))[0].prompt_tokens == [9707, 11]
    for chunk in (1.5, "8", True, 0):
        with pytest.raises(RequestError, match="prefill_chunk must be an integer >= 1"):
            runtime.load(engine.artifact, prefill_chunk=chunk)
        with pytest.raises(RequestError, match="threads must be an integer >= 1"):
            runtime.load(engine.artifact, threads=chunk)
    one = runtime.load(engine.artifact, threads=1)
    assert one.backend.session.get_session_options().intra_op_num_threads == 1


def test_unknown_device_and_a_manifest_that_does_not_match_the_graph(tiny_artifact, tmp_path):
    import json
    import os

    from runtime.backends import BackendError

    with pytest.raises(BackendError, match="unknown device 'foo'; choose one of: auto, cpu, cuda"):
        runtime.load(tiny_artifact, device="foo")
    art = tmp_path / "art"
    art.mkdir()
    for f in tiny_artifact.iterdir():
        os.link(f, art / f.name)
    (art / "qmoe.json").unlink()
    m = json.loads((tiny_artifact / "qmoe.json").read_text())
    m["hf_config"]["num_key_value_heads"] = m["hf_config"]["num_attention_heads"]
    (art / "qmoe.json").write_text(json.dumps(m))
    with pytest.raises(BackendError, match="graph input past_key_values.0.key is tensor.float. .'batch', 2, "
                                           "'cache', 16., but qmoe.json describes"):
        runtime.load(art)


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_prefill_equals_one_shot(tiny_artifact, chunk):
    """Chunked prefill (GroupQueryAttention with past rows + right-padded chunks) gives the same
    logits (fp32, |delta| <= 1e-5) and tokens as one prefill step, on a ragged batch."""
    prompts = [_prompt(9), _prompt(3), _prompt(16)]
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    one = runtime.load(tiny_artifact).generate(prompts, p, output_logits=True)
    chunked = runtime.load(tiny_artifact, prefill_chunk=chunk).generate(prompts, p, output_logits=True)
    for a, b in zip(one, chunked):
        assert a.tokens == b.tokens
        assert max(np.abs(x - y).max() for x, y in zip(a.logits, b.logits)) <= 1e-5
