"""Rotary position tables (plain RoPE and YaRN): the one implementation, used by the exporter too.

Pipeline: ``check_context`` (reject too-long requests before any compute) -> ``choose_rope``
(one ``RopePlan`` per request) -> ``tables_for`` -> cos/sin ``[positions, head_dim/2]`` float32,
the layout ONNX Runtime's GroupQueryAttention takes as ``cos_cache``/``sin_cache``.

Math is float64 and only the outputs are float32, so a table does not depend on how a backend
would have rounded ``position * inv_freq``. The YaRN formulas follow transformers'
``_compute_yarn_parameters`` (beta_fast/beta_slow correction range, optional truncation, linear
ramp, attention factor multiplied into cos and sin), with the config's own ``factor``: some
transformers 4.x versions replaced it by max_position_embeddings / original_max_position_embeddings,
which is 1 for Qwen2-57B and would silently disable YaRN.

Rope modes (``RopeMode``):

- ``none``: never scaled. Limit: ``original_max_position_embeddings`` when the config has
  rope_scaling (the window the model was pretrained on, 32768 for Qwen2-57B), otherwise
  ``max_position_embeddings``.
- ``static``: always YaRN with the config's factor, as vLLM does. The model card warns this can
  hurt short texts. Limit: ``ModelConfig.max_context``.
- ``dynamic`` (the default when the config has rope_scaling): a request whose total length
  (prompt + max_new_tokens) fits the original window gets exactly the unscaled tables (bit-identical
  to ``none``); a longer one gets YaRN. Limit: ``ModelConfig.max_context``.

Factor for long requests: always the config's ``factor``, never a per-request
``ceil(total / original)``. The checkpoint's authors published and validated one factor (2 for
Qwen2-57B); a per-request factor would give each length a different frequency blend and attention
temperature that nobody evaluated, and would multiply the table sets a compiled engine has to hold.
With the config's factor there are exactly two table sets per model, both cached.

The plan is chosen once per request, before prefill, from prompt length + max_new_tokens, so a
request's KV cache is never mixed from two tables. The price: a request that asks for many new
tokens gets YaRN even if it stops early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import numpy as np

from runtime.config import ModelConfig, RopeScaling
from runtime.errors import QmoeError

RopeMode = Literal["none", "static", "dynamic"]
ROPE_MODES: tuple[str, ...] = get_args(RopeMode)


class RopeModeError(QmoeError, ValueError):
    """A rope mode that is unknown or that the model's config cannot serve."""


class ContextLengthError(QmoeError, ValueError):
    """A request longer than the rope mode allows; raised before any compute."""


@dataclass(frozen=True)
class RopePlan:
    """The rotary tables one request uses.

    ``max_positions`` is the number of positions these tables are valid for (the limit of the
    mode for this choice); ``factor`` is the YaRN factor, None when unscaled.
    """

    scaled: bool
    factor: float | None
    max_positions: int


# --- formulas -------------------------------------------------------------------------------


