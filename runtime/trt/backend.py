"""TensorRT backend: runs ARTIFACT/model.engine (made by `qmoe build`) with the backend protocol of
runtime/backends (new_cache, bind_rope, step), through cuda-python; no torch.

    load:     [record in qmoe.json vs running TensorRT version + GPU compute capability]
              -> [plugin library: sha256 as built, loaded into the registry] -> [engine (mmap)]
              -> [one execution context, one stream]
    request:  new_cache -> one device block: KV buffers + every input/output buffer, zeroed once
    step:     [profile by S: decode (S=1) or prefill] -> [inputs H2D] -> [shapes + addresses by
              name] -> [execute_async_v3] -> [logits D2H] -> [sync] -> [swap KV buffers]

KV cache. ONNX Runtime's GroupQueryAttention writes the new rows into the buffer bound to both
past_* and present_*. The tensorrt graph writes them with ScatterND, whose output is a new tensor:
TensorRT documents aliasing of an output with an input only for IKVCacheUpdateLayer and aliased
plugin I/O (reported by ICudaEngine.get_aliased_input_tensor), not for ScatterND. Binding one
buffer to both could let a kernel read rows it has already overwritten, so:
  - the engine reports present.* aliased to past.*  -> one buffer per layer and K/V, both bound;
  - otherwise (this graph today)                     -> two buffers per layer and K/V, swapped each
    step: present of step n is past of step n+1. Twice the KV memory; no extra traffic, since
    ScatterND copies the cache into its output either way.
Both buffers start zeroed: the attention reads the whole capacity (masked), and 0 * NaN from
uninitialised rows would poison the weighted sum.
"""

from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import manifest as mf
from ..backends import BackendError
from . import ENGINE_FILE, PLUGIN_FILE, RECORD_KEY, import_tensorrt
from .build import DECODE, choose_profile, dims, load_plugins, sha256

if TYPE_CHECKING:
    import tensorrt as trt

    from .device import Stream

# TensorRT DataType name -> numpy dtype of the host-side values (bf16 travels as uint16 bits).
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT32": np.int32, "INT64": np.int64,
         "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


# --- pure: what was built vs what runs -------------------------------------------------------

def engine_record(artifact: Path, m: mf.Manifest) -> dict[str, Any]:
    """The build record of an artifact whose engine can be opened, or a one-line error."""
    if m.target != "tensorrt":
        raise BackendError(f"{artifact}: exported for {m.target!r}; the TensorRT backend needs an artifact made "
                           "with `qmoe export ... --target tensorrt` and `qmoe build`")
    rec = m.extra.get(RECORD_KEY)
    engine = artifact / (rec.get("engine_file", ENGINE_FILE) if isinstance(rec, dict) else ENGINE_FILE)
    if not isinstance(rec, dict) or not engine.is_file():
        raise BackendError(f"{artifact}: no TensorRT engine; build one with `qmoe build {artifact} --plugin-lib PATH`")
    if engine.stat().st_size != rec.get("engine_bytes", engine.stat().st_size) or engine.stat().st_size == 0:
        raise BackendError(f"{engine}: not the engine qmoe.json records (an interrupted build?); rebuild it with "
                           f"`qmoe build {artifact} --plugin-lib PATH`")
    return rec


def _release(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:3])


def check_runtime(rec: dict[str, Any], trt_version: str, compute_capability: str, artifact: Path) -> None:
    """Engines are specific to the TensorRT release and the GPU architecture they were built on."""
    built = rec.get("tensorrt_version", "?")
    if _release(built) != _release(trt_version):
        raise BackendError(f"{artifact}: engine built with TensorRT {built}, this is TensorRT {trt_version}; "
                           f"rebuild it with `qmoe build {artifact}` or install TensorRT {'.'.join(_release(built))}")
    cc = rec.get("compute_capability", "?")
    if cc != compute_capability:
        raise BackendError(f"{artifact}: engine built for compute capability {cc} ({rec.get('device_name', '?')}), "
                           f"this GPU is {compute_capability}; rebuild it on this GPU with `qmoe build {artifact}`")


