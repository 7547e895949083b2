"""scripts/typecheck.sh: mypy over runtime/trt against the TensorRT Python API stubs. A call that
does not exist in TensorRT's API fails CI here, without TensorRT."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_runtime_trt_typechecks_against_tensorrt_stubs():
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (test extra)")
    if importlib.util.find_spec("tensorrt_stubs") is None and importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1)")
    import os
    import sys

    out = subprocess.run(["bash", str(ROOT / "scripts/typecheck.sh")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout
