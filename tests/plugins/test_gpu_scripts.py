"""scripts/gpu_check.sh names GPU test cases by pytest id for compute-sanitizer; a renamed test or
parameter would make that step test nothing. Checked here by collecting the GPU tests (no GPU needed)."""

from __future__ import annotations

import json
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


_GROUPS_PROBE = r"""
import json, sys
import pytest

class Items:
    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]

path, groups = sys.argv[1], json.loads(sys.argv[2])
selected = {}
for group in [None, *groups]:
    probe = Items()
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", path] + ([] if group is None else ["-k", group])
    assert pytest.main(args, plugins=[probe]) == 0, group
    selected[group or ""] = probe.ids
print("GROUPS " + json.dumps(selected))
"""


def test_every_gpu_test_is_in_one_group() -> None:
    """gpu_check.sh runs the GPU tests in -k groups, one process each, the last one "not (every other
    group)": a test in no group would never run on the lease, one in two would run twice."""
    pytest.importorskip("torch")
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    block = re.search(r'^for group in (.*?); do$', script, re.S | re.M)
    assert block, "gpu_check.sh has no 'for group in ...; do' loop"
    groups = re.findall(r'"([^"]+)"', block.group(1))
    assert len(groups) >= 5 and groups[-1].startswith("not (")
    proc = subprocess.run([sys.executable, "-c", _GROUPS_PROBE, "tests/plugins/test_kernels_gpu.py", json.dumps(groups)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GROUPS ")), None)
    assert proc.returncode == 0 and line, (proc.stdout + proc.stderr)[-3000:]
    selected = json.loads(line[len("GROUPS "):])
    every = selected.pop("")
    assert len(every) > 100
    counts = {test: sum(test in ids for ids in selected.values()) for test in every}
    assert not [t for t, n in counts.items() if n != 1], {t: n for t, n in counts.items() if n != 1}
    assert all(selected[g] for g in groups), [g for g in groups if not selected[g]]
