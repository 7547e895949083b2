"""The TensorRT backend without TensorRT: build-vs-runtime checks, dtype conversion, and the step
wiring (profiles, shapes, KV ping-pong addresses) against a recording fake context."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

import runtime
from runtime import manifest as mf
from runtime.backends import BackendError
from runtime.trt import PLUGIN_FILE, RECORD_KEY
from runtime.trt import backend as tb
from runtime.trt.build import DECODE, PREFILL, with_record, write_manifest


def test_engine_record_needs_a_tensorrt_artifact_with_an_engine(tiny_artifact, tiny_trt_artifact):
    with pytest.raises(BackendError, match="exported for 'onnxruntime'"):
        tb.engine_record(tiny_artifact, mf.read(tiny_artifact))
    with pytest.raises(BackendError, match=f"no TensorRT engine; build one with `qmoe build {tiny_trt_artifact}"):
        tb.engine_record(tiny_trt_artifact, mf.read(tiny_trt_artifact))


def test_load_reports_missing_engine_and_cpu(tiny_trt_artifact, tiny_artifact):
    with pytest.raises(BackendError, match="no TensorRT engine"):
        runtime.load(tiny_trt_artifact)  # auto: the tensorrt target opens the TensorRT backend
    with pytest.raises(BackendError, match="CUDA GPUs only"):
        runtime.load(tiny_trt_artifact, device="cpu")
    with pytest.raises(BackendError, match="exported for 'onnxruntime'"):
        runtime.load(tiny_artifact, backend="tensorrt")


REC = {"tensorrt_version": "10.13.0.35", "compute_capability": "9.0", "device_name": "NVIDIA H100 80GB HBM3"}


def test_check_runtime_versions_and_compute_capability(tmp_path):
    tb.check_runtime(REC, "10.13.0.35", "9.0", tmp_path)
    tb.check_runtime(REC, "10.13.0.36", "9.0", tmp_path)  # same release, another build: TensorRT decides
    with pytest.raises(BackendError, match=r"built with TensorRT 10\.13\.0\.35, this is TensorRT 10\.14\.1\.48; "
                                           r"rebuild it with `qmoe build"):
        tb.check_runtime(REC, "10.14.1.48", "9.0", tmp_path)
    with pytest.raises(BackendError, match=r"TensorRT 11\.0\.0"):
        tb.check_runtime(REC, "11.0.0", "9.0", tmp_path)
    with pytest.raises(BackendError, match=r"compute capability 9\.0 \(NVIDIA H100 80GB HBM3\), this GPU is 8\.0"):
        tb.check_runtime(REC, "10.13.0.35", "8.0", tmp_path)


def test_check_plugin_sha256(tmp_path):
    lib = tmp_path / PLUGIN_FILE
    lib.write_bytes(b"plugins v1")
    rec = {"plugin_library": {"file": PLUGIN_FILE, "sha256": hashlib.sha256(b"plugins v1").hexdigest()}}
    assert tb.check_plugin(tmp_path, rec) == lib
    lib.write_bytes(b"plugins v2")
    with pytest.raises(BackendError, match="differs from the one the engine was built with"):
        tb.check_plugin(tmp_path, rec)
    lib.unlink()
    with pytest.raises(BackendError, match="plugin library missing"):
        tb.check_plugin(tmp_path, rec)


def test_bf16_conversion_matches_torch():
    import torch

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 1000),
                        np.float32([0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, -1 - 2**-8, 65504.0, 1e-40])])
    ref = torch.from_numpy(x).to(torch.bfloat16)
    bits = tb.to_engine_dtype(x, "BF16")
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, ref.view(torch.int16).numpy().view(np.uint16))  # round to nearest even
    np.testing.assert_array_equal(tb.from_engine_dtype(bits, "BF16"), ref.float().numpy())
    np.testing.assert_array_equal(tb.to_engine_dtype(x[:4], "HALF"), x[:4].astype(np.float16))


def test_cache_layout_aligns_every_buffer():
    offsets, total = tb.cache_layout({"a": 10, "b": 256, "c": 0, "d": 257})
    assert offsets == {"a": 0, "b": 256, "c": 512, "d": 768} and total == 768 + 512


# --- step wiring against a fake engine -------------------------------------------------------

class FakeContext:
    def __init__(self) -> None:
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}
        self.switches: list[int] = []
        self.launches: list[tuple[dict, dict]] = []

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self.switches.append(profile)
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.launches.append((dict(self.addresses), dict(self.shapes)))
        return True


class FakeStream:
    handle = 7

    def __init__(self) -> None:
        self.uploads: dict[int, np.ndarray] = {}
        self.zeroed: list[tuple[int, int]] = []

    def upload(self, dst: int, array: np.ndarray) -> None:
        self.uploads[dst] = np.array(array)

    def download(self, out: np.ndarray, src: int) -> None:
        out[...] = 0.5

    def zero(self, ptr: int, nbytes: int) -> None:
        self.zeroed.append((ptr, nbytes))

    def synchronize(self) -> None:
        pass


def fake_backend(m: mf.Manifest, aliased: bool, monkeypatch) -> tb.TensorRTBackend:
    import runtime.trt.device as device

    monkeypatch.setattr(device, "malloc", lambda n: 1 << 32)
    monkeypatch.setattr(device, "free_all", lambda ptrs: None)
    b = tb.TensorRTBackend.__new__(tb.TensorRTBackend)
    b.manifest, b.config = m, m.config
    b.context, b.stream, b.profile = FakeContext(), FakeStream(), DECODE
    kinds = {"input_ids": "INT64", "query_seqlens": "INT32", "seqlens_k": "INT32", "total_sequence_length": "INT32",
             "cos_cache": "FLOAT", "sin_cache": "FLOAT", "logits_indices": "INT64"}
    b.dtype = {n: kinds.get(n, "FLOAT") for n in m.inputs + m.outputs}
    b.inputs, b.on_host = list(m.inputs), set()
    b.dynamic = set(m.inputs) - {"total_sequence_length"}
    n = m.config.num_hidden_layers
    b.kv = list(zip(m.inputs[7:7 + 2 * n], m.outputs[1:1 + 2 * n]))
    b.aliased, b.max_batch, b.max_capacity, b.max_chunk = aliased, 4, 65, 64
    return b


def _generate(b: tb.TensorRTBackend, steps: int = 3):
    """The engine's call pattern: prefill of 2 prompts (lengths 5 and 3), then decode steps."""
    from runtime.yarn import rope_tables, default_inv_freq

    c = b.config
    cache = b.new_cache(2, 5 + steps + 1)
    cos, sin = rope_tables(default_inv_freq(c.head_dim, c.rope_theta), 1.0, 100)
    b.bind_rope(cache, cos, sin)
    lengths = np.array([5, 3], np.int32)
    out = [b.step(cache, np.ones((2, 5), np.int64), lengths, lengths - 1, (lengths - 1)[:, None].astype(np.int64))]
    for i in range(steps):
        out.append(b.step(cache, np.ones((2, 1), np.int64), np.ones(2, np.int32), lengths + i,
                          np.zeros((2, 1), np.int64)))
    return cache, cos, out


