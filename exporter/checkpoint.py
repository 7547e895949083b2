"""Lazy, memory-mapped reader for Hugging Face safetensors checkpoints of Qwen2-MoE.

Headers are parsed and validated up front (cheap: a few KB per shard); tensor data is read only
when asked for, one tensor at a time, through ``safetensors.safe_open`` (mmap). The reader also
exposes where each tensor's bytes live (file, offset) so the exporter can point ONNX external
data straight at the checkpoint instead of copying it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from runtime.config import ModelConfig
from runtime.errors import QmoeError

if TYPE_CHECKING:
    import torch

    from .lora import Adapters

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}  # I32: GPTQ's packed weights (exporter/gptq.py)
FLOAT_DTYPES = ("BF16", "F16", "F32")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class CheckpointError(QmoeError, ValueError):
    """A checkpoint that cannot be read; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype: BF16, F16, F32 (I32 in GPTQ checkpoints)
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (length {hlen}, file {size} bytes)")
            header_bytes = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object, or __metadata__ is not one)")
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name}") from None
        if not all(_is_count(v) for v in (*shape, start, end)):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name} "
                                  "(shape and data_offsets must be non-negative integers)")
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; supported: BF16, F16, F32 (and I32 for "
                                  "GPTQ-packed weights)")
        n = 1
        for s in shape:
            n *= s
        if end - start != n * DTYPE_BYTES[dtype] or start < 0:
            raise CheckpointError(f"{path}: corrupt safetensors header: {name} offsets do not match its shape")
        if base + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} ends at byte {base + end} but the file has {size} bytes"
            )
        out[name] = TensorInfo(name, path, dtype, shape, base + start, end - start)
    end_of = 0
    for t in sorted(out.values(), key=lambda t: (t.offset, t.nbytes)):
        if t.offset < end_of:
            raise CheckpointError(f"{path}: corrupt safetensors header: {t.name} overlaps another tensor's bytes")
        end_of = t.offset + t.nbytes
    return out


