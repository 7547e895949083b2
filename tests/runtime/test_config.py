import json

import pytest

from runtime.config import ConfigError, ModelConfig, RopeScaling

REAL = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "data" / "qwen2-57b-a14b-instruct.config.json")


def base(**kw):
    from exporter.tiny import tiny_config

    return tiny_config(**kw)


def test_real_57b_config(tmp_path):
    import pathlib

    c = ModelConfig.from_file(pathlib.Path(REAL))  # copy of ../shared/reference's config
    assert (c.head_dim, c.kv_group, c.num_experts, c.num_experts_per_tok) == (128, 7, 64, 8)
    assert all(c.is_sparse_layer(i) for i in range(28)) and not c.norm_topk_prob and not c.tie_word_embeddings
    assert c.max_context == 32768 and c.rope_scaling is None


def test_yarn_and_dense_layers():
    c = ModelConfig.from_hf_dict(base(rope_scaling={"type": "yarn", "factor": 2.0,
                                                    "original_max_position_embeddings": 32768},
                                      mlp_only_layers=[0], decoder_sparse_step=1, num_hidden_layers=3))
    assert c.rope_scaling.factor == 2.0 and c.max_context == 65536
    assert [c.is_sparse_layer(i) for i in range(3)] == [False, True, True]
    c2 = ModelConfig.from_hf_dict(base(decoder_sparse_step=2, num_hidden_layers=4))
    assert [c2.is_sparse_layer(i) for i in range(4)] == [False, True, False, True]
    rs = ModelConfig.from_hf_dict(base(rope_scaling={"rope_type": "yarn", "factor": 4, "beta_fast": 16,
                                                     "original_max_position_embeddings": 64, "mscale": 1.0}))
    assert rs.rope_scaling.beta_fast == 16 and rs.rope_scaling.mscale == 1.0


def test_roundtrip_through_hf_dict():
    c = ModelConfig.from_hf_dict(base(rope_scaling={"type": "yarn", "factor": 2.0,
                                                    "original_max_position_embeddings": 64}))
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c


@pytest.mark.parametrize("overrides, message", [
    (dict(model_type="llama"), "model_type is 'llama'; qmoe supports only 'qwen2_moe'"),
    (dict(hidden_size=66), "num_attention_heads (4) does not divide hidden_size (66)"),
    (dict(num_key_value_heads=3), "num_key_value_heads (3) does not divide num_attention_heads (4)"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok (9) exceeds num_experts (8)"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.type 'linear' is not supported"),
    (dict(num_hidden_layers="2"), "num_hidden_layers must be an integer >= 1, got '2'"),
    (dict(hidden_act="gelu"), "hidden_act is 'gelu'"),
    (dict(mlp_only_layers=[5]), "mlp_only_layers must be a list of layer indices in [0, 2)"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob must be true or false"),
    (dict(rope_theta=1.0), "rope_theta must be a number > 1, got 1.0"),
    (dict(rope_theta=0), "rope_theta must be a number > 1, got 0"),
    (dict(rms_norm_eps=-1), "rms_norm_eps must be a number > 0, got -1"),
    (dict(rope_scaling={"type": "yarn", "factor": 1e308, "original_max_position_embeddings": 16}),
     "rope_scaling.factor must be in [1, 10000], got 1e+308"),
    (dict(eos_token_id="abc"), "eos_token_id must be a token id or a list of token ids, got 'abc'"),
    (dict(eos_token_id=[None]), "eos_token_id must be a token id or a list of token ids, got [None]"),
    (dict(head_dim=32), "head_dim 32 differs from hidden_size / num_attention_heads (16)"),
    (dict(rope_parameters="yarn"), "rope_parameters must be an object"),
    (dict(rope_parameters={"rope_theta": 0.5}), "rope_parameters.rope_theta must be a number > 1, got 0.5"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_parameters.type 'linear' is not supported"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), "rope_parameters per layer type is not supported"),
])
def test_invalid_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dict(base(**overrides), source="x/config.json")
    assert message in str(e.value) and str(e.value).startswith("x/config.json: ")
    assert "\n" not in str(e.value)


def test_missing_and_corrupt_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(base(vocab_size=None)))
    with pytest.raises(ConfigError, match="missing field vocab_size"):
        ModelConfig.from_file(tmp_path)


def test_transformers_5_rope_parameters():
    """transformers >= 5 writes rope_theta and YaRN's fields into one rope_parameters object; it wins
    over top-level fields, as in transformers."""
    plain = ModelConfig.from_hf_dict(base(rope_theta=5.0, rope_parameters={"rope_theta": 1e6, "rope_type": "default"}))
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    yarn = ModelConfig.from_hf_dict(base(rope_parameters={
        "rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8}))
    assert yarn.rope_theta == 1e6 and yarn.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=16,
                                                                       beta_fast=8.0)
    assert ModelConfig.from_hf_dict(yarn.to_hf_dict()) == yarn
    assert ModelConfig.from_hf_dict(base(head_dim=16)) == ModelConfig.from_hf_dict(base())


def test_qkv_bias_survives_the_manifest_round_trip():
    c = ModelConfig.from_hf_dict(base(qkv_bias=False))
    assert c.to_hf_dict()["qkv_bias"] is False and ModelConfig.from_hf_dict(c.to_hf_dict()) == c


YARN2 = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("overrides", [
    dict(rope_theta=1e6),
    dict(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}),
    dict(rope_theta=5e5, rope_parameters={"rope_type": "default"}),  # theta from the top level
    dict(rope_theta=5e5, rope_parameters={}),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rope_scaling=dict(YARN2)),  # rope_scaling wins
    dict(rope_parameters={**YARN2, "rope_theta": 1e6}),
    dict(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0}),  # original = max_position_embeddings
    dict(rope_scaling=dict(YARN2), original_max_position_embeddings=16),  # a top-level original is ignored
    dict(rope_scaling={"factor": 2.0}),  # no type: plain RoPE
], ids=lambda o: "-".join(sorted(o)))
def test_rope_settings_are_read_as_transformers_reads_them(overrides):
    """theta, YaRN factor and original window against transformers' own Qwen2MoeConfig."""
    from transformers import Qwen2MoeConfig

    d = base(max_position_embeddings=128, **overrides)
    ours = ModelConfig.from_hf_dict(json.loads(json.dumps(d)))
    ref = Qwen2MoeConfig(**json.loads(json.dumps(d))).rope_parameters
    assert ours.rope_theta == ref["rope_theta"]
    if ref["rope_type"] == "default":
        assert ours.rope_scaling is None
    else:
        assert ref["rope_type"] == "yarn" and ours.rope_scaling is not None
        assert (ours.rope_scaling.factor, ours.rope_scaling.original_max_position_embeddings) == (
            ref["factor"], ref["original_max_position_embeddings"])
