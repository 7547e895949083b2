"""Checkpoint folder -> artifact folder (model.onnx + external weights + qmoe.json + tokenizer).

    [Checkpoint headers] -> [trace on the meta device] -> [name nodes by module path]
        -> [stream weights: one piece at a time into model.onnx.data, or point at linked shards]
        -> [model.onnx + manifest + tokenizer, written atomically]

Peak memory is the traced graph plus one weight piece (<= one expert or 64 MB), whatever the
checkpoint size; no initializer is ever inlined into the protobuf, so >2 GB models are fine.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from runtime import contract
from runtime import manifest as mf
from runtime.config import ModelConfig
from runtime.errors import QmoeError

from .atomic import atomic_dir, output_path
from .checkpoint import Checkpoint

TARGETS = ("onnxruntime", "tensorrt")
DTYPES = ("float32", "float16", "bfloat16")
DATA_FILE = "model.onnx.data"
ALIGN = 4096  # page-aligned offsets let ONNX Runtime mmap external data
IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; ONNX Runtime reads up to IR 11
OPSET = 18
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json",
                   "special_tokens_map.json", "config.json")
# Names in an artifact that a linked shard must not take.
RESERVED_NAMES = frozenset({DATA_FILE, "model.onnx", mf.NAME, *TOKENIZER_FILES})


class ExportError(QmoeError, ValueError):
    pass


DEFAULT_DTYPE = {"onnxruntime": "float32", "tensorrt": "float16"}


def dtypes_for(target: str, dtype: str) -> tuple[str, str]:
    """(weight dtype, compute dtype). ONNX Runtime's CPU provider has no bf16 kernels: a bf16
    artifact stores bf16 weights and computes in fp32 (Cast nodes ORT folds at load). The
    routed-experts plugin is bf16/fp16 only (contract), so the tensorrt target is too."""
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if target == "tensorrt" and dtype == "float32":
        raise ExportError("the tensorrt target runs the routed experts in float16 or bfloat16 (QmoeRoutedExperts "
                          "plugin); use --dtype float16 or --dtype bfloat16")
    if target == "onnxruntime" and dtype == "bfloat16":
        return "bfloat16", "float32"
    return dtype, dtype


# The tensorrt target's default gate/up row layout (the QmoeRoutedExperts plugin's gate_up_block
# field), where both intermediate sizes allow it; else 0 (gate rows then up rows). Every kernel path
# reads any layout; with 128 the Hopper grouped GEMM does SwiGLU in its epilogue instead of in a pass
# of its own (plugins/README.md). 0 until that path has run on a GPU (plugins/results/NOTES.md,
# "Predictions written before run 6, stop 22"); `qmoe export --gate-up-block 128` asks for it.
TRT_GATE_UP_BLOCK = 0


def gate_up_block_for(c: ModelConfig, target: str, requested: int | None) -> int:
    """The gate/up row layout to export: `requested`, checked, or the target's default."""
    inter, shared = c.moe_intermediate_size, c.shared_expert_intermediate_size
    if requested is not None and (type(requested) is not int):
        raise ExportError(f"gate_up_block must be an integer, got {requested!r}")
    if target != "tensorrt":
        if requested:
            raise ExportError("gate_up_block is a layout of the tensorrt target's QmoeRoutedExperts plugin")
        return 0
    if requested is None:
        b = TRT_GATE_UP_BLOCK
        return b if b and inter % b == 0 and shared % b == 0 else 0
    if requested < 0 or requested % 8 or (requested and (inter % requested or shared % requested)):
        raise ExportError(f"gate_up_block {requested}: need 0 or a multiple of 8 that divides moe_intermediate_size "
                          f"{inter} and shared_expert_intermediate_size {shared}")
    return requested


