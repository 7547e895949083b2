"""GPTQ checkpoints (AutoGPTQ / GPTQModel format, e.g. Qwen/Qwen2-57B-A14B-Instruct-GPTQ-Int4) carried
into the onnxruntime target's quantized ops bit for bit: no dequantize-requantize round trip, so
the artifact computes with exactly the weights GPTQ chose.

A linear layer `base` with `quantization_config.quant_method == "gptq"` is stored as
    base.qweight  int32 [K * b / 32, N]   input k of output n: bits (k % (32/b)) * b of word [k // (32/b), n]
    base.qzeros   int32 [G, N * b / 32]   zero point of group j, output n: bits (n % (32/b)) * b of word [j, n // (32/b)]
    base.scales   fp16  [G, N]
    base.g_idx    int32 [K]               group of input k (k // group_size unless act-order)
    base.bias     (if the layer has one, as in the float checkpoint)
with w[n, k] = (q[n, k] - z[g_idx[k], n]) * s[g_idx[k], n]. checkpoint_format "gptq" (v1, what
AutoGPTQ and GPTQModel save by default) stores each zero point minus one; "gptq_v2" stores it as is.

ONNX Runtime's MatMulNBits and QMoE take the same numbers in their own layout: per output row, the
row's K values packed along K (low nibble first for 4 bits), one scale per block of group_size
inputs and, unless every zero point is 2^(b-1) (symmetric GPTQ), one packed zero point per block.
Which layers are quantized is read from the tensors (`qweight` instead of `weight`): GPTQ leaves the
embeddings, the head, the router and the shared-expert gate in float by default.

AWQ checkpoints (AutoAWQ's GEMM format, quant_method "awq", 4-bit with zero points) carry the same
numbers packed the other way: qweight int32 [K, N/8] and qzeros int32 [G, N/8] hold eight outputs
per word in the order 0, 2, 4, 6, 1, 3, 5, 7 from the low bits up; zero points as they are; no
g_idx. They take the same path from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from runtime.errors import QmoeError
from runtime.manifest import QUANT_BLOCK_SIZES

from .weights import EXPERTS_PARAM, SHARED_PARAM

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

BITS = (4, 8)  # what MatMulNBits and QMoE both take
UNPACK_COLUMNS = 4096  # output rows unpacked at once
FORMATS = ("gptq", "gptq_v2")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column of each nibble of an AWQ word, low bits first
AWQ_UNORDER = tuple(AWQ_ORDER.index(i) for i in range(8))  # nibble holding output column i


class GptqError(QmoeError, ValueError):
    pass


@dataclass(frozen=True)
class GptqConfig:
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str  # "gptq" (v1: zero points stored minus one) | "gptq_v2" | "awq"
    method: str = "gptq"  # "gptq" | "awq"

    @property
    def zero_offset(self) -> int:
        return 1 if self.checkpoint_format == "gptq" else 0

    @property
    def label(self) -> str:
        return self.method.upper()

    @classmethod
    def from_hf_dict(cls, d: dict, source: str) -> "GptqConfig | None":
        """The checkpoint's GPTQ settings, None for a float checkpoint; a one-line error for
        quantization qmoe cannot carry over."""
        q = d.get("quantization_config")
        if q is None:
            return None
        if not isinstance(q, dict):
            raise GptqError(f"{source}: quantization_config must be an object")
        method = q.get("quant_method")
        if method == "awq":
            return cls._awq(q, source)
        if method != "gptq":
            raise GptqError(f"{source}: quantization_config.quant_method is {method!r}; qmoe reads float checkpoints "
                            "and GPTQ ('gptq') or AWQ ('awq') ones")
        bits, group = q.get("bits"), q.get("group_size", 128)
        if type(bits) is not int or bits not in BITS:
            raise GptqError(f"{source}: GPTQ bits is {bits!r}; ONNX Runtime's quantized ops take "
                            f"{' or '.join(map(str, BITS))}-bit weights")
        if type(group) is not int or group not in QUANT_BLOCK_SIZES:
            what = "per-channel (group_size -1)" if group == -1 else f"group_size {group!r}"
            raise GptqError(f"{source}: GPTQ {what} is not supported; ONNX Runtime's MatMulNBits needs groups of "
                            f"{', '.join(map(str, QUANT_BLOCK_SIZES))}")
        fmt = q.get("checkpoint_format", "gptq")
        if fmt not in FORMATS:
            raise GptqError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported; expected one of "
                            f"{', '.join(FORMATS)}")
        pack = q.get("pack_dtype", "int32")
        if pack not in ("int32", "torch.int32"):
            raise GptqError(f"{source}: GPTQ pack_dtype {pack!r} is not supported; qmoe reads int32-packed weights")
        if q.get("dynamic"):
            raise GptqError(f"{source}: GPTQ per-module 'dynamic' settings are not supported; qmoe reads one bits "
                            "and group_size for every layer")
        sym, desc_act = q.get("sym", True), q.get("desc_act", False)
        if not isinstance(sym, bool) or not isinstance(desc_act, bool):
            raise GptqError(f"{source}: GPTQ sym and desc_act must be true or false")
        return cls(bits, group, sym, desc_act, fmt)

    @classmethod
    def _awq(cls, q: dict, source: str) -> "GptqConfig":
        bits, group = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size", 128))
        if type(bits) is not int or bits != 4:
            raise GptqError(f"{source}: AWQ bits is {bits!r}; qmoe reads 4-bit AWQ checkpoints")
        if type(group) is not int or group not in QUANT_BLOCK_SIZES:
            raise GptqError(f"{source}: AWQ group_size {group!r} is not supported; ONNX Runtime's MatMulNBits needs "
                            f"groups of {', '.join(map(str, QUANT_BLOCK_SIZES))}")
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise GptqError(f"{source}: AWQ version {q.get('version')!r} is not supported; qmoe reads AutoAWQ's GEMM "
                            "packing (version 'gemm')")
        if q.get("zero_point", True) is not True:
            raise GptqError(f"{source}: AWQ without zero points (zero_point false) is not supported")
        return cls(bits, group, False, False, "awq", "awq")

    @classmethod
    def from_file(cls, path: Path) -> "GptqConfig | None":
        """From config.json's quantization_config, or (older AutoGPTQ checkpoints, which keep it
        there only) a quantize_config.json beside it."""
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # ModelConfig.from_file has already reported an unreadable config
        if not isinstance(d, dict):
            return None
        legacy = path.parent / "quantize_config.json"
        if d.get("quantization_config") is None and legacy.is_file():
            try:
                q = json.loads(legacy.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise GptqError(f"{legacy}: not valid JSON") from None
            if not isinstance(q, dict):
                raise GptqError(f"{legacy}: expected a JSON object")
            return cls.from_hf_dict({"quantization_config": {"quant_method": "gptq", **q}}, str(legacy))
        return cls.from_hf_dict(d, str(path))

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "desc_act": self.desc_act,
                "checkpoint_format": self.checkpoint_format}


def base_of(weight_name: str) -> str:
    """'...q_proj.weight' -> '...q_proj'."""
    return weight_name[: -len(".weight")]


@dataclass(frozen=True)
class Sources:
    """The GPTQ linears an export parameter is made of, in its row order."""
    bases: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (N, K) of each
    interleave_pairs: bool  # gate/up rows alternating (ONNX Runtime's fused SwiGLU)


def sources(ckpt: "Checkpoint", name: str, interleaved: bool) -> Sources | None:
    """For export parameter `name` (exporter/weights.py names): the GPTQ linears behind it, None
    when it is float; a one-line error when only some of them are quantized."""
    c = ckpt.config
    m = EXPERTS_PARAM.match(name)
    if m:
        p = f"model.layers.{m.group(1)}.mlp.experts."
        I, H = c.moe_intermediate_size, c.hidden_size
        if m.group(2) == "down":
            pairs = [(f"{p}{e}.down_proj", (H, I)) for e in range(c.num_experts)]
        else:
            pairs = [(f"{p}{e}.{w}_proj", (I, H)) for e in range(c.num_experts) for w in ("gate", "up")]
        inter = interleaved and m.group(2) == "gate_up"
    elif SHARED_PARAM.match(name):
        p = name[: -len("gate_up")]
        Is, H = c.shared_expert_intermediate_size, c.hidden_size
        pairs, inter = [(f"{p}gate_proj", (Is, H)), (f"{p}up_proj", (Is, H))], False
    elif name.endswith(".weight"):
        shape = ckpt.expected_shapes().get(name)
        if shape is None or len(shape) != 2:
            return None
        pairs, inter = [(base_of(name), (shape[0], shape[1]))], False
    else:
        return None
    quantized = [ckpt.is_gptq(f"{b}.weight") for b, _ in pairs]
    if not any(quantized):
        return None
    if not all(quantized):
        raise GptqError(f"{ckpt.dir}: {name} mixes GPTQ and float layers ({pairs[quantized.index(False)][0]} is "
                        "float); ONNX Runtime's fused ops take one or the other")
    return Sources(tuple(b for b, _ in pairs), tuple(s for _, s in pairs), inter)


def expected_shapes(base: str, n: int, k: int, g: GptqConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors a GPTQ linear of N outputs and K inputs consists of: name -> (shape, safetensors
    dtype or "float": any of BF16/F16/F32)."""
    per = 32 // g.bits
    groups = -(-k // g.group_size)
    if g.method == "awq":
        return {f"{base}.qweight": ((k, -(-n // per)), "I32"), f"{base}.qzeros": ((groups, -(-n // per)), "I32"),
                f"{base}.scales": ((groups, n), "float")}
    return {f"{base}.qweight": ((-(-k // per), n), "I32"), f"{base}.qzeros": ((groups, -(-n // per)), "I32"),
            f"{base}.scales": ((groups, n), "float"), f"{base}.g_idx": ((k,), "I32")}


def _unpack_words(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, C] -> uint8 [R, C * 32/bits]: each word's values from the low bits up, along the
    last axis."""
    per = 32 // bits
    w = words.view(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    return ((w[..., None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8).reshape(*w.shape[:-1], -1)


def _unpack_awq(words: np.ndarray) -> np.ndarray:
    """AWQ int32 [R, C] -> uint8 [R, 8C] in natural column order."""
    vals = _unpack_words(np.ascontiguousarray(words), 4).reshape(words.shape[0], -1, 8)
    return vals[:, :, list(AWQ_UNORDER)].reshape(words.shape[0], -1)


@dataclass
class Unpacked:
    q: np.ndarray  # uint8 [N, K]
    zeros: np.ndarray  # int32 [N, G] (true zero points: v1's +1 applied)
    scales: np.ndarray  # float32 [N, G] (as stored, widened)


def unpack(ckpt: "Checkpoint", base: str, g: GptqConfig, n: int, k: int) -> Unpacked:
    """One GPTQ linear as integers per output row (see module docstring); one-line errors for
    act-order and zero points ONNX Runtime cannot hold."""
    def load(suffix: str) -> np.ndarray:
        t = ckpt.tensor(f"{base}.{suffix}")
        return (t.float() if t.is_floating_point() else t).numpy()

    qw = load("qweight")
    q = np.empty((n, k), np.uint8)  # [N, K]; unpacked a column block at a time, so a large head stays
    if g.method == "awq":  # words run along N, in AWQ's order
        step = UNPACK_COLUMNS // 8
        for c in range(0, qw.shape[1], step):
            q[c * 8:(c + step) * 8] = _unpack_awq(qw[:, c:c + step])[:, :n - c * 8].T
        zeros = _unpack_awq(load("qzeros"))[:, :n].T.astype(np.int32)
    else:  # words run along K; within tens of MB of temporaries
        for c in range(0, n, UNPACK_COLUMNS):
            q[c:c + UNPACK_COLUMNS] = _unpack_words(np.ascontiguousarray(qw[:, c:c + UNPACK_COLUMNS].T), g.bits)[:, :k]
        zeros = _unpack_words(load("qzeros"), g.bits)[:, :n].T.astype(np.int32) + g.zero_offset  # [N, G]
    groups = -(-k // g.group_size)
    scales = np.ascontiguousarray(load("scales").T)  # [N, G]
    g_idx = load("g_idx") if f"{base}.g_idx" in ckpt.tensors else None
    if g_idx is not None and not np.array_equal(g_idx, np.arange(k, dtype=np.int64) // g.group_size):
        raise GptqError(f"{ckpt.dir}: {base}.g_idx is not k // group_size: act-order (desc_act) GPTQ checkpoints "
                        "are not supported (ONNX Runtime's QMoE has no input permutation); use one quantized with "
                        "desc_act=false")
    top = 1 << g.bits
    if zeros.max(initial=0) >= top:
        raise GptqError(f"{ckpt.dir}: {base} has a zero point of {int(zeros.max())}, beyond {g.bits} bits (the GPTQ "
                        "v1 format's wrapped zero point); re-save it in checkpoint_format gptq_v2")
    if g.sym and not (zeros == top // 2).all():
        raise GptqError(f"{ckpt.dir}: {base}: quantization_config says sym=true but its zero points are not "
                        f"{top // 2}")
    assert zeros.shape == (n, groups) and scales.shape == (n, groups)
    return Unpacked(q, zeros, scales)


def pack_rows(u: Unpacked, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits / QMoE layout: (packed uint8 [N, nb * block * bits/8], scales [N, nb],
    packed zero points uint8 [N, ceil(nb * bits / 8)])."""
    n, k = u.q.shape
    nb = u.scales.shape[1]
    q = u.q
    if nb * block != k:  # a last partial block: padded (MatMulNBits ignores inputs past K)
        q = np.pad(q, ((0, 0), (0, nb * block - k)))
    z = u.zeros.astype(np.uint8)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
        if nb % 2:
            z = np.pad(z, ((0, 0), (0, 1)))
        z = z[:, 0::2] | (z[:, 1::2] << 4)
    return np.ascontiguousarray(q), u.scales, np.ascontiguousarray(z)


def rows(ckpt: "Checkpoint", src: Sources) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Packed (q, scales, zeros) of a parameter's linears in its row order: one after the other, or
    gate and up rows alternating per pair. One linear (one expert) in memory at a time."""
    g = ckpt.gptq
    assert g is not None
    bases, shapes = src.bases, src.shapes
    if src.interleave_pairs:
        for (a, b), (sa, sb) in zip(zip(bases[0::2], bases[1::2]), zip(shapes[0::2], shapes[1::2])):
            pa = pack_rows(unpack(ckpt, a, g, *sa), g.bits, g.group_size)
            pb = pack_rows(unpack(ckpt, b, g, *sb), g.bits, g.group_size)
            yield tuple(np.stack((x, y), axis=1).reshape(-1, x.shape[1]) for x, y in zip(pa, pb))  # type: ignore[misc]
        return
    for base, shape in zip(bases, shapes):
        yield pack_rows(unpack(ckpt, base, g, *shape), g.bits, g.group_size)


def dequantize(ckpt: "Checkpoint", base: str, g: GptqConfig, n: int, k: int,
               scale_dtype: type = np.float32) -> np.ndarray:
    """float32 [N, K] weights of one GPTQ linear, scales rounded to `scale_dtype` as an artifact
    computing in it holds them (for a reference model: `qmoe check`)."""
    u = unpack(ckpt, base, g, n, k)
    idx = np.arange(k) // g.group_size
    scales = u.scales.astype(scale_dtype).astype(np.float32)
    return (u.q.astype(np.float32) - u.zeros[:, idx]) * scales[:, idx]


def write_dequantized(ckpt: "Checkpoint", folder: Path, scale_dtype: type = np.float32) -> Path:
    """A float32 copy of a GPTQ checkpoint (the layers' dequantized weights, config without
    quantization_config) that transformers loads without a GPTQ kernel package; one shard per
    layer, so memory stays at one layer."""
    import torch
    from safetensors.torch import save_file

    g = ckpt.gptq
    assert g is not None
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ckpt.dir / "config.json").read_text(encoding="utf-8"))
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    shapes = ckpt.expected_shapes()
    by_shard: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = f"layers.{parts[2]}" if name.startswith("model.layers.") else "rest"
        by_shard.setdefault(key, []).append(name)
    weight_map = {}
    for i, (key, names) in enumerate(by_shard.items()):
        fname = f"model-{i + 1:05d}-of-{len(by_shard):05d}.safetensors"
        tensors = {}
        for name in names:
            if ckpt.is_gptq(name):
                n, k = shapes[name]
                tensors[name] = torch.from_numpy(dequantize(ckpt, base_of(name), g, n, k, scale_dtype))
            else:
                tensors[name] = ckpt.tensor(name).float().contiguous()
            weight_map[name] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    return folder
