"""Qwen2-MoE model configuration, read from a Hugging Face ``config.json``.

Validated once, here, at the boundary: every later stage trusts a ``ModelConfig``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import QmoeError


class ConfigError(QmoeError, ValueError):
    """A config.json that qmoe cannot use; the message names the file and field."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (the only rope scaling Qwen2-MoE checkpoints use)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = True
    rope_scaling: RopeScaling | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    source: str = field(default="", compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sparse_layer(self, layer: int) -> bool:
        """Same rule as transformers' Qwen2MoeDecoderLayer."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def max_context(self) -> int:
        """Longest sequence the model supports, with YaRN where the config has it."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        rs = self.rope_scaling
        return max(self.max_position_embeddings, int(rs.factor * rs.original_max_position_embeddings))

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers ``config.json`` this config was read from (normalised)."""
        d = asdict(self)
        d.pop("source")
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        if self.rope_scaling is not None:
            rs = {k: v for k, v in asdict(self.rope_scaling).items() if v is not None}
            rs["rope_type"] = "yarn"
            rs["type"] = "yarn"
            d["rope_scaling"] = rs
        d.update(
            model_type="qwen2_moe",
            architectures=["Qwen2MoeForCausalLM"],
            hidden_act="silu",
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=self.num_hidden_layers,
            attention_dropout=0.0,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
            use_cache=True,
            initializer_range=0.02,
        )
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (expected a Hugging Face config.json)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data, source=str(path))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        r = _Reader(d, source)
        model_type = d.get("model_type")
        if model_type != "qwen2_moe":
            raise ConfigError(f"{source}: model_type is {model_type!r}; qmoe supports only 'qwen2_moe'")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act is {act!r}; Qwen2-MoE experts are SwiGLU ('silu')")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window is true; sliding-window attention is not supported")

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos_ids):
            raise ConfigError(f"{source}: eos_token_id must be a token id or a list of token ids, got {eos!r}")
        hidden = r.int("hidden_size")
        heads = r.int("num_attention_heads")
        kv_heads = r.int("num_key_value_heads", default=heads)
        experts = r.int("num_experts", minimum=0)
        top_k = r.int("num_experts_per_tok")
        layers = r.int("num_hidden_layers")
        # RoPE settings as transformers (5.x) reads them: the legacy top-level rope_scaling if set, else
        # rope_parameters (what transformers >= 5 writes); rope_theta from that object, else the top
        # level; rope_type from it ("type" in older files), plain RoPE if absent.
        rope_key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
        params = d.get(rope_key) or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: {rope_key} must be an object or null")
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"{source}: {rope_key} per layer type is not supported (Qwen2-MoE has one RoPE)")
        rope = _Reader(params, source, prefix=f"{rope_key}.") if "rope_theta" in params else r
        scaling = _rope_scaling(params, source, rope_key, r.int("max_position_embeddings"))
        if d.get("head_dim") is not None and d["head_dim"] != hidden // max(heads, 1):
            raise ConfigError(f"{source}: head_dim {d['head_dim']!r} differs from hidden_size / num_attention_heads "
                              f"({hidden // max(heads, 1)}); qmoe supports only the derived head size")
        mlp_only = d.get("mlp_only_layers") or []
        if not isinstance(mlp_only, list) or not all(isinstance(i, int) and 0 <= i < layers for i in mlp_only):
            raise ConfigError(f"{source}: mlp_only_layers must be a list of layer indices in [0, {layers})")

        cfg = cls(
            vocab_size=r.int("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            moe_intermediate_size=r.int("moe_intermediate_size"),
            shared_expert_intermediate_size=r.int("shared_expert_intermediate_size", minimum=0),
            intermediate_size=r.int("intermediate_size"),
            num_experts=experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=r.bool("norm_topk_prob", default=False),
            decoder_sparse_step=r.int("decoder_sparse_step", default=1),
            mlp_only_layers=tuple(sorted(set(mlp_only))),
            rms_norm_eps=r.float("rms_norm_eps", default=1e-6, above=0.0),
            rope_theta=rope.float("rope_theta", default=10000.0, above=1.0),  # log(theta) divides in YaRN
            max_position_embeddings=r.int("max_position_embeddings"),
            tie_word_embeddings=r.bool("tie_word_embeddings", default=False),
            qkv_bias=r.bool("qkv_bias", default=True),
            rope_scaling=scaling,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos_ids,
            source=source,
        )
        if hidden % heads:
            raise ConfigError(f"{source}: num_attention_heads ({heads}) does not divide hidden_size ({hidden})")
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_key_value_heads ({kv_heads}) does not divide num_attention_heads ({heads})"
            )
        if cfg.head_dim % 2:
            raise ConfigError(f"{source}: head_dim {cfg.head_dim} is odd; rotary embedding needs an even head_dim")
        if experts and top_k > experts:
            raise ConfigError(f"{source}: num_experts_per_tok ({top_k}) exceeds num_experts ({experts})")
        return cfg


MAX_YARN_FACTOR = 1e4  # far past any trained model's (Qwen2: 2-4); keeps the context limit an integer


def _rope_scaling(rs: dict[str, Any], source: str, key: str, max_positions: int) -> RopeScaling | None:
    """The YaRN settings of `rope_scaling` / `rope_parameters` (`key`), or None for plain RoPE.
    original_max_position_embeddings defaults to max_position_embeddings, as in transformers 5.24
    (which ignores a top-level one for Qwen2-MoE)."""
    kind = rs.get("rope_type", rs.get("type")) or "default"
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"{source}: {key}.type {kind!r} is not supported (supported: 'yarn')")
    r = _Reader(rs, source, prefix=f"{key}.")
    factor = r.float("factor")
    if not 1.0 <= factor <= MAX_YARN_FACTOR:
        raise ConfigError(f"{source}: {key}.factor must be in [1, {MAX_YARN_FACTOR:g}], got {factor}")

    def opt(name: str) -> float | None:
        return None if rs.get(name) is None else r.float(name)

    return RopeScaling(
        factor=factor,
        original_max_position_embeddings=r.int("original_max_position_embeddings", default=max_positions),
        beta_fast=r.float("beta_fast", default=32.0),
        beta_slow=r.float("beta_slow", default=1.0),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"),
        truncate=r.bool("truncate", default=True),
    )


class _Reader:
    """Typed access to one JSON object, with errors that name the field."""

    def __init__(self, d: dict[str, Any], source: str, prefix: str = "") -> None:
        self.d, self.source, self.prefix = d, source, prefix

    def _get(self, name: str, default: Any) -> Any:
        if name not in self.d or self.d[name] is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: missing field {self.prefix}{name}")
            return default
        return self.d[name]

    def int(self, name: str, default: Any = None, minimum: int = 1) -> int:
        v = self._get(name, _REQUIRED if default is None else default)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{self.source}: {self.prefix}{name} must be an integer >= {minimum}, got {v!r}")
        return v

    def float(self, name: str, default: Any = None, above: float | None = None) -> float:
        v = self._get(name, _REQUIRED if default is None else default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{self.source}: {self.prefix}{name} must be a finite number, got {v!r}")
        if above is not None and not v > above:
            raise ConfigError(f"{self.source}: {self.prefix}{name} must be a number > {above:g}, got {v!r}")
        return float(v)

    def bool(self, name: str, default: bool) -> bool:
        v = self._get(name, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.source}: {self.prefix}{name} must be true or false, got {v!r}")
        return v


_REQUIRED = object()
