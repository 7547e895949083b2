"""ONNX Runtime backend: CPU provider, or CUDA where onnxruntime-gpu is installed (same artifact).

The KV cache is one OrtValue per layer and K/V, [B, Hkv, capacity, D], bound both as
past_key_values.* and as present.* (GroupQueryAttention's shared-buffer mode): each step writes
only the new rows in place, so a decode step never copies or reallocates the cache.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..manifest import Manifest
from . import BackendError

_NP = {"float32": np.float32, "float16": np.float16}


@dataclass
class OrtCache:
    batch: int
    capacity: int
    values: list  # OrtValue per past/present pair, in manifest order
    cos: object = None
    sin: object = None


def _host_view(value, dtype) -> np.ndarray:
    """A numpy view (no copy) of a CPU OrtValue's buffer; writes go into the OrtValue."""
    shape = tuple(value.shape())
    count = int(np.prod(shape))
    buffer = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(value.data_ptr())
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, artifact: Path, manifest: Manifest, device: str = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        if manifest.target != "onnxruntime":
            raise BackendError(f"{artifact}: exported for {manifest.target!r}; ONNX Runtime needs --target onnxruntime")
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendError("device 'cuda' needs onnxruntime-gpu (pip install onnxruntime-gpu) and a CUDA GPU")
        use_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        self.device = "cuda" if use_cuda else "cpu"
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(artifact / manifest.model_file), opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"{artifact}: ONNX Runtime cannot load the model: {str(e).splitlines()[0]}") from None
        self.ort = ort
        self.manifest = manifest
        self.config = manifest.config
        if manifest.compute_dtype not in _NP:
            raise BackendError(f"{artifact}: compute dtype {manifest.compute_dtype} is not one ONNX Runtime artifacts use")
        self.dtype = _NP[manifest.compute_dtype]
        self._check_graph(artifact)
        self.kv_names = [(i, o) for i, o in zip(manifest.inputs[7:], manifest.outputs[1:])]

    def _check_graph(self, artifact: Path) -> None:
        """The graph's inputs are the ones qmoe.json names, with its KV heads, head size and dtype (a
        manifest edited or copied from another export would otherwise fail inside a step)."""
        c, got = self.config, {i.name: i for i in self.session.get_inputs()}
        onnx_type = {np.float32: "tensor(float)", np.float16: "tensor(float16)"}[self.dtype]
        expected = {"cos_cache": ([None, c.head_dim // 2], onnx_type)}
        for L in range(c.num_hidden_layers):
            for kv in ("key", "value"):
                expected[f"past_key_values.{L}.{kv}"] = ([None, c.num_key_value_heads, None, c.head_dim], onnx_type)
        for name in self.manifest.inputs:
            if name not in got:
                raise BackendError(f"{artifact}: the graph has no input {name!r}, which qmoe.json lists; re-export")
        for name, (dims, type_) in expected.items():
            shape = list(got[name].shape)
            if got[name].type != type_ or len(shape) != len(dims) or any(
                    d is not None and s != d for s, d in zip(shape, dims)):
                raise BackendError(f"{artifact}: graph input {name} is {got[name].type} {shape}, but qmoe.json "
                                   f"describes {type_} {['*' if d is None else d for d in dims]}; re-export")

    def new_cache(self, batch: int, capacity: int) -> OrtCache:
        c = self.config
        shape = (batch, c.num_key_value_heads, capacity, c.head_dim)
        values = [self.ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
                  for _ in self.kv_names]
        return OrtCache(batch, capacity, values)

    @property
    def can_copy_rows(self) -> bool:
        """copy_rows works on host memory; a CUDA cache would need a device copy ONNX Runtime's
        Python API does not offer, so there the scheduler recomputes shared prefixes instead."""
        return self.device == "cpu"

    def copy_rows(self, cache: OrtCache, src: int, dst: int, rows: int) -> None:
        """K/V rows [0, rows) of sequence `src` into sequence `dst`, every layer (prefix sharing)."""
        if not self.can_copy_rows:
            raise BackendError("copy_rows needs the CPU provider")
        if not (0 <= src < cache.batch and 0 <= dst < cache.batch and 0 <= rows <= cache.capacity):
            raise BackendError(f"copy_rows({src}, {dst}, {rows}) outside a cache of batch {cache.batch}, "
                               f"capacity {cache.capacity}")
        for value in cache.values:
            kv = _host_view(value, self.dtype)
            kv[dst, :, :rows] = kv[src, :, :rows]

    def reorder_rows(self, cache: OrtCache, parents: np.ndarray, rows: int) -> None:
        """Sequence i's K/V rows [0, rows) become those of sequence parents[i], every layer (beam
        search: beams follow the beams they forked from)."""
        if not self.can_copy_rows:
            raise BackendError("reorder_rows needs the CPU provider")
        parents = np.asarray(parents, np.int64)
        if len(parents) > cache.batch or not ((0 <= parents) & (parents < cache.batch)).all() \
                or not 0 <= rows <= cache.capacity:
            raise BackendError(f"reorder_rows({parents.tolist()}, {rows}) outside a cache of batch {cache.batch}, "
                               f"capacity {cache.capacity}")
        for value in cache.values:
            kv = _host_view(value, self.dtype)
            kv[: len(parents), :, :rows] = kv[parents, :, :rows]  # the right side is gathered first

    def bind_rope(self, cache: OrtCache, cos: np.ndarray, sin: np.ndarray) -> None:
        cache.cos = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(cos, self.dtype), self.device, 0)
        cache.sin = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(sin, self.dtype), self.device, 0)

    def step(self, cache: OrtCache, input_ids: np.ndarray, query_seqlens: np.ndarray, seqlens_k: np.ndarray,
             logits_indices: np.ndarray) -> np.ndarray:
        """One prefill chunk or decode step. input_ids [B, S] right-padded; query_seqlens [B] valid
        rows (0 = idle entry); seqlens_k [B] cache length after the step minus one."""
        b = self.session.io_binding()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        b.bind_cpu_input("query_seqlens", np.ascontiguousarray(query_seqlens, np.int32))
        b.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens_k, np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(cache.capacity, np.int32))
        b.bind_ortvalue_input("cos_cache", cache.cos)
        b.bind_ortvalue_input("sin_cache", cache.sin)
        b.bind_cpu_input("logits_indices", np.ascontiguousarray(logits_indices, np.int64))
        b.bind_output("logits", "cpu")  # first: get_outputs() follows binding order
        for (past, present), value in zip(self.kv_names, cache.values):
            b.bind_ortvalue_input(past, value)
            b.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()