def export(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    *,
    target: str = "onnxruntime",
    dtype: str | None = None,
    force: bool = False,
    link_weights: bool = False,
    quantize: str | None = None,
    quant_block_size: int | None = None,
    quant_activations: str | None = None,
    lora: Sequence[str | Path] = (),
    progress: Callable[[int, int], None] | None = None,
    gate_up_block: int | None = None,
) -> Path:
    """Exports a Qwen2-MoE checkpoint; returns the artifact folder. See module docstring.
    `dtype` None: float32 for onnxruntime, float16 for tensorrt. `quantize` "int4" / "int8":
    weight-only quantization (onnxruntime target; exporter/quantize.py). `lora`: PEFT LoRA adapter
    folders merged into the weights (exporter/lora.py). `gate_up_block` (tensorrt target): the
    QmoeRoutedExperts plugin's gate/up row layout; None: gate_up_block_for's choice."""
    import torch

    from .quantize import QuantConfig

    dtype = dtype or DEFAULT_DTYPE.get(target, "float32")

    weight_dtype, compute_dtype = dtypes_for(target, dtype)
    qc = None
    if quantize is not None:
        if target != "onnxruntime":
            raise ExportError(f"--quantize is for the onnxruntime target (ONNX Runtime's MatMulNBits/QMoE); the "
                              f"{target} target's plugin runs float16/bfloat16 weights")
        qc = QuantConfig.parse(quantize, quant_block_size, quant_activations)
    ckpt = Checkpoint(checkpoint_dir, lora=lora)
    if ckpt.gptq is not None:
        qc = _gptq_quant_config(ckpt, target, quantize, quant_block_size, quant_activations)
    elif quantize is None and (quant_block_size is not None or quant_activations is not None):
        raise ExportError("--quant-block-size and --quant-activations need --quantize")
    if target == "onnxruntime" and ckpt.config.head_dim % 16:
        raise ExportError(f"{ckpt.config.source}: head_dim {ckpt.config.head_dim} is not a multiple of 16, which "
                          "ONNX Runtime's GroupQueryAttention requires")
    output_dir = Path(output_dir)
    out = output_path(output_dir).resolve()
    sources = {ckpt.dir.resolve(), *(t.file.resolve() for t in ckpt.tensors.values())}  # shards may live elsewhere
    sources.update(p for a in (ckpt.lora.items if ckpt.lora else ()) for p in (a.dir.resolve(), a.file.resolve()))
    if any(out == src or out in src.parents for src in sources):  # replacing it would delete the checkpoint
        raise ExportError(f"{output_dir}: the artifact folder must not be the checkpoint folder or contain it "
                          "or its shards, or a LoRA adapter")
    interleaved = target == "onnxruntime"
    block = gate_up_block_for(ckpt.config, target, gate_up_block)
    t0 = time.perf_counter()
    model_ir = trace(ckpt.config, target, getattr(torch, weight_dtype), getattr(torch, compute_dtype), interleaved,
                     block)
    quantized = {}
    if qc is not None:
        from .quantize import rewrite

        quantized = rewrite(model_ir, qc, getattr(torch, compute_dtype), ckpt if ckpt.gptq is not None else None,
                            interleaved)
    with atomic_dir(output_dir, force=force) as tmp:
        write_weights(model_ir, ckpt, tmp, getattr(torch, weight_dtype), interleaved, link_weights, progress,
                      quantized, block)
        save_model(model_ir, tmp / "model.onnx")
        for name in TOKENIZER_FILES:
            if (ckpt.dir / name).is_file():
                shutil.copy2(ckpt.dir / name, tmp / name)
        mf.write(tmp, mf.Manifest.for_export(
            config=ckpt.config, target=target, dtype=dtype, weight_dtype=weight_dtype, compute_dtype=compute_dtype,
            opset=OPSET, source=str(ckpt.dir.absolute()), export_seconds=round(time.perf_counter() - t0, 2),
            linked_weights=link_weights, quantization=None if qc is None else qc.to_json(),
            lora=None if ckpt.lora is None else ckpt.lora.describe(),
            plugins={s.name: s.version for s in contract.PLUGINS} if target == "tensorrt" else None,
        ))
    ckpt.close()
    return output_dir