class Checkpoint:
    """A Qwen2-MoE checkpoint folder: config.json plus one or more safetensors shards."""

    def __init__(self, directory: str | Path, config: ModelConfig | None = None,
                 lora: "Sequence[str | Path]" = ()) -> None:
        """`lora`: PEFT LoRA adapter folders whose deltas every read adds (exporter/lora.py)."""
        from .gptq import GptqConfig

        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such checkpoint folder")
        self.config = config or ModelConfig.from_file(self.dir / "config.json")
        self.gptq = GptqConfig.from_file(self.dir / "config.json")  # None: a float checkpoint
        self.tensors: dict[str, TensorInfo] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None
        for shard, names in self._shards().items():
            infos = _read_header(shard)
            for name in names if names is not None else infos:
                if name not in infos:
                    raise CheckpointError(f"{shard}: tensor {name} listed in {INDEX_NAME} is missing from this shard")
                self.tensors[name] = infos[name]
        self.fused_experts = any(n.endswith("mlp.experts.gate_up_proj") for n in self.tensors)
        if self.gptq is not None and self.fused_experts:
            raise CheckpointError(f"{self.dir}: a GPTQ checkpoint with fused expert tensors (gate_up_proj) is not "
                                  "supported; GPTQ stores experts per Linear (mlp.experts.N.gate_proj.qweight)")
        if self.config.tie_word_embeddings and "lm_head.weight" in self.tensors:
            # As transformers reads it: a head stored beside tied embeddings is used (it unties them
            # when the two differ; when equal the result is the same), so this checkpoint is untied.
            self.config = replace(self.config, tie_word_embeddings=False)
        self.validate()
        self.lora = self.lora_adapters(lora)

    def lora_adapters(self, lora: "Sequence[str | Path] | str | Path") -> "Adapters | None":
        """The adapters in `lora`, validated against this checkpoint (None: none given); reads add
        them only when they are this checkpoint's own (`Checkpoint(..., lora=...)`)."""
        if isinstance(lora, (str, Path)):  # one folder, not a sequence of one-letter names
            lora = [lora]
        if not lora:
            return None
        from .lora import Adapters, LoraError

        adapters = Adapters(lora, self.config, self.expected_shapes_for(self.config, fused=False))
        packed = sorted(n for n in adapters.names if self.is_gptq(n))
        if packed:
            assert self.gptq is not None  # is_gptq holds only for a GPTQ checkpoint's packed layers
            raise LoraError(f"{self.dir} is {self.gptq.label}-quantized and the LoRA adapts its packed layer "
                            f"{packed[0][:-7]}; merging would need requantizing (merge into the float checkpoint "
                            "and quantize that instead)")
        return adapters

    def _shards(self) -> dict[Path, list[str] | None]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"{index}: corrupt index (expected JSON with a 'weight_map' object)") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
                raise CheckpointError(f"{index}: corrupt index (weight_map must map tensor names to shard files)")
            shards: dict[Path, list[str] | None] = {}
            for name, fname in weight_map.items():
                path = self.dir / fname
                if not path.is_file():
                    raise CheckpointError(f"{index}: shard {fname} (holding {name}) is missing")
                names = shards.setdefault(path, [])
                assert names is not None
                names.append(name)
            return shards
        single = self.dir / SINGLE_NAME
        if single.is_file():
            return {single: None}
        raise CheckpointError(f"{self.dir}: no {INDEX_NAME} or {SINGLE_NAME} (not a safetensors checkpoint)")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name} not found in the checkpoint") from None

    def tensor(self, name: str) -> "torch.Tensor":
        """Loads one tensor. The shard is memory-mapped only for this call: mapped pages count
        as resident memory while the map lives, so keeping maps open would grow RSS to the
        checkpoint size during an export."""
        from safetensors import safe_open

        info = self.info(name)
        with safe_open(str(info.file), framework="pt") as f:
            t = f.get_tensor(name)
        return t if self.lora is None else self.lora.apply(name, t, 0)

    def rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        """Rows [start, stop) of a tensor (first dimension), reading only those bytes."""
        from safetensors import safe_open

        info = self.info(name)
        with safe_open(str(info.file), framework="pt") as f:
            t = f.get_slice(name)[start:stop]
        return t if self.lora is None else self.lora.apply(name, t, start)

    def close(self) -> None:
        """Nothing stays open between calls; kept for symmetry with other readers."""

    # --- the Qwen2-MoE layout -------------------------------------------------------------

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """expected_shapes_for this checkpoint, computed once (the GPTQ rewrite asks per graph node;
        config and layout are settled before validate() first asks). Read-only for callers."""
        if self._shapes is None:
            self._shapes = self.expected_shapes_for(self.config, self.fused_experts)
        return self._shapes

    @staticmethod
    def expected_shapes_for(c: ModelConfig, fused: bool) -> dict[str, tuple[int, ...]]:
        """Every tensor the config implies, with its shape (per-expert HF layout unless `fused`)."""
        H, D, E = c.hidden_size, c.head_dim, c.num_experts
        I, Is = c.moe_intermediate_size, c.shared_expert_intermediate_size
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (c.vocab_size, H),
            "model.norm.weight": (H,),
        }
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, H)
        for L in range(c.num_hidden_layers):
            p = f"model.layers.{L}."
            shapes[p + "input_layernorm.weight"] = (H,)
            shapes[p + "post_attention_layernorm.weight"] = (H,)
            for proj, rows in (("q", c.num_attention_heads * D), ("k", c.num_key_value_heads * D),
                               ("v", c.num_key_value_heads * D)):
                shapes[f"{p}self_attn.{proj}_proj.weight"] = (rows, H)
                if c.qkv_bias:
                    shapes[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (H, c.num_attention_heads * D)
            if c.is_sparse_layer(L):
                shapes[p + "mlp.gate.weight"] = (E, H)
                if fused:
                    shapes[p + "mlp.experts.gate_up_proj"] = (E, 2 * I, H)
                    shapes[p + "mlp.experts.down_proj"] = (E, H, I)
                else:
                    for e in range(E):
                        shapes[f"{p}mlp.experts.{e}.gate_proj.weight"] = (I, H)
                        shapes[f"{p}mlp.experts.{e}.up_proj.weight"] = (I, H)
                        shapes[f"{p}mlp.experts.{e}.down_proj.weight"] = (H, I)
                shapes[p + "mlp.shared_expert.gate_proj.weight"] = (Is, H)
                shapes[p + "mlp.shared_expert.up_proj.weight"] = (Is, H)
                shapes[p + "mlp.shared_expert.down_proj.weight"] = (H, Is)
                shapes[p + "mlp.shared_expert_gate.weight"] = (1, H)
            else:
                shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, H)
                shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, H)
                shapes[p + "mlp.down_proj.weight"] = (H, c.intermediate_size)
        return shapes

    def is_gptq(self, name: str) -> bool:
        """Whether linear weight `name` (checkpoint name, '...proj.weight') is stored GPTQ-packed."""
        return self.gptq is not None and name.endswith(".weight") and f"{name[:-7]}.qweight" in self.tensors

    def validate(self) -> None:
        """Every expected tensor is present with the config's shape and a float dtype, or for a GPTQ
        linear its packed tensors with theirs (extra tensors are ignored)."""
        from .gptq import expected_shapes as gptq_shapes

        for name, shape in self.expected_shapes().items():
            if self.is_gptq(name) and len(shape) == 2 and name != "model.embed_tokens.weight":
                assert self.gptq is not None
                for part, (pshape, dtype) in gptq_shapes(name[:-7], shape[0], shape[1], self.gptq).items():
                    info = self.tensors.get(part)
                    if info is None:
                        if part.endswith(".g_idx") and not self.gptq.desc_act:
                            continue  # optional: k // group_size when absent
                        if part.endswith(".g_idx"):
                            raise CheckpointError(f"{self.dir}: tensor {part} not found in the checkpoint; with "
                                                  "desc_act true (act-order) it holds the layer's groups")
                        raise CheckpointError(f"{self.dir}: tensor {part} not found in the checkpoint "
                                              f"({self.gptq.label} layer {name[:-7]} has a qweight)")
                    if info.shape != pshape or info.dtype != dtype and not (dtype == "float"
                                                                            and info.dtype in FLOAT_DTYPES):
                        raise CheckpointError(
                            f"{info.file}: tensor {part} is {info.dtype} {list(info.shape)}; {self.gptq.bits}-bit "
                            f"{self.gptq.label} with group_size {self.gptq.group_size} and config.json imply {dtype} "
                            f"{list(pshape)}")
                continue
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.dir}: tensor {name} not found in the checkpoint (required by config.json)")
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file}: tensor {name} has shape {list(info.shape)}, config.json implies {list(shape)}"
                )
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; weights are BF16, F16 or "
                                      "F32")

    def expert(self, layer: int, expert: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """(gate [I, H], up [I, H], down [H, I]) of one routed expert, in either on-disk layout."""
        return (*self.expert_gate_up(layer, expert), self.expert_down(layer, expert))

    def experts(self, layer: int) -> Iterator[tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]]:
        for e in range(self.config.num_experts):
            yield self.expert(layer, e)

    def expert_gate_up(self, layer: int, expert: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(gate, up) of one routed expert, reading nothing else."""
        p = f"model.layers.{layer}.mlp.experts."
        if self.fused_experts:
            I = self.config.moe_intermediate_size
            gate_up = self.rows(p + "gate_up_proj", expert, expert + 1)[0]
            return gate_up[:I], gate_up[I:]
        return self.tensor(f"{p}{expert}.gate_proj.weight"), self.tensor(f"{p}{expert}.up_proj.weight")

    def expert_down(self, layer: int, expert: int) -> "torch.Tensor":
        """down [H, I] of one routed expert, reading nothing else."""
        p = f"model.layers.{layer}.mlp.experts."
        if self.fused_experts:
            return self.rows(p + "down_proj", expert, expert + 1)[0]
        return self.tensor(f"{p}{expert}.down_proj.weight")
