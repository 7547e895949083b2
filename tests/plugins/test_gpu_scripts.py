"""scripts/gpu_check.sh names GPU test cases by pytest id for compute-sanitizer; a renamed test or
parameter would make that step test nothing. Checked here by collecting the GPU tests (no GPU needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_sanitizer_cases_exist() -> None:
    pytest.importorskip("torch")  # the GPU test module needs torch to be collected
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    block = re.search(r"^cases=\((.*?)^\)", script, re.S | re.M)
    assert block, "gpu_check.sh has no cases=( ... ) list"
    cases = [c.replace("$t::", "tests/plugins/test_kernels_gpu.py::") for c in re.findall(r'"([^"]+)"', block.group(1))]
    assert len(cases) >= 10
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/plugins/test_kernels_gpu.py"], cwd=ROOT, capture_output=True, text=True, check=False)
    collected = set(proc.stdout.split())
    missing = [c for c in cases if c not in collected]
    assert not missing, f"gpu_check.sh names tests that do not exist: {missing}"