def _gptq_quant_config(ckpt: Checkpoint, target: str, quantize: str | None, block: int | None,
                       activations: str | None):
    """A GPTQ checkpoint's layers go into the artifact as they are (exporter/gptq.py); with
    `quantize`, the layers it keeps float (head, embeddings) are quantized round to nearest."""
    from dataclasses import replace

    from .quantize import QuantConfig

    g = ckpt.gptq
    assert g is not None
    if target != "onnxruntime":
        raise ExportError(f"{ckpt.dir}: {g.label} checkpoints export for the onnxruntime target (ONNX Runtime's "
                          f"MatMulNBits/QMoE); the {target} target's plugin runs float16/bfloat16 weights")
    if quantize is None and block is not None:
        raise ExportError(f"{ckpt.dir} is already {g.label}-quantized ({g.bits}-bit, group size {g.group_size}), and its "
                          "quantized layers go into the artifact as they are; --quant-block-size applies with "
                          "--quantize, to the layers it keeps float (head, embeddings)")
    if g.bits == 8 and activations == "float":
        raise ExportError(f"{ckpt.dir} holds 8-bit GPTQ weights, which run with int8 activations (ONNX Runtime's "
                          "CPU kernels for 8-bit weights with float activations are ~30x slower than float32); "
                          "drop --quant-activations float")
    qc = QuantConfig.parse(f"int{g.bits}", g.group_size, activations)
    rest = None if quantize is None else QuantConfig.parse(quantize, block, activations)
    return replace(qc, method=g.method, symmetric=g.sym, rest=rest)


