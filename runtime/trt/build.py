"""`qmoe build`: a tensorrt-target artifact's model.onnx -> model.engine next to it.

    [check manifest + limits] -> [load the plugin library] -> [parse model.onnx from its path
        (external weights resolve beside it)] -> [profiles: 0 decode (S=1), 1 prefill]
        -> [typing: strong; TF32 off for fp32] -> [timing cache in] -> [build, with progress]
        -> [timing cache out] -> [engine + plugin copy under temp names, renamed]
        -> [qmoe.json extra.tensorrt: versions, GPU, profiles, plugin sha256, build time]

The pure parts (profiles, typing plan, the manifest record) need no TensorRT and are unit-tested;
the TensorRT calls are a thin layer type-checked against tensorrt-stubs (scripts/typecheck.sh).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from .. import manifest as mf
from ..manifest import sha256  # noqa: F401 (the plugin library's hash; re-exported for the backend)
from ..config import ModelConfig
from ..contract import PLUGINS
from . import ENGINE_FILE, PLUGIN_FILE, RECORD_KEY, TensorRTError, import_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

DECODE, PREFILL = 0, 1
PROFILE_NAMES = ("decode", "prefill")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_MAX_PREFILL = 2048  # = runtime.engine's default prefill_chunk
DEFAULT_OPT_PREFILL = 512  # tokens per prompt the prefill kernels are tuned for
PLUGIN_ENV = "QMOE_TRT_PLUGIN_LIB"
TIMING_CACHE_FILE = "timing.cache"
Progress = Callable[[str], None]


class BuildError(TensorRTError, ValueError):
    pass


# --- pure: profiles, typing, record ----------------------------------------------------------

def profiles(config: ModelConfig, max_batch: int, max_context: int, opt_batch: int | None = None,
             opt_context: int | None = None, max_prefill: int | None = None,
             opt_prefill: int | None = None) -> list[Profile]:
    """Optimisation profiles [decode, prefill] over the graph's dynamic inputs.

    B batch, S new tokens per row, N logit rows, C cache capacity (runtime: prompt + new tokens
    + 1 spare row), P rope positions (the backend binds exactly C rows of the tables, so P = C).
    A request fits when B <= max_batch and prompt + new tokens <= max_context. Decode is S = N = 1;
    prefill covers S, N up to max_prefill: the engine feeds long prompts in chunks (its
    prefill_chunk, 2048 by default), and the attention scratch TensorRT reserves grows with S x C.
    0-d inputs (total_sequence_length) need no profile."""
    if max_batch < 1:
        raise BuildError(f"max batch must be >= 1, got {max_batch}")
    if not 2 <= max_context <= config.max_context:
        raise BuildError(f"max context must be in [2, {config.max_context}] (the model's limit), got {max_context}")
    ob = max_batch if opt_batch is None else opt_batch
    if not 1 <= ob <= max_batch:
        raise BuildError(f"opt batch must be in [1, {max_batch}], got {ob}")
    oc = max(1, max_context // 2) if opt_context is None else opt_context
    if not 1 <= oc <= max_context:
        raise BuildError(f"opt context must be in [1, {max_context}], got {oc}")
    mp = min(DEFAULT_MAX_PREFILL, max_context) if max_prefill is None else max_prefill
    if not 1 <= mp <= max_context:
        raise BuildError(f"max prefill must be in [1, {max_context}] (the max context), got {mp}")
    os_ = min(DEFAULT_OPT_PREFILL, mp) if opt_prefill is None else opt_prefill
    if not 1 <= os_ <= mp:
        raise BuildError(f"opt prefill length must be in [1, {mp}], got {os_}")
    hkv, d = config.num_key_value_heads, config.head_dim
    cap = (1, oc + 1, max_context + 1)

    def one(seq: Shape, rows: Shape) -> Profile:
        b = (1, ob, max_batch)
        p: Profile = {
            "input_ids": _shapes(b, seq),
            "query_seqlens": _shapes(b),
            "seqlens_k": _shapes(b),
            "cos_cache": _shapes(cap, (d // 2,) * 3),
            "sin_cache": _shapes(cap, (d // 2,) * 3),
            "logits_indices": _shapes(b, rows),
        }
        kv = _shapes(b, (hkv,) * 3, cap, (d,) * 3)
        for name in mf.io_names(config.num_hidden_layers).inputs[7:]:
            p[name] = kv
        return p

    return [one((1, 1, 1), (1, 1, 1)), one((1, os_, mp), (1, 1, mp))]


def _shapes(*dims: Shape) -> tuple[Shape, Shape, Shape]:
    """Per-dimension (min, opt, max) triples -> (min shape, opt shape, max shape)."""
    return tuple(d[0] for d in dims), tuple(d[1] for d in dims), tuple(d[2] for d in dims)


def choose_profile(seq_len: int, logit_rows: int) -> int:
    """Decode kernels for one new token and one logit row per sequence, prefill otherwise."""
    return DECODE if seq_len == 1 and logit_rows == 1 else PREFILL


@dataclass(frozen=True)
class Typing:
    strongly_typed: bool
    precision_flag: str | None  # BuilderFlag name set on a weakly typed network (10.x only)
    allow_tf32: bool


def typing_plan(trt_version: str, compute_dtype: str, weak: bool = False) -> Typing:
    """How the network is typed. The exported graph carries explicit dtypes (fp16/bf16 compute
    with fp32 router softmax and attention softmax), so strong typing is the default on every
    version; TensorRT 11 has no other mode. `weak` (10.x only) lets TensorRT pick precisions
    with the FP16/BF16 builder flag instead. TF32 is off for fp32 artifacts so that they match
    ONNX Runtime and transformers to fp32 tolerances."""
    major = int(trt_version.split(".")[0])
    if weak and major >= 11:
        raise BuildError(f"TensorRT {trt_version} builds strongly typed networks only; drop --weak-typing")
    flag = {"float16": "FP16", "bfloat16": "BF16"}.get(compute_dtype) if weak else None
    return Typing(strongly_typed=not weak, precision_flag=flag, allow_tf32=compute_dtype != "float32")


def profiles_json(profs: list[Profile]) -> list[dict[str, Any]]:
    return [{"name": PROFILE_NAMES[i], "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                                                  for k, v in p.items()}} for i, p in enumerate(profs)]


def record(*, trt_version: str, compute_capability: str, device_name: str, profs: list[Profile],
           max_batch: int, max_context: int, max_prefill: int, typing: Typing, plugin_source: Path, plugin_sha256: str,
           engine_bytes: int, build_seconds: float, workspace_bytes: int | None) -> dict[str, Any]:
    """What `qmoe build` stores in the manifest's extra.tensorrt; the backend checks it at load."""
    return {
        "engine_file": ENGINE_FILE,
        "engine_bytes": engine_bytes,
        "tensorrt_version": trt_version,
        "compute_capability": compute_capability,
        "device_name": device_name,
        "max_batch": max_batch,
        "max_context": max_context,
        "max_prefill": max_prefill,
        "profiles": profiles_json(profs),
        "typing": "strong" if typing.strongly_typed else f"weak+{typing.precision_flag or 'fp32'}",
        "tf32": typing.allow_tf32,
        "plugin_library": {"file": PLUGIN_FILE, "source": str(plugin_source), "sha256": plugin_sha256},
        "workspace_bytes": workspace_bytes,
        "build_seconds": round(build_seconds, 1),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def with_record(m: mf.Manifest, rec: dict[str, Any]) -> mf.Manifest:
    return dataclasses.replace(m, extra={**m.extra, RECORD_KEY: rec})


def resolve_plugin_lib(path: str | Path | None) -> Path:
    """--plugin-lib, else $QMOE_TRT_PLUGIN_LIB: the tensorrt graph's QmoeRotary and
    QmoeRoutedExperts nodes are resolved to plugins, so the build cannot go without it."""
    p = path or os.environ.get(PLUGIN_ENV)
    if not p:
        raise BuildError(f"the tensorrt graph uses the qmoe plugins: pass --plugin-lib PATH (or set {PLUGIN_ENV}) "
                         "to libqmoe_trt_plugins.so, built by scripts/build_plugins.sh --trt-include DIR")
    lib = Path(p).expanduser().absolute()
    if not lib.is_file():
        raise BuildError(f"{lib}: plugin library not found (build it with scripts/build_plugins.sh --trt-include DIR)")
    return lib


def check_target(artifact: Path, m: mf.Manifest) -> None:
    if m.target != "tensorrt":
        raise BuildError(f"{artifact}: exported for {m.target!r}; TensorRT engines need an artifact made with "
                         f"`qmoe export CHECKPOINT -o OUT --target tensorrt`")
    want = {s.name: s.version for s in PLUGINS}
    if m.plugins != want:
        had = "unrecorded (before QmoeRoutedExperts version 2)" if m.plugins is None else m.plugins
        raise BuildError(f"{artifact}: its graph names plugin versions {had}, this qmoe builds {want}; re-export "
                         "it with `qmoe export CHECKPOINT -o OUT --target tensorrt`")


# --- the TensorRT build ----------------------------------------------------------------------

@dataclass(frozen=True)
class BuildOptions:
    plugin_lib: str | Path | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_context: int | None = None  # None: min(DEFAULT_MAX_CONTEXT, the model's limit)
    opt_batch: int | None = None
    max_prefill: int | None = None  # None: min(DEFAULT_MAX_PREFILL, max context)
    timing_cache: str | Path | None = None  # None: ARTIFACT/timing.cache
    workspace_gb: float | None = None  # None: TensorRT's default (the device's memory)
    weak_typing: bool = False


def build(artifact: str | Path, options: BuildOptions = BuildOptions(), progress: Progress | None = None) -> Path:
    """Builds ARTIFACT/model.engine and records it in ARTIFACT/qmoe.json; returns the engine path."""
    say = progress or (lambda _msg: None)
    artifact = Path(artifact)
    m = mf.read(artifact)
    check_target(artifact, m)
    config = m.config
    max_context = options.max_context or min(DEFAULT_MAX_CONTEXT, config.max_context)
    max_prefill = options.max_prefill or min(DEFAULT_MAX_PREFILL, max_context)
    profs = profiles(config, options.max_batch, max_context, options.opt_batch, max_prefill=max_prefill)
    import_tensorrt()
    import tensorrt as trt

    from .device import current_device

    plugin_lib = resolve_plugin_lib(options.plugin_lib)
    plugin_sha = sha256(plugin_lib)
    cc, device_name = current_device()
    typing = typing_plan(trt.__version__, m.compute_dtype, options.weak_typing)
    t0 = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    load_plugins(builder.get_plugin_registry(), plugin_lib)
    network = builder.create_network(_network_flags(typing))
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {artifact / m.model_file}")
    # From the path, not from bytes: the parser resolves external weights relative to the file.
    if not parser.parse_from_file(str(artifact / m.model_file)):
        errors = [str(parser.get_error(i)) for i in range(min(parser.num_errors, 5))]
        raise BuildError(f"{artifact / m.model_file}: TensorRT cannot parse it: {' | '.join(errors) or 'no detail'}")

    config_ = builder.create_builder_config()
    workspace = int(options.workspace_gb * 2**30) if options.workspace_gb else None
    if workspace:
        config_.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if typing.precision_flag:
        config_.set_flag(getattr(trt.BuilderFlag, typing.precision_flag))
    if not typing.allow_tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config_.clear_flag(trt.BuilderFlag.TF32)
    _add_profiles(builder, network, config_, profs)
    cache_path = Path(options.timing_cache) if options.timing_cache else artifact / TIMING_CACHE_FILE
    _use_timing_cache(config_, cache_path, say)
    monitor = _progress_monitor(say) if progress and hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config_.progress_monitor = monitor

    say(f"building for {device_name} (sm {cc}), TensorRT {trt.__version__}: max batch {options.max_batch}, "
        f"max context {max_context}, prefill chunks up to {max_prefill}")
    engine_path = artifact / ENGINE_FILE
    with _staged(artifact, ENGINE_FILE) as tmp_engine, _staged(artifact, PLUGIN_FILE) as tmp_plugin:
        _build_to_file(builder, network, config_, tmp_engine)
        _save_timing_cache(config_, cache_path)
        shutil.copyfile(plugin_lib, tmp_plugin)
        rec = record(trt_version=trt.__version__, compute_capability=cc, device_name=device_name, profs=profs,
                     max_batch=options.max_batch, max_context=max_context, max_prefill=max_prefill, typing=typing,
                     plugin_source=plugin_lib, plugin_sha256=plugin_sha, engine_bytes=tmp_engine.stat().st_size,
                     build_seconds=time.perf_counter() - t0, workspace_bytes=workspace)
        os.replace(tmp_plugin, artifact / PLUGIN_FILE)
        os.replace(tmp_engine, engine_path)
        write_manifest(artifact, with_record(m, rec))
    say(f"wrote {engine_path} ({rec['engine_bytes'] / 2**20:.1f} MiB) in {rec['build_seconds']} s")
    return engine_path


_LOADED_PLUGINS: dict[str, Any] = {}  # resolved library path -> the handle TensorRT returned


def load_plugins(registry: trt.IPluginRegistry, lib: Path, error: type[Exception] | None = None) -> None:
    """IPluginRegistry.load_library calls the library's getCreators (IPluginV3 creators); a plain
    dlopen would register nothing. The registry is one per process and load_library "will fail and
    return None if any of the plugins are already registered", so a library is loaded once per
    process, and not at all when qmoe's creators are registered already (the same plugins from
    another copy of the library): a second build, or a build then a load, reuses them."""
    err = error or BuildError
    key = str(Path(lib).resolve())
    if key in _LOADED_PLUGINS or all(
            registry.get_creator(spec.name, spec.version, spec.namespace) is not None for spec in PLUGINS):
        return
    try:
        handle = registry.load_library(str(lib))
    except Exception as e:  # noqa: BLE001  (the bindings raise plain RuntimeError/TypeError)
        raise err(f"{lib}: TensorRT cannot load the plugin library: {str(e).splitlines()[0]}") from None
    if handle is None:
        raise err(f"{lib}: TensorRT cannot load the plugin library (see the log above)")
    _LOADED_PLUGINS[key] = handle


def write_manifest(artifact: Path, m: mf.Manifest) -> None:
    """qmoe.json replaced in one rename: a crash leaves the old manifest or the new one."""
    tmp = Path(tempfile.mkdtemp(prefix=".qmoe-manifest.", dir=artifact))
    try:
        mf.write(tmp, m)
        os.replace(tmp / mf.NAME, artifact / mf.NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _staged:
    """A temp file name beside `name` in `folder`, removed unless renamed into place."""

    def __init__(self, folder: Path, name: str) -> None:
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
        os.close(fd)
        self.path = Path(path)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _network_flags(typing: Typing) -> int:
    import tensorrt as trt

    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    # TensorRT 11 networks are strongly typed whether or not the flag is passed.
    return 1 << int(flag) if typing.strongly_typed and flag is not None else 0


def _add_profiles(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig,
                  profs: list[Profile]) -> None:
    import tensorrt as trt

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for i, prof in enumerate(profs):
        profile = builder.create_optimization_profile()
        for t in inputs:
            shape = dims(t.shape)
            if t.name not in prof:
                if any(d < 0 for d in shape):
                    raise BuildError(f"network input {t.name} {shape} has dynamic dimensions that no qmoe "
                                     "profile covers (was the artifact exported by another qmoe version?)")
                continue
            lo, opt, hi = prof[t.name]
            if len(lo) != len(shape):
                raise BuildError(f"network input {t.name}: rank {len(shape)}, profile expects {len(lo)}")
            profile.set_shape(t.name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        if config.add_optimization_profile(profile) != i:
            raise BuildError(f"TensorRT rejected optimisation profile {PROFILE_NAMES[i]} (see the log above)")


def dims(d: trt.Dims) -> Shape:
    return tuple(int(d[i]) for i in range(len(d)))


def _use_timing_cache(config: trt.IBuilderConfig, path: Path, say: Progress) -> None:
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):
        say(f"timing cache {path} is from another device or TensorRT version; starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    elif blob:
        say(f"reusing timing cache {path}")


def _save_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    data = config.get_timing_cache().serialize()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(memoryview(data))
    os.replace(tmp, path)


def _build_to_file(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig,
                   path: Path) -> None:
    """Streams the plan to disk where the bindings can (10.x later releases): a 57B engine then
    never sits in host memory twice."""
    import tensorrt as trt

    with open(path, "wb") as f:
        if hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter"):
            ok = builder.build_serialized_network_to_stream(network, config, _file_writer(f))
        else:
            plan = builder.build_serialized_network(network, config)
            ok = plan is not None
            if ok:
                f.write(memoryview(plan))
    if not ok:
        raise BuildError("TensorRT could not build the engine (see the log above)")


def _file_writer(f: BinaryIO) -> trt.IStreamWriter:
    import tensorrt as trt

    class FileWriter(trt.IStreamWriter):
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)

        # Python overrides take the bytes (the stubs show the C++ signature).
        def write(self, data: bytes) -> int:  # type: ignore[override]
            return f.write(data)

    return FileWriter()


def _progress_monitor(say: Progress) -> trt.IProgressMonitor:
    """TensorRT calls this from its builder threads; only the top two phase levels are shown."""
    import tensorrt as trt

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.depth: dict[str, int] = {}
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
            self.depth[phase_name] = depth
            self.started[phase_name] = time.perf_counter()
            if depth <= 1:
                say(f"{'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            depth = self.depth.pop(phase_name, 0)
            if depth == 0:
                say(f"{phase_name} done in {time.perf_counter() - self.started.pop(phase_name, 0.0):.1f} s")

    return Monitor()