def default_inv_freq(head_dim: int, base: float) -> np.ndarray:
    """Plain RoPE inverse frequencies ``base^(-2i/d)``: float64 [head_dim/2].

    Kept float64 (only the tables are float32) so every caller of ``rope_tables`` gets the same
    bits as ``tables_for``.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    return 1.0 / (float(base) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def yarn_attention_factor(rs: RopeScaling) -> float:
    """The factor YaRN multiplies into cos and sin (transformers' rule)."""
    if rs.attention_factor is not None:
        return float(rs.attention_factor)
    if rs.mscale and rs.mscale_all_dim:
        return _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim)
    return _yarn_mscale(rs.factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(head_dim: int, base: float, rs: RopeScaling) -> tuple[float, float]:
    """Dimensions below ``low`` keep their frequency, above ``high`` are fully interpolated."""

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits num_rotations times into the original window.
        return (head_dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    # transformers treats a 0 (or missing) beta as the paper's default.
    low = correction_dim(rs.beta_fast or 32.0)
    high = correction_dim(rs.beta_slow or 1.0)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def yarn_inv_freq_and_attention_factor(head_dim: int, base: float, rs: RopeScaling) -> tuple[np.ndarray, float]:
    """YaRN inverse frequencies, float64 [head_dim/2], and the attention factor."""
    extrapolation = default_inv_freq(head_dim, base)  # the pretrained frequencies
    interpolation = extrapolation / rs.factor
    low, high = yarn_correction_range(head_dim, base, rs)
    if low == high:
        high += 0.001  # same guard as transformers against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: high-frequency dims keep their frequency; 0: fully interpolated
    inv_freq = interpolation * (1.0 - keep) + extrapolation * keep
    return inv_freq, yarn_attention_factor(rs)


def rope_tables(inv_freq: np.ndarray, attention_factor: float, num_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each float32 [num_positions, D/2], with the attention factor multiplied in."""
    if num_positions < 0:
        raise ValueError(f"num_positions must be >= 0, got {num_positions}")
    positions = np.arange(num_positions, dtype=np.float64)
    angles = np.outer(positions, np.asarray(inv_freq, dtype=np.float64))  # [P, D/2]
    cos = (np.cos(angles) * attention_factor).astype(np.float32)
    sin = (np.sin(angles) * attention_factor).astype(np.float32)
    return cos, sin


# --- mode selection -------------------------------------------------------------------------


def default_rope_mode(config: ModelConfig) -> RopeMode:
    """``dynamic`` where the config has rope_scaling (short requests stay exact), else ``none``."""
    return "dynamic" if config.rope_scaling is not None else "none"


def unscaled_limit(config: ModelConfig) -> int:
    """Longest sequence without YaRN: the pretrained window."""
    if config.rope_scaling is not None:
        return config.rope_scaling.original_max_position_embeddings
    return config.max_position_embeddings


def context_limit(config: ModelConfig, mode: RopeMode) -> int:
    """Longest total length (prompt + new tokens) the mode serves for this config."""
    _check_mode(config, mode)
    return unscaled_limit(config) if mode == "none" else config.max_context


def check_context(config: ModelConfig, mode: RopeMode, prompt_len: int, max_new_tokens: int) -> RopePlan:
    """Reject a request that cannot fit before any compute; return the plan for one that does."""
    if prompt_len < 0 or max_new_tokens < 0:
        raise ContextLengthError(
            f"prompt length ({prompt_len}) and max_new_tokens ({max_new_tokens}) must be >= 0"
        )
    limit = context_limit(config, mode)
    if prompt_len + max_new_tokens > limit:
        raise ContextLengthError(
            f"prompt has {prompt_len} tokens and max_new_tokens is {max_new_tokens} "
            f"({prompt_len + max_new_tokens} in total), over the limit of {limit} for rope mode {mode!r}; "
            "shorten the prompt or lower max_new_tokens"
        )
    return choose_rope(config, mode, prompt_len + max_new_tokens)


def choose_rope(config: ModelConfig, mode: RopeMode, total_len: int) -> RopePlan:
    """The tables a request of ``total_len`` positions uses for its whole life."""
    limit = context_limit(config, mode)
    if total_len > limit:
        raise ContextLengthError(f"{total_len} positions exceed the limit of {limit} for rope mode {mode!r}")
    rs = config.rope_scaling
    if mode == "none" or (mode == "dynamic" and total_len <= unscaled_limit(config)):
        return RopePlan(scaled=False, factor=None, max_positions=unscaled_limit(config))
    assert rs is not None  # _check_mode guarantees it for static/dynamic
    return RopePlan(scaled=True, factor=rs.factor, max_positions=config.max_context)


def tables_for(config: ModelConfig, mode: RopeMode, total_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [plan.max_positions, head_dim/2] float32 for a request; read-only and cached."""
    return plan_tables(config, choose_rope(config, mode, total_len))


def plan_inv_freq(config: ModelConfig, plan: RopePlan) -> tuple[np.ndarray, float]:
    """Inverse frequencies (float64) and attention factor of a plan, for graphs that compute rope."""
    if not plan.scaled:
        return default_inv_freq(config.head_dim, config.rope_theta), 1.0
    if config.rope_scaling is None:
        raise RopeModeError(f"a scaled rope plan needs rope_scaling in {config.source or 'config.json'}")
    return yarn_inv_freq_and_attention_factor(config.head_dim, config.rope_theta, config.rope_scaling)


def plan_tables(config: ModelConfig, plan: RopePlan, positions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [P, head_dim/2] float32 of a plan, P = plan.max_positions or at most `positions`
    (a cache's rows: a model whose YaRN context is huge must not build tables for all of it);
    read-only and cached. Row p is the same whatever P is."""
    if plan.scaled and config.rope_scaling is None:
        raise RopeModeError(f"a scaled rope plan needs rope_scaling in {config.source or 'config.json'}")
    rs = config.rope_scaling if plan.scaled else None
    n = plan.max_positions if positions is None else min(plan.max_positions, positions)
    return _cached_tables(config.head_dim, config.rope_theta, rs, n)


@lru_cache(maxsize=8)
def _cached_tables(
    head_dim: int, base: float, rs: RopeScaling | None, num_positions: int
) -> tuple[np.ndarray, np.ndarray]:
    # Two table sets per model at most (unscaled, YaRN); shared between requests, so read-only.
    if rs is None:
        inv_freq, attention_factor = default_inv_freq(head_dim, base), 1.0
    else:
        inv_freq, attention_factor = yarn_inv_freq_and_attention_factor(head_dim, base, rs)
    cos, sin = rope_tables(inv_freq, attention_factor, num_positions)
    cos.flags.writeable = False
    sin.flags.writeable = False
    return cos, sin


def _check_mode(config: ModelConfig, mode: str) -> None:
    if mode not in ROPE_MODES:
        raise RopeModeError(f"unknown rope mode {mode!r}; expected one of {', '.join(ROPE_MODES)}")
    if mode != "none" and config.rope_scaling is None:
        raise RopeModeError(
            f"rope mode {mode!r} needs rope_scaling (YaRN) in {config.source or 'config.json'}; use rope mode 'none'"
        )
