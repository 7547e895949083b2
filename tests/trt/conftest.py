"""Fixtures for the TensorRT layer: the tiny checkpoint exported for the tensorrt target, and the
plugin library for real builds (trt-marked tests only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def trt_available() -> bool:
    from runtime.trt import available

    return available()


requires_trt = pytest.mark.skipif(not trt_available(), reason="TensorRT and cuda-python are not installed")


@pytest.fixture(scope="session")
def tiny_trt_artifact(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with --target tensorrt (float32); no engine yet."""
    from exporter.export import export

    return export(tiny_checkpoint, tmp_path_factory.mktemp("tiny_trt") / "art", target="tensorrt")


@pytest.fixture(scope="session")
def plugin_lib() -> Path:
    """libqmoe_trt_plugins.so: $QMOE_TRT_PLUGIN_LIB, else scripts/build_plugins.sh's output."""
    path = Path(os.environ.get("QMOE_TRT_PLUGIN_LIB") or ROOT / "build/plugins/lib/libqmoe_trt_plugins.so")
    if not path.is_file():
        pytest.skip(f"{path}: plugin library not built (scripts/build_plugins.sh --trt-include DIR)")
    return path
