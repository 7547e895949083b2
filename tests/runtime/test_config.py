import json

import pytest

from runtime.config import ConfigError, ModelConfig

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
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "missing field rope_scaling.original_max_position_embeddings"),
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
