"""`qmoe build` without TensorRT: profiles, typing plan, manifest record, and the CLI's errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runtime import manifest as mf
from runtime.cli import main
from runtime.config import ModelConfig
from runtime.trt import ENGINE_FILE, RECORD_KEY
from runtime.trt.build import (DECODE, PREFILL, BuildError, Typing, choose_profile, profiles, record, sha256,
                               typing_plan, with_record, write_manifest)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    from exporter.tiny import tiny_config

    return ModelConfig.from_hf_dict(tiny_config(), source="tiny")  # Hkv 2, head_dim 16, 2 layers


def test_profiles_decode_and_prefill_shapes(config):
    decode, prefill = profiles(config, max_batch=4, max_context=64)
    names = set(mf.io_names(2).inputs) - {"total_sequence_length"}  # 0-d: nothing to profile
    assert set(decode) == set(prefill) == names
    assert decode["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode["logits_indices"] == ((1, 1), (4, 1), (4, 1))
    assert decode["past_key_values.1.value"] == ((1, 2, 1, 16), (4, 2, 33, 16), (4, 2, 65, 16))
    assert decode["cos_cache"] == ((1, 8), (33, 8), (65, 8))
    assert prefill["input_ids"] == ((1, 1), (4, 64), (4, 64))
    assert prefill["logits_indices"] == ((1, 1), (4, 1), (4, 64))
    assert prefill["query_seqlens"] == ((1,), (4,), (4,))
    for prof in (decode, prefill):
        for lo, opt, hi in prof.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


def _fits(prof, shapes) -> bool:
    return all(all(lo <= s <= hi for lo, s, hi in zip(prof[n][0], shape, prof[n][2])) for n, shape in shapes.items())


def test_max_prefill_bounds_the_prefill_profile(config):
    _, prefill = profiles(config, max_batch=2, max_context=64, max_prefill=16)
    assert prefill["input_ids"] == ((1, 1), (2, 16), (2, 16))
    assert prefill["logits_indices"] == ((1, 1), (2, 1), (2, 16))
    assert prefill["past_key_values.0.key"][2] == (2, 2, 65, 16)  # the cache still spans the context
    with pytest.raises(BuildError, match="max prefill must be in \\[1, 64\\]"):
        profiles(config, 2, 64, max_prefill=65)


@pytest.mark.parametrize("batch,prompt,new", [(1, 1, 1), (3, 1, 63), (4, 63, 1), (2, 30, 30), (4, 17, 5)])
def test_every_request_within_limits_fits_its_profile(config, batch, prompt, new):
    """Shapes the engine binds for a request (runtime/engine.py: capacity = prompt + new + 1, the
    prompt in chunks of prefill_chunk tokens, one logit row per sequence; rope tables cut to
    capacity rows by the TensorRT backend)."""
    chunk = 16
    profs = profiles(config, max_batch=4, max_context=64, opt_batch=2, max_prefill=chunk)
    cap = prompt + new + 1
    kv = (batch, 2, cap, 16)
    common = {"query_seqlens": (batch,), "seqlens_k": (batch,), "cos_cache": (cap, 8), "sin_cache": (cap, 8),
              "logits_indices": (batch, 1), **{n: kv for n in mf.io_names(2).inputs[7:]}}
    for c0 in range(0, prompt, chunk):
        width = min(prompt, c0 + chunk) - c0
        assert _fits(profs[choose_profile(width, 1)], {**common, "input_ids": (batch, width)})
    assert _fits(profs[choose_profile(1, 1)], {**common, "input_ids": (batch, 1)})
    assert choose_profile(1, 1) == DECODE and choose_profile(prompt + 1, 1) == PREFILL
    assert choose_profile(4, 4) == PREFILL and choose_profile(1, 2) == PREFILL


def test_profiles_reject_bad_limits(config):
    with pytest.raises(BuildError, match="max context must be in \\[2, 32768\\]"):
        profiles(config, 1, 32769)
    with pytest.raises(BuildError, match="max batch"):
        profiles(config, 0, 64)
    with pytest.raises(BuildError, match="opt batch must be in \\[1, 4\\]"):
        profiles(config, 4, 64, opt_batch=5)


def test_typing_plan():
    assert typing_plan("10.13.0.35", "bfloat16") == Typing(True, None, True)
    assert typing_plan("10.13.0.35", "float16", weak=True) == Typing(False, "FP16", True)
    assert typing_plan("10.8.0", "bfloat16", weak=True).precision_flag == "BF16"
    assert typing_plan("11.1.0", "float32") == Typing(True, None, False)  # fp32: no TF32 rounding
    with pytest.raises(BuildError, match="strongly typed networks only"):
        typing_plan("11.0.0", "float16", weak=True)


def test_record_round_trips_through_the_manifest(tiny_trt_artifact, config, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_trt_artifact, art)
    before = mf.read(art)
    lib = tmp_path / "libqmoe_trt_plugins.so"
    lib.write_bytes(b"not really a library")
    profs = profiles(config, 2, 32)
    rec = record(trt_version="10.13.0.35", compute_capability="9.0", device_name="NVIDIA H100", profs=profs,
                 max_batch=2, max_context=32, max_prefill=32, typing=typing_plan("10.13.0.35", "float32"), plugin_source=lib,
                 plugin_sha256=sha256(lib), engine_bytes=123, build_seconds=4.56, workspace_bytes=None)
    write_manifest(art, with_record(before, rec))
    after = mf.read(art)
    got = after.extra[RECORD_KEY]
    assert got["tensorrt_version"] == "10.13.0.35" and got["compute_capability"] == "9.0"
    assert got["engine_file"] == ENGINE_FILE and got["typing"] == "strong" and got["tf32"] is False
    assert [p["name"] for p in got["profiles"]] == ["decode", "prefill"]
    assert got["profiles"][1]["shapes"]["input_ids"] == {"min": [1, 1], "opt": [2, 32], "max": [2, 32]}
    assert got["max_prefill"] == 32
    import hashlib

    assert got["plugin_library"]["sha256"] == hashlib.sha256(b"not really a library").hexdigest()
    assert after.inputs == before.inputs and after.hf_config == before.hf_config  # nothing else changed
    assert not [p for p in art.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_build_refuses_an_onnxruntime_artifact(tiny_artifact):
    result = CliRunner().invoke(main, ["build", str(tiny_artifact)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "--target tensorrt" in result.stderr
    assert not (tiny_artifact / ENGINE_FILE).exists()


@pytest.mark.parametrize("plugins", [None, {"QmoeRoutedExperts": "1", "QmoeRotary": "1"}], ids=["unrecorded", "v1"])
def test_build_refuses_an_artifact_for_other_plugin_versions(tiny_trt_artifact, tmp_path, plugins):
    """An artifact whose graph names other plugin versions (or exported before they were recorded:
    QmoeRoutedExperts version 1) is refused in one line that says to re-export, before TensorRT."""
    import dataclasses
    import shutil

    art = tmp_path / "old"
    shutil.copytree(tiny_trt_artifact, art)
    assert mf.read(art).plugins == {"QmoeRoutedExperts": "2", "QmoeRotary": "1"}  # what export records
    write_manifest(art, dataclasses.replace(mf.read(art), plugins=plugins))
    result = CliRunner().invoke(main, ["build", str(art)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "re-export it" in result.stderr, result.stderr
    assert not (art / ENGINE_FILE).exists()


def test_build_without_tensorrt_is_one_line(tiny_trt_artifact, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, as without TensorRT
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"")
    result = CliRunner().invoke(main, ["build", str(tiny_trt_artifact), "--plugin-lib", str(lib)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: TensorRT is not installed")
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12" in result.stderr
    assert "nvcr.io/nvidia/tensorrt" in result.stderr
    assert not [p for p in tiny_trt_artifact.iterdir() if p.name.startswith(".") or p.name == ENGINE_FILE]


def test_build_checks_limits_before_tensorrt(tiny_trt_artifact):
    result = CliRunner().invoke(main, ["build", str(tiny_trt_artifact), "--max-context", "40000"])
    assert result.exit_code == 1 and "max context must be in [2, 32768]" in result.stderr


def test_cli_help_imports_no_tensorrt():
    code = ("import sys; from runtime.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert not {'tensorrt', 'runtime.trt', 'torch'} & set(sys.modules), sorted(sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "build" in out.stdout and "check" in out.stdout


class FakeRegistry:
    """TensorRT's IPluginRegistry as documented: load_library registers the library's creators and
    returns None if any of them is registered already (the registry is one per process)."""

    def __init__(self) -> None:
        self.creators: set[tuple[str, str, str]] = set()
        self.loads: list[str] = []

    def get_creator(self, name: str, version: str, namespace: str):
        return (name, version, namespace) if (name, version, namespace) in self.creators else None

    def load_library(self, path: str):
        from runtime.contract import PLUGINS

        self.loads.append(path)
        mine = {(s.name, s.version, s.namespace) for s in PLUGINS}
        if mine & self.creators:
            return None
        self.creators |= mine
        return object()


def test_plugins_load_once_per_process(tmp_path, monkeypatch):
    """A second build, or a build and then a load, must not call load_library again: TensorRT would
    refuse the already registered creators."""
    from runtime.backends import BackendError
    from runtime.trt import build as tb

    monkeypatch.setattr(tb, "_LOADED_PLUGINS", {})
    reg = FakeRegistry()
    lib, copy = tmp_path / "libqmoe_plugins.so", tmp_path / "art" / "libqmoe_plugins.so"
    tb.load_plugins(reg, lib)
    tb.load_plugins(reg, lib)
    tb.load_plugins(reg, copy, BackendError)  # the artifact's copy: the creators are there already
    assert reg.loads == [str(lib)]
    with pytest.raises(BackendError, match="libqmoe_plugins.so: TensorRT cannot load the plugin library"):
        tb.load_plugins(type("Refusing", (FakeRegistry,), {"load_library": lambda self, p: None})(), copy,
                        BackendError)
