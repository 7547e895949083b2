"""scripts/compare_bench.py: the side-by-side table and the issue-#5 target verdicts, on hand-made
benchmark JSON (the real files come from scripts/bench_moe_gpu.py on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compare_bench.py"


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps({"rows": rows}))
    return str(path)


def _run(*specs: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *specs], capture_output=True, text=True, check=False)


def test_table_ratios_and_target_verdicts(tmp_path: Path) -> None:
    base = _write(tmp_path / "a.json", [
        {"tokens": 1, "ours_ms": 0.335, "roofline_ms": 0.292, "vllm_pair_ms": [0.34, 0.36]},
        {"tokens": 64, "ours_ms": 1.479, "roofline_ms": 1.316, "vllm_pair_ms": [1.35, 1.39]},
        {"tokens": 4096, "ours_ms": 6.26, "roofline_ms": 4.569, "routed_only_tflops": 506.0},
    ])
    new = _write(tmp_path / "b.json", [
        {"tokens": 1, "ours_ms": 0.300, "roofline_ms": 0.292, "vllm_pair_ms": [0.34, 0.36]},
        {"tokens": 64, "ours_ms": 1.37, "roofline_ms": 1.316, "vllm_pair_ms": [1.35, 1.39]},
        {"tokens": 4096, "ours_ms": 5.0, "roofline_ms": 4.569, "routed_only_tflops": 612.0},
    ])
    proc = _run(f"default={base}", f"mma={new}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "| 1 | 0.335 | 0.300 | 0.896 | 1.147 | 1.027 |" in lines
    targets = lines[lines.index("Targets (issue #5):"):]
    # 1 token: both ahead of the pair (below its lower bound 0.34); only the second within 1.05x.
    assert "| 1 | roof 1.15 no; vLLM pair 0.340-0.360: yes | roof 1.03 ok; vLLM pair 0.340-0.360: yes |" in targets
    # 64 tokens: above the pair's range (no), then inside it (tie?).
    assert "| 64 | roof 1.12 no; vLLM pair 1.350-1.390: no | roof 1.04 ok; vLLM pair 1.350-1.390: tie? |" in targets
    assert "| 4096 | routed 506 TFLOP/s no | routed 612 TFLOP/s ok |" in targets


def test_missing_token_counts_and_bad_files(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [{"tokens": 8, "ours_ms": 0.961, "roofline_ms": 0.859}])
    b = _write(tmp_path / "b.json", [{"tokens": 64, "ours_ms": 1.479, "roofline_ms": 1.316}])
    proc = _run(f"a={a}", f"b={b}")
    assert proc.returncode == 0, proc.stderr
    assert "| 8 | 0.961 | - | - | 1.119 | - |" in proc.stdout.splitlines()
    assert "| 64 | - | roof 1.12 no |" in proc.stdout.splitlines()
    bad = _run(f"a={tmp_path / 'missing.json'}")
    assert bad.returncode == 1 and "compare_bench:" in bad.stderr
    assert _run("no-equals-sign").returncode == 1