def example_inputs(c: ModelConfig, compute_dtype, B: int = 2, S: int = 5, C: int = 16, P: int = 64):
    import torch

    i32, i64 = torch.int32, torch.int64
    with torch.device("meta"):
        past = tuple(torch.zeros(B, c.num_key_value_heads, C, c.head_dim, dtype=compute_dtype)
                     for _ in range(2 * c.num_hidden_layers))
        return (torch.zeros(B, S, dtype=i64), torch.zeros(B, dtype=i32), torch.zeros(B, dtype=i32),
                torch.zeros((), dtype=i32), torch.zeros(P, c.head_dim // 2, dtype=compute_dtype),
                torch.zeros(P, c.head_dim // 2, dtype=compute_dtype), torch.zeros(B, 1, dtype=i64), *past)


def trace(c: ModelConfig, target: str, weight_dtype, compute_dtype, interleaved: bool, gate_up_block: int = 0):
    """The export model traced on the meta device: an onnx_ir Model whose initializers have no data."""
    import torch
    from torch.export import Dim

    from . import translations
    from .model import Qwen2MoeForExport

    with torch.device("meta"):
        model = Qwen2MoeForExport(c, weight_dtype, compute_dtype, interleaved_experts=interleaved,
                                  gate_up_block=gate_up_block)
    io = mf.io_names(c.num_hidden_layers)
    batch, seq, cap, pos, rows = Dim("batch"), Dim("sequence"), Dim("cache"), Dim("positions"), Dim("logit_rows")
    dynamic = ({0: batch, 1: seq}, {0: batch}, {0: batch}, None, {0: pos}, {0: pos}, {0: batch, 1: rows},
               tuple({0: batch, 2: cap} for _ in range(2 * c.num_hidden_layers)))
    import logging
    import warnings

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision notes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, example_inputs(c, compute_dtype), dynamo=True, optimize=False, input_names=io.inputs,
            output_names=io.outputs, dynamic_shapes=dynamic, opset_version=OPSET,
            custom_translation_table=translations.table(target), report=False, verbose=False,
        )
    model_ir = program.model
    _name_nodes(model_ir)
    return model_ir


def _name_nodes(model_ir) -> None:
    """onnxruntime-genai style names (/model/layers.0/self_attn/q_proj/Gemm): graphs are readable in
    Netron and profiles. Drops the exporter's bulky per-node metadata (stack traces)."""
    import ast

    seen: dict[str, int] = {}
    for node in model_ir.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        # name_scopes: cumulative module paths, then the fx node's own name (dropped)
        parts = [p for p in ast.literal_eval(scopes)[:-1] if p and not p.startswith("_")] if scopes else []
        path = parts[-1].replace(".", "/") if parts else ""
        base = f"/{path}/{node.op_type}" if path else f"/{node.op_type}"
        n = seen.get(base, 0)
        seen[base] = n + 1
        node.name = base if n == 0 else f"{base}_{n}"
        node.metadata_props.clear()


def write_weights(model_ir, ckpt: Checkpoint, folder: Path, weight_dtype, interleaved: bool, link: bool,
                  progress: Callable[[int, int], None] | None, quantized: dict | None = None,
                  gate_up_block: int = 0) -> None:
    """Points every parameter initializer at its bytes in `folder` (written here, or in a
    hard-linked checkpoint shard when `link` and nothing needs converting). `quantized`
    (quantize.rewrite's result): packed weights and scales, quantized piece by piece. Gate/up rows
    as weights.pieces() writes them for `interleaved` and `gate_up_block`."""
    import onnx_ir as ir
    import torch

    from .weights import direct_source, pieces

    quantized = quantized or {}
    qnames = {n for t in quantized.values() for n in (t.qname, t.sname, t.zname) if n is not None}
    inits = model_ir.graph.initializers
    params = [v for name, v in inits.items() if _is_param(name) and name not in qnames]
    total = sum(v.const_value.nbytes for v in params) + sum(inits[n].const_value.nbytes for n in qnames)
    done = 0
    linked: dict[Path, str] = {}
    with open(folder / DATA_FILE, "wb") as out:
        for value in params:
            name, shape = value.name, tuple(value.const_value.shape.numpy())
            src = direct_source(ckpt, name) if link else None
            if src is not None and _same_dtype(src.dtype, weight_dtype):
                location = linked.get(src.file) or _link(src.file, folder, linked)
                value.const_value = ir.ExternalTensor(location, src.offset, src.nbytes, _ir_dtype(weight_dtype),
                                                      shape=ir.Shape(shape), name=name, base_dir=folder)
            else:
                offset, length = _append(out, (_raw_bytes(p.to(weight_dtype))
                                               for p in pieces(ckpt, name, interleaved, gate_up_block)))
                value.const_value = ir.ExternalTensor(DATA_FILE, offset, length, _ir_dtype(weight_dtype),
                                                      shape=ir.Shape(shape), name=name, base_dir=folder)
                expected = _numel(shape) * torch.tensor([], dtype=weight_dtype).element_size()
                if length != expected:
                    raise ExportError(f"internal error: {name} wrote {length} bytes, expected {expected}")
            done += value.const_value.nbytes
            if progress:
                progress(done, total)
        written: dict[tuple, list[tuple[int, int]]] = {}  # a tied head's bytes are its embeddings' bytes
        for t in quantized.values():
            key = (t.source, t.bits, t.block, t.scale_dtype, t.zname is not None)
            if key not in written:
                written[key] = _write_quantized(t, ckpt, out, interleaved, pieces)
            for name, (offset, length) in zip((t.qname, t.sname, t.zname), written[key]):
                v = inits[name]
                if length != v.const_value.nbytes:
                    raise ExportError(f"internal error: {name} wrote {length} bytes, expected {v.const_value.nbytes}")
                v.const_value = ir.ExternalTensor(DATA_FILE, offset, length, v.const_value.dtype,
                                                  shape=v.const_value.shape, name=name, base_dir=folder)
                done += length
            if progress:
                progress(done, total)
        empty = out.tell() == 0
    if empty:  # every tensor is in a linked shard
        (folder / DATA_FILE).unlink()


def _append(out, chunks) -> tuple[int, int]:
    """Writes `chunks` at the next page-aligned offset of `out`; (offset, length)."""
    out.write(b"\0" * (-out.tell() % ALIGN))
    offset = out.tell()
    for chunk in chunks:
        out.write(chunk)
    return offset, out.tell() - offset


def _write_quantized(t, ckpt: Checkpoint, out, interleaved: bool, pieces) -> list[tuple[int, int]]:
    """Streams parameter t.source through the quantizer (or, from a GPTQ checkpoint, its packed
    layers through the repacker): packed rows into `out` as they come, the scales (and zero points)
    through temporary files behind them; [(offset, length)] of each."""
    import tempfile

    import torch

    from .quantize import quantize_rows

    def quantized_pieces():
        if t.gptq is not None:
            from .gptq import rows

            for q, s, z in rows(ckpt, t.gptq):
                yield torch.from_numpy(q), torch.from_numpy(s), torch.from_numpy(z)
            return
        for piece in pieces(ckpt, t.source, interleaved):
            yield *quantize_rows(piece.reshape(-1, t.k), t.bits, t.block), None

    with tempfile.TemporaryFile(dir=Path(out.name).parent) as scales, \
            tempfile.TemporaryFile(dir=Path(out.name).parent) as zeros:
        def packed():
            for q, s, z in quantized_pieces():
                scales.write(_raw_bytes(s.to(t.scale_dtype)))
                if t.zname is not None:
                    zeros.write(_raw_bytes(z))
                yield _raw_bytes(q)

        regions = [_append(out, packed())]
        for f in (scales, zeros) if t.zname is not None else (scales,):
            f.seek(0)
            regions.append(_append(out, iter(lambda: f.read(16 << 20), b"")))  # noqa: B023 (called at once)
    return regions


def _is_param(name: str) -> bool:
    return name.startswith("model.") or name == "lm_head.weight"


def _link(src: Path, folder: Path, linked: dict[Path, str]) -> str:
    """Hard-links a shard into the artifact (ONNX Runtime only reads external data inside the
    model's folder; symlinks out of it are rejected). Copies across filesystems. Each shard gets a
    name of its own: shards of one name in different subfolders must not meet at one link (a copy
    onto an existing link would write into the first shard)."""
    name, n = src.name, 1
    while name in linked.values() or name in RESERVED_NAMES or (folder / name).exists():
        n += 1
        name = f"{src.stem}.{n}{src.suffix}"
    dest = folder / name
    try:
        os.link(src, dest)
    except OSError:
        with open(src, "rb") as fin, open(dest, "xb") as fout:  # "x": never through an existing file
            shutil.copyfileobj(fin, fout, 16 << 20)
    linked[src] = name
    return name


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _same_dtype(st_dtype: str, torch_dtype) -> bool:
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[st_dtype] == torch_dtype


def _ir_dtype(torch_dtype):
    import onnx_ir as ir
    import torch

    return {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
            torch.bfloat16: ir.DataType.BFLOAT16}[torch_dtype]


def _raw_bytes(t) -> bytes | memoryview:
    import torch

    if t.numel() == 0:  # e.g. a shared expert of intermediate size 0: memoryview cannot cast those
        return b""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    t = t.contiguous()
    return memoryview(t.numpy()).cast("B")


def save_model(model_ir, path: Path) -> None:
    """Serialises the graph; external tensors stay references (never inlined)."""
    import onnx
    import onnx_ir as ir

    model_ir.ir_version = IR_VERSION
    proto = ir.serde.serialize_model(model_ir)
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL and init.ByteSize() > 1 << 20:
            raise ExportError(f"internal error: initializer {init.name} would be inlined into the protobuf")
    onnx.save_model(proto, str(path))