def check_plugin(artifact: Path, rec: dict[str, Any]) -> Path:
    """The plugin library copied beside the engine, unchanged since the build."""
    info = rec.get("plugin_library") or {}
    path = artifact / info.get("file", PLUGIN_FILE)
    if not path.is_file():
        raise BackendError(f"{path}: plugin library missing; rebuild with `qmoe build {artifact} --plugin-lib PATH`")
    if info.get("sha256") and sha256(path) != info["sha256"]:
        raise BackendError(f"{path}: plugin library differs from the one the engine was built with "
                           f"(sha256 recorded in qmoe.json); rebuild with `qmoe build {artifact} --plugin-lib PATH`")
    return path


def to_engine_dtype(a: np.ndarray, dtype_name: str) -> np.ndarray:
    """Host values as the engine's input type; bf16 as round-to-nearest-even uint16 bits."""
    if dtype_name == "BF16":
        x = np.ascontiguousarray(a, np.float32).view(np.uint32)
        return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(a, NUMPY[dtype_name])


def from_engine_dtype(a: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def cache_layout(sizes: dict[str, int], align: int = 256) -> tuple[dict[str, int], int]:
    """Byte offsets of named buffers packed in one allocation, each aligned; and the total."""
    offsets, at = {}, 0
    for name, n in sizes.items():
        offsets[name] = at
        at += -(-max(n, 1) // align) * align
    return offsets, at


# --- the backend -----------------------------------------------------------------------------

@dataclass(eq=False)
class TrtCache:
    batch: int
    capacity: int
    ptr: dict[str, int]  # input/output name -> device address (KV: past_* names, second set under "~"+name)
    swapped: bool = False  # ping-pong: past_* reads the "~" set when True
    host: dict[str, np.ndarray] = field(default_factory=dict)  # host-located (shape) inputs, kept alive
    allocations: list[int] = field(default_factory=list)  # freed by the finalizer
    logits_rows: int = 1  # logit rows the "logits" buffer holds per sequence


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, artifact: Path, manifest: mf.Manifest, device: str = "auto") -> None:
        if device == "cpu":
            raise BackendError("TensorRT runs on CUDA GPUs only; use --backend onnxruntime for --device cpu")
        artifact = Path(artifact)
        rec = engine_record(artifact, manifest)
        import_tensorrt()
        import tensorrt as trt

        from .device import Stream, current_device

        cc, _ = current_device()
        check_runtime(rec, trt.__version__, cc, artifact)
        plugin = check_plugin(artifact, rec)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        load_plugins(self.runtime.get_plugin_registry(), plugin, BackendError)
        self.engine, self._plan = _deserialize(self.runtime, artifact / rec.get("engine_file", ENGINE_FILE))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{artifact}: TensorRT cannot create an execution context (GPU memory?)")
        self.stream: Stream = Stream()
        self.profile = DECODE  # a new context starts on profile 0
        self.manifest, self.config = manifest, manifest.config
        self._describe_io(artifact)

    def _describe_io(self, artifact: Path) -> None:
        import tensorrt as trt

        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.dtype = {n: e.get_tensor_dtype(n).name for n in names}
        self.inputs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.on_host = {n for n in self.inputs if e.get_tensor_location(n) == trt.TensorLocation.HOST}
        self.dynamic = {n for n in self.inputs if any(d < 0 for d in dims(e.get_tensor_shape(n)))}
        missing = [n for n in self.manifest.outputs if n not in names]
        unknown = [n for n in self.inputs if n not in self.manifest.inputs]
        if missing or unknown:
            raise BackendError(f"{artifact}: engine I/O does not match qmoe.json (missing outputs {missing}, "
                               f"unknown inputs {unknown}); rebuild with `qmoe build {artifact}`")
        n = self.config.num_hidden_layers
        self.kv = list(zip(self.manifest.inputs[7:7 + 2 * n], self.manifest.outputs[1:1 + 2 * n]))
        aliased = getattr(e, "get_aliased_input_tensor", None)  # TensorRT >= 10.15
        self.aliased = aliased is not None and all(aliased(present) == past for past, present in self.kv)
        # Limits of the engine itself (the manifest only repeats them): cache capacity and batch.
        kv0 = self.kv[0][0]
        shapes = [[dims(s) for s in e.get_tensor_profile_shape(kv0, p)] for p in range(e.num_optimization_profiles)]
        self.max_batch = min(s[2][0] for s in shapes)
        self.max_capacity = min(s[2][2] for s in shapes)
        self.max_chunk = max(dims(e.get_tensor_profile_shape("input_ids", p)[2])[1]
                             for p in range(e.num_optimization_profiles))

    # --- protocol ----------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int) -> TrtCache:
        if batch > self.max_batch:
            raise BackendError(f"batch {batch} exceeds the engine's max batch {self.max_batch}; "
                               "rebuild with a larger `qmoe build --max-batch`")
        if capacity > self.max_capacity:
            raise BackendError(f"prompt + max new tokens = {capacity - 1} exceeds the engine's max context "
                               f"{self.max_capacity - 1}; rebuild with a larger `qmoe build --max-context`")
        c = self.config
        kv_bytes = batch * c.num_key_value_heads * capacity * c.head_dim * _itemsize(self.dtype[self.kv[0][0]])
        sizes = {"input_ids": batch * capacity, "query_seqlens": batch, "seqlens_k": batch,
                 "total_sequence_length": 1, "cos_cache": capacity * c.head_dim // 2,
                 "sin_cache": capacity * c.head_dim // 2, "logits_indices": batch * capacity,
                 "logits": batch * c.vocab_size}
        nbytes = {k: v * _itemsize(self.dtype[k]) for k, v in sizes.items() if k in self.dtype and k not in self.on_host}
        for past, _ in self.kv:
            nbytes[past] = kv_bytes
            if not self.aliased:
                nbytes["~" + past] = kv_bytes
        offsets, total = cache_layout(nbytes)
        from .device import free_all, malloc

        base = malloc(total)
        cache = TrtCache(batch, capacity, {k: base + off for k, off in offsets.items()}, allocations=[base])
        weakref.finalize(cache, free_all, cache.allocations)
        self.stream.zero(base, total)
        for name in self.on_host:  # shape inputs live on the host; only total_sequence_length could be one
            cache.host[name] = np.zeros((), NUMPY[self.dtype[name]])
        return cache

    def bind_rope(self, cache: TrtCache, cos: np.ndarray, sin: np.ndarray) -> None:
        """Rows [0, capacity) of the tables: every position a step can touch (idle rows write at
        their length, at most capacity - 1), and P = C, as the profiles expect."""
        if len(cos) < cache.capacity:
            raise BackendError(f"rope tables cover {len(cos)} positions, the cache needs {cache.capacity}")
        for name, table in (("cos_cache", cos), ("sin_cache", sin)):
            self.stream.upload(cache.ptr[name], to_engine_dtype(table[: cache.capacity], self.dtype[name]))

    def step(self, cache: TrtCache, input_ids: np.ndarray, query_seqlens: np.ndarray, seqlens_k: np.ndarray,
             logits_indices: np.ndarray) -> np.ndarray:
        """One prefill chunk or decode step (see OnnxRuntimeBackend.step); logits [B, N, V] float32."""
        B, S = input_ids.shape
        N = logits_indices.shape[1]
        if S > self.max_chunk:
            raise BackendError(f"a prefill chunk of {S} tokens exceeds the engine's {self.max_chunk}; load with "
                               f"prefill_chunk <= {self.max_chunk} or rebuild with a larger `qmoe build --max-prefill`")
        if B != cache.batch or S > cache.capacity or N > S:
            raise BackendError(f"step of shape B={B} S={S} N={N} does not fit a cache of batch {cache.batch}, "
                               f"capacity {cache.capacity}")
        profile = choose_profile(S, N)
        if profile != self.profile:
            if not self.context.set_optimization_profile_async(profile, self.stream.handle):
                raise BackendError(f"TensorRT cannot switch to optimisation profile {profile}")
            self.profile = profile
        self._ensure_logits(cache, N)
        c = self.config
        values = {"input_ids": input_ids, "query_seqlens": query_seqlens, "seqlens_k": seqlens_k,
                  "total_sequence_length": np.array(cache.capacity), "logits_indices": logits_indices}
        shapes = {"input_ids": (B, S), "query_seqlens": (B,), "seqlens_k": (B,), "total_sequence_length": (),
                  "cos_cache": (cache.capacity, c.head_dim // 2), "sin_cache": (cache.capacity, c.head_dim // 2),
                  "logits_indices": (B, N)}
        kv_shape = (B, c.num_key_value_heads, cache.capacity, c.head_dim)
        for name, value in values.items():
            if name in self.on_host:
                cache.host[name][...] = value
            elif name in self.dtype:
                self.stream.upload(cache.ptr[name], to_engine_dtype(value, self.dtype[name]))
        addresses = {n: cache.host[n].ctypes.data if n in self.on_host else cache.ptr[n] for n in shapes if n in self.dtype}
        for past, present in self.kv:
            shapes[past] = kv_shape
            read, write = (("~" + past, past) if cache.swapped else (past, "~" + past))
            addresses[past] = cache.ptr[read]
            addresses[present] = cache.ptr[past if self.aliased else write]
        addresses["logits"] = cache.ptr["logits"]
        for name in self.inputs:
            if name in self.dynamic and not self.context.set_input_shape(name, shapes[name]):
                raise BackendError(f"TensorRT rejects shape {shapes[name]} for {name} in profile {profile}")
        for name, address in addresses.items():
            if not self.context.set_tensor_address(name, address):
                raise BackendError(f"TensorRT rejects the address of {name}")
        if not self.context.execute_async_v3(self.stream.handle):
            raise BackendError("TensorRT execution failed (see the log above)")
        logits_dtype = self.dtype["logits"]
        out = np.empty((B, N, c.vocab_size), NUMPY[logits_dtype])
        self.stream.download(out, cache.ptr["logits"])
        self.stream.synchronize()
        if not self.aliased:
            cache.swapped = not cache.swapped
        return from_engine_dtype(out, logits_dtype)

    def _ensure_logits(self, cache: TrtCache, rows: int) -> None:
        """The cache's logits buffer holds one row per sequence (generation); a step asking for
        more (a full-sequence check) gets a larger one, kept for the cache's lifetime."""
        if rows <= cache.logits_rows:
            return
        from .device import malloc

        ptr = malloc(cache.batch * rows * self.config.vocab_size * _itemsize(self.dtype["logits"]))
        cache.allocations.append(ptr)
        cache.ptr["logits"], cache.logits_rows = ptr, rows


def _itemsize(dtype_name: str) -> int:
    return np.dtype(NUMPY[dtype_name]).itemsize


def _deserialize(runtime: trt.Runtime, path: Path) -> tuple[trt.ICudaEngine, mmap.mmap]:
    """From a read-only mmap: the engine file (as large as the weights) is paged in by the OS,
    never copied into a Python bytes object. The map stays open with the engine: TensorRT does
    not promise to be done with the plan's memory once deserialised."""
    with open(path, "rb") as f:
        plan = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BackendError(f"{path}: TensorRT cannot deserialise the engine (see the log above); rebuild it with "
                           f"`qmoe build {path.parent}`")
    return engine, plan