def test_step_ping_pongs_kv_and_switches_profiles(tiny_trt_artifact, monkeypatch):
    m = mf.read(tiny_trt_artifact)
    b = fake_backend(m, aliased=False, monkeypatch=monkeypatch)
    cache, cos, out = _generate(b)
    assert all(o.shape == (2, 1, m.config.vocab_size) and o.dtype == np.float32 for o in out)
    assert b.context.switches == [PREFILL, DECODE]  # starts on decode; switches once each way
    launches = b.context.launches
    assert launches[0][1]["input_ids"] == (2, 5) and launches[1][1]["input_ids"] == (2, 1)
    assert launches[0][1]["past_key_values.0.key"] == (2, 2, 9, 16) and launches[0][1]["cos_cache"] == (9, 8)
    for past, present in b.kv:
        for (now, _), (nxt, _) in zip(launches, launches[1:]):
            assert now[past] != now[present]  # never read and write one buffer (ScatterND is not in place)
            assert nxt[past] == now[present]  # what a step wrote is what the next one reads
    all_kv = {a[n] for a, _ in launches for pair in b.kv for n in pair}
    assert len(all_kv) == 2 * len(b.kv)  # two buffers per layer and K/V, nothing else
    # every buffer zeroed once, rope rows [0, capacity) uploaded in the engine's dtype
    assert b.stream.zeroed == [(1 << 32, b.stream.zeroed[0][1])]
    np.testing.assert_array_equal(b.stream.uploads[cache.ptr["cos_cache"]], cos[:9].astype(np.float32))


def test_step_binds_one_buffer_when_the_engine_aliases_kv(tiny_trt_artifact, monkeypatch):
    b = fake_backend(mf.read(tiny_trt_artifact), aliased=True, monkeypatch=monkeypatch)
    _generate(b)
    for past, present in b.kv:
        assert {a[past] for a, _ in b.context.launches} == {a[present] for a, _ in b.context.launches}
        assert len({a[past] for a, _ in b.context.launches}) == 1


def test_requests_past_the_engine_limits_are_refused(tiny_trt_artifact, monkeypatch):
    b = fake_backend(mf.read(tiny_trt_artifact), aliased=False, monkeypatch=monkeypatch)
    with pytest.raises(BackendError, match="max batch 4; rebuild with a larger `qmoe build --max-batch`"):
        b.new_cache(5, 10)
    with pytest.raises(BackendError, match="exceeds the engine's max context 64; rebuild"):
        b.new_cache(1, 66)
    b.max_chunk = 4
    cache = b.new_cache(1, 10)
    with pytest.raises(BackendError, match="prefill chunk of 5 tokens exceeds the engine's 4; load with "
                                           "prefill_chunk <= 4"):
        b.step(cache, np.ones((1, 5), np.int64), np.array([5], np.int32), np.array([4], np.int32),
               np.array([[4]], np.int64))


def test_record_survives_a_rebuild_of_the_manifest(tiny_trt_artifact, tmp_path):
    """engine_record reads what build.write_manifest wrote (and the engine file it names)."""
    art = tmp_path / "art"
    shutil.copytree(tiny_trt_artifact, art)
    (art / "model.engine").write_bytes(b"plan")
    write_manifest(art, with_record(mf.read(art), {**REC, "engine_file": "model.engine"}))
    assert tb.engine_record(art, mf.read(art))["compute_capability"] == "9.0"
    assert mf.read(art).extra[RECORD_KEY]["tensorrt_version"] == "10.13.0.35"
    write_manifest(art, with_record(mf.read(art), {**REC, "engine_file": "model.engine", "engine_bytes": 4}))
    tb.engine_record(art, mf.read(art))
    (art / "model.engine").write_bytes(b"a newer plan")  # the manifest still describes the old one
    with pytest.raises(BackendError, match="not the engine qmoe.json records"):
        tb.engine_record(art, mf.read(art))
