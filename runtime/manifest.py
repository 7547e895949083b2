"""The artifact manifest (`qmoe.json`): what the exporter made and how the runtime must feed it.

Versioned: the runtime refuses a manifest whose major format version it does not know.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, ModelConfig
from .errors import QmoeError

FORMAT_VERSION = "1.0"
NAME = "qmoe.json"
EXPORTER_VERSION = "0.1.0"


class ManifestError(QmoeError, ValueError):
    pass


@dataclass(frozen=True)
class IONames:
    inputs: list[str]
    outputs: list[str]


def io_names(num_layers: int) -> IONames:
    inputs = ["input_ids", "query_seqlens", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache",
              "logits_indices"]
    outputs = ["logits"]
    for L in range(num_layers):
        inputs += [f"past_key_values.{L}.key", f"past_key_values.{L}.value"]
        outputs += [f"present.{L}.key", f"present.{L}.value"]
    return IONames(inputs, outputs)


@dataclass(frozen=True)
class Manifest:
    format_version: str
    exporter_version: str
    target: str  # onnxruntime | tensorrt
    dtype: str  # what the user asked for
    weight_dtype: str
    compute_dtype: str  # dtype of hidden states, KV cache, cos/sin tables
    opset: int
    model_file: str
    inputs: list[str]
    outputs: list[str]
    # KV cache: one buffer per layer and K/V, [batch, kv_heads, capacity, head_dim], shared by
    # past_* and present_* (written in place by GroupQueryAttention). The TensorRT backend swaps
    # two such buffers unless the engine reports present aliased to past.
    kv_layout: str
    hf_config: dict[str, Any]
    rope: dict[str, Any]
    source_checkpoint: str
    export_seconds: float = 0.0
    linked_weights: bool = False
    # Weight-only quantization (exporter/quantize.py: QuantConfig.to_json()), None for float weights.
    quantization: dict[str, Any] | None = None
    # LoRA adapters merged into the weights (exporter/lora.py: Adapter.describe()), None without.
    lora: list[dict[str, Any]] | None = None
    # tensorrt target: the version of each qmoe plugin its graph's nodes name (runtime/contract.py), so
    # that `qmoe build` can say "re-export" instead of relaying TensorRT's parse error. None: an
    # onnxruntime artifact, or one exported before they were recorded.
    plugins: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.hf_config, source=NAME)

    @classmethod
    def for_export(cls, *, config: ModelConfig, target: str, dtype: str, weight_dtype: str, compute_dtype: str,
                   opset: int, source: str, export_seconds: float, linked_weights: bool,
                   quantization: dict[str, Any] | None = None,
                   lora: list[dict[str, Any]] | None = None,
                   plugins: dict[str, str] | None = None) -> "Manifest":
        io = io_names(config.num_hidden_layers)
        rs = config.rope_scaling
        return cls(
            format_version=FORMAT_VERSION, exporter_version=EXPORTER_VERSION, target=target, dtype=dtype,
            weight_dtype=weight_dtype, compute_dtype=compute_dtype, opset=opset, model_file="model.onnx",
            inputs=io.inputs, outputs=io.outputs, kv_layout="BNSH-shared-buffer",
            hf_config=config.to_hf_dict(),
            rope={"theta": config.rope_theta, "head_dim": config.head_dim,
                  "max_position_embeddings": config.max_position_embeddings,
                  "scaling": None if rs is None else asdict(rs)},
            source_checkpoint=source, export_seconds=export_seconds, linked_weights=linked_weights,
            quantization=quantization, lora=lora, plugins=plugins,
        )


DTYPES = ("float32", "float16", "bfloat16")
TARGETS = ("onnxruntime", "tensorrt")
# Weight quantization (exporter/quantize.py); here so that the CLI and this check need no torch.
QUANT_SCHEMES = {"int4": 4, "int8": 8}
QUANT_BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits: a power of two >= 16
QUANT_ACTIVATIONS = ("float", "int8")
QUANT_METHODS = ("rtn", "gptq", "awq")  # quantized by the exporter; carried over from a GPTQ / AWQ checkpoint
# (exporter/gptq.py)


def _check_types(m: Manifest) -> None:
    """Every field has its type (and the dtypes and target a known value); a TypeError names the first
    that does not."""
    kinds: dict[str, Any] = {"opset": int, "export_seconds": (int, float), "linked_weights": bool,
                             "inputs": list, "outputs": list, "hf_config": dict, "rope": dict, "extra": dict,
                             "quantization": (dict, type(None)), "lora": (list, type(None)),
                             "plugins": (dict, type(None))}
    for name in Manifest.__dataclass_fields__:
        v, kind = getattr(m, name), kinds.get(name, str)
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            raise TypeError(f"{name} is {v!r}")
    for name in ("inputs", "outputs"):
        if not all(isinstance(x, str) for x in getattr(m, name)):
            raise TypeError(f"{name} must be a list of names")
    if m.plugins is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in m.plugins.items()):
        raise TypeError(f"plugins is {m.plugins!r}; expected plugin names and their versions")

    def adapter_ok(a: Any) -> bool:  # file: the name of its weights file in the folder at path
        f = a.get("file", "-") if isinstance(a, dict) else None
        return isinstance(a, dict) and isinstance(a.get("path"), str) and isinstance(a.get("sha256"), str) \
            and isinstance(f, str) and f not in ("", "..") and f == Path(f).name

    if m.lora is not None and not all(adapter_ok(a) for a in m.lora):
        raise TypeError(f"lora is {m.lora!r}; expected a list of adapters with their path, sha256 and weights file "
                        "name")
    q = m.quantization

    def quant_ok(q: Any) -> bool:
        return (isinstance(q, dict) and type(q.get("bits")) is int and QUANT_SCHEMES.get(q.get("scheme")) == q["bits"]
                and type(q.get("block_size")) is int and q["block_size"] in QUANT_BLOCK_SIZES
                and q.get("activations") in QUANT_ACTIVATIONS and not (q["bits"] == 8 and q["activations"] == "float")
                and q.get("method", "rtn") in QUANT_METHODS and type(q.get("symmetric", True)) is bool
                and (q.get("symmetric", True) or q.get("method") in ("gptq", "awq")))

    rest = None if q is None else q.get("rest")  # GPTQ/AWQ: the float layers quantized round to nearest
    if q is not None and not (quant_ok(q) and (rest is None or (q.get("method") in ("gptq", "awq") and quant_ok(rest)
                                                                and rest.get("method", "rtn") == "rtn"
                                                                and rest.get("rest") is None))):
        raise TypeError(f"quantization is {q!r}; expected scheme {'/'.join(QUANT_SCHEMES)} with its bits, block_size "
                        f"one of {QUANT_BLOCK_SIZES}, activations {'/'.join(QUANT_ACTIVATIONS)} (int8 for int8) and "
                        f"method {'/'.join(QUANT_METHODS)} (symmetric false only for gptq and awq; rest, rtn, only "
                        "for them)")
    for name, known in (("target", TARGETS), ("weight_dtype", DTYPES), ("compute_dtype", DTYPES)):
        if getattr(m, name) not in known:
            raise TypeError(f"{name} is {getattr(m, name)!r}, not one of {', '.join(known)}")


def sha256(path: str | Path) -> str:
    """A file's hash as manifests record it (TensorRT plugin libraries, LoRA adapters)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write(folder: Path, m: Manifest) -> None:
    (Path(folder) / NAME).write_text(json.dumps(asdict(m), indent=2) + "\n", encoding="utf-8")


def read(folder: str | Path) -> Manifest:
    path = Path(folder) / NAME
    if not path.is_file():
        raise ManifestError(f"{folder}: not a qmoe artifact (no {NAME}; create one with `qmoe export`)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ManifestError(f"{path}: corrupt manifest (a JSON object expected, got {type(d).__name__})")
        major = str(d.get("format_version", "")).split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise ManifestError(f"{path}: format_version {d.get('format_version')!r} is not supported "
                                f"(this qmoe reads {FORMAT_VERSION}); re-export the model")
        known = set(Manifest.__dataclass_fields__)
        m = Manifest(**{k: v for k, v in d.items() if k in known})
        _check_types(m)
        io = io_names(m.config.num_hidden_layers)  # m.config validates hf_config
        if (m.inputs, m.outputs) != (io.inputs, io.outputs):
            raise ManifestError(f"{path}: inputs/outputs do not match the {m.config.num_hidden_layers} layers "
                                "of hf_config; re-export the model")
        return m
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ManifestError(f"{path}: corrupt manifest ({e})") from None
    except ConfigError as e:
        raise ManifestError(f"{path}: {e}") from None
