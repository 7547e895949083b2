"""runtime.yarn against transformers' rope init functions and Qwen2MoeRotaryEmbedding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2MoeConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeRotaryEmbedding

from runtime.config import ModelConfig
from runtime.errors import QmoeError
from runtime.yarn import (
    ContextLengthError,
    RopeModeError,
    RopePlan,
    check_context,
    choose_rope,
    default_inv_freq,
    default_rope_mode,
    plan_inv_freq,
    rope_tables,
    tables_for,
    yarn_inv_freq_and_attention_factor,
)

REFERENCE_CONFIG = Path("/work/shared/reference/qwen2-57b-a14b-instruct.config.json")
HEAD_DIM = 128
BASE = 1e6


def hf_dict(original: int | None, factor: float | None = None, max_pos: int | None = None, **extra) -> dict:
    """A tiny qwen2_moe config.json with head_dim 128 and optional YaRN rope_scaling."""
    d = {
        "model_type": "qwen2_moe",
        "vocab_size": 64,
        "hidden_size": 2 * HEAD_DIM,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 32,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "rope_theta": BASE,
        "max_position_embeddings": max_pos or original or 256,
    }
    if factor is not None:
        d["rope_scaling"] = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original, **extra}
    return d


def both(d: dict) -> tuple[ModelConfig, Qwen2MoeConfig]:
    hf = Qwen2MoeConfig(**{k: v for k, v in d.items() if k != "model_type"})
    return ModelConfig.from_hf_dict(json.loads(json.dumps(d))), hf


VARIANTS = {
    "plain": {},
    "mscale": {"mscale": 0.707, "mscale_all_dim": 1.0},
    "mscale_equal": {"mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_factor": {"attention_factor": 1.25},
    "no_truncate": {"truncate": False},
    "betas": {"beta_fast": 16.0, "beta_slow": 2.0},
}


def test_default_inv_freq_matches_transformers():
    _, hf = both(hf_dict(None))
    ref, scale = Qwen2MoeRotaryEmbedding.compute_default_rope_parameters(hf)
    np.testing.assert_allclose(default_inv_freq(HEAD_DIM, BASE), ref.double().numpy(), rtol=1e-6, atol=0)
    assert scale == 1.0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("original", [32768, 64])
@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_yarn_inv_freq_matches_transformers(factor, original, variant):
    cfg, hf = both(hf_dict(original, factor, **VARIANTS[variant]))
    ref_inv, ref_af = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv, af = yarn_inv_freq_and_attention_factor(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(inv, ref_inv.double().numpy(), rtol=1e-6, atol=0)
    assert af == pytest.approx(ref_af, abs=1e-12)
    # YaRN must actually change something, or this comparison would pass for plain RoPE too.
    assert not np.allclose(inv, default_inv_freq(HEAD_DIM, BASE), rtol=1e-3)


def test_qwen2_57b_uses_config_factor_not_position_ratio():
    # Qwen2-57B: max_position_embeddings == original (32768), so the 4.x "ratio" bug gives factor 1.
    d = json.loads(REFERENCE_CONFIG.read_text())
    d["rope_scaling"] = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768}
    cfg, hf = both(d)
    ref_inv, ref_af = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv, af = plan_inv_freq(cfg, choose_rope(cfg, "static", 10))
    np.testing.assert_allclose(inv, ref_inv.double().numpy(), rtol=1e-6, atol=0)
    assert af == pytest.approx(0.1 * np.log(2.0) + 1.0, abs=1e-12) and af == pytest.approx(ref_af, abs=1e-12)
    assert inv[-1] == pytest.approx(default_inv_freq(128, 1e6)[-1] / 2.0, rel=1e-12)


def rotary_reference(hf: Qwen2MoeConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rot = Qwen2MoeRotaryEmbedding(hf)
    pos = torch.from_numpy(positions)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    half = cos.shape[-1] // 2
    # transformers duplicates the halves (rotate_half layout); the tables hold one half.
    assert torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])
    angles = positions[:, None].astype(np.float64) * rot.inv_freq.double().numpy()[None]
    return cos[0, :, :half].double().numpy(), sin[0, :, :half].double().numpy(), angles * rot.attention_scaling


def assert_tables_match(mine: np.ndarray, ref: np.ndarray, scaled_angles: np.ndarray) -> None:
    # transformers forms position * inv_freq in float32: its argument error grows like
    # |angle| * 2^-23, ours (float64) does not. Allow that growth on top of 1e-6, nothing more.
    tol = 1e-6 + 2.0**-22 * np.abs(scaled_angles)
    assert np.all(np.abs(mine - ref) <= tol), float(np.max(np.abs(mine - ref) - tol))


@pytest.mark.parametrize("variant", ["plain", "mscale", "attention_factor"])
@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_tables_match_qwen2moe_rotary_small_window(factor, variant):
    original = 64
    cfg, hf = both(hf_dict(original, factor, max_pos=original, **VARIANTS[variant]))
    cos, sin = tables_for(cfg, "static", cfg.max_context)
    assert cos.dtype == np.float32 and cos.shape == (int(original * factor), HEAD_DIM // 2)
    positions = np.arange(cfg.max_context)
    ref_cos, ref_sin, angles = rotary_reference(hf, positions)
    assert_tables_match(cos, ref_cos, angles)
    assert_tables_match(sin, ref_sin, angles)
    # Early positions carry no float32 growth: plain 1e-6 there (catches a missing attention factor).
    np.testing.assert_allclose(cos[:8], ref_cos[:8], atol=1e-6, rtol=0)
    np.testing.assert_allclose(sin[:8], ref_sin[:8], atol=1e-6, rtol=0)


def test_tables_match_qwen2moe_rotary_57b_window():
    d = hf_dict(32768, 2.0)
    cfg, hf = both(d)
    positions = np.array([0, 1, 2, 7, 100, 4095, 32767, 32768, 50000, 65535])
    cos, sin = tables_for(cfg, "dynamic", 40000)
    ref_cos, ref_sin, angles = rotary_reference(hf, positions)
    assert_tables_match(cos[positions], ref_cos, angles)
    assert_tables_match(sin[positions], ref_sin, angles)


def test_unscaled_tables_match_rotary_without_rope_scaling():
    cfg, hf = both(hf_dict(None, max_pos=256))
    cos, sin = tables_for(cfg, "none", 10)
    ref_cos, ref_sin, angles = rotary_reference(hf, np.arange(256))
    assert_tables_match(cos, ref_cos, angles)
    assert_tables_match(sin, ref_sin, angles)


def test_rope_tables_apply_attention_factor_to_cos_and_sin():
    inv = default_inv_freq(8, 10000.0)
    cos1, sin1 = rope_tables(inv, 1.0, 5)
    cos2, sin2 = rope_tables(inv, 1.5, 5)
    np.testing.assert_allclose(cos2, 1.5 * cos1, rtol=1e-6)
    np.testing.assert_allclose(sin2, 1.5 * sin1, rtol=1e-6)
    np.testing.assert_allclose(cos1[3], np.cos(3 * inv), atol=1e-7)


def test_dynamic_is_bit_identical_to_none_for_short_requests():
    cfg = ModelConfig.from_hf_dict(hf_dict(64, 4.0))
    for total in (1, 17, 64):
        plan = choose_rope(cfg, "dynamic", total)
        assert plan == RopePlan(scaled=False, factor=None, max_positions=64)
        d_cos, d_sin = tables_for(cfg, "dynamic", total)
        n_cos, n_sin = tables_for(cfg, "none", total)
        assert d_cos.tobytes() == n_cos.tobytes() and d_sin.tobytes() == n_sin.tobytes()
    ref_cos, _ = rope_tables(default_inv_freq(HEAD_DIM, BASE), 1.0, 64)
    assert tables_for(cfg, "dynamic", 64)[0].tobytes() == ref_cos.tobytes()


def test_dynamic_long_request_uses_config_factor_like_static():
    cfg = ModelConfig.from_hf_dict(hf_dict(64, 4.0))
    plan = choose_rope(cfg, "dynamic", 65)
    assert plan == RopePlan(scaled=True, factor=4.0, max_positions=256)
    assert choose_rope(cfg, "static", 3) == plan
    assert tables_for(cfg, "dynamic", 65)[0].tobytes() == tables_for(cfg, "static", 3)[0].tobytes()
    assert tables_for(cfg, "dynamic", 65)[0].tobytes() != tables_for(cfg, "dynamic", 64)[0][:64].tobytes()


def test_tables_are_cached_and_read_only():
    cfg = ModelConfig.from_hf_dict(hf_dict(64, 2.0))
    cos, _ = tables_for(cfg, "static", 100)
    assert tables_for(cfg, "static", 5)[0] is cos
    with pytest.raises(ValueError):
        cos[0, 0] = 2.0


def test_limits_for_qwen2_57b():
    d = json.loads(REFERENCE_CONFIG.read_text())
    plain = ModelConfig.from_hf_dict(d)
    d["rope_scaling"] = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768}
    yarn = ModelConfig.from_hf_dict(d)
    assert default_rope_mode(plain) == "none" and default_rope_mode(yarn) == "dynamic"
    assert check_context(plain, "none", 32000, 768).max_positions == 32768
    assert check_context(yarn, "none", 32000, 768) == RopePlan(False, None, 32768)
    assert check_context(yarn, "dynamic", 32000, 769) == RopePlan(True, 2.0, 65536)
    assert check_context(yarn, "static", 65000, 536) == RopePlan(True, 2.0, 65536)
    with pytest.raises(ContextLengthError):
        check_context(yarn, "none", 32000, 769)
    with pytest.raises(ContextLengthError):
        check_context(yarn, "dynamic", 65000, 537)


def test_context_error_is_one_line_naming_everything():
    cfg = ModelConfig.from_hf_dict(hf_dict(64, 2.0))
    with pytest.raises(ContextLengthError) as e:
        check_context(cfg, "none", 60, 10)
    msg = str(e.value)
    assert "\n" not in msg and "60" in msg and "10" in msg and "64" in msg and "'none'" in msg
    assert isinstance(e.value, QmoeError) and isinstance(e.value, ValueError)
    with pytest.raises(ContextLengthError, match="129 positions exceed the limit of 128"):
        choose_rope(cfg, "dynamic", 129)
    with pytest.raises(ContextLengthError, match="must be >= 0"):
        check_context(cfg, "dynamic", 5, -1)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_scaled_modes_need_rope_scaling(mode):
    cfg = ModelConfig.from_hf_dict(hf_dict(None))
    with pytest.raises(RopeModeError, match=f"rope mode '{mode}' needs rope_scaling"):
        choose_rope(cfg, mode, 10)
    with pytest.raises(RopeModeError):
        check_context(cfg, mode, 1, 1)


def test_unknown_mode_is_rejected():
    cfg = ModelConfig.from_hf_dict(hf_dict(64, 2.0))
    with pytest.raises(RopeModeError, match="unknown rope mode 'yarn'"):
        tables_for(cfg, "yarn", 10)  # type: ignore[arg-type]
