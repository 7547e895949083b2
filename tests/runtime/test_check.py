"""`qmoe check`: the comparison rules on synthetic runs, and the CLI end to end on the tiny
artifact against transformers (a right and a wrong reference checkpoint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from runtime import check as ck
from runtime.cli import main

V = 11


def _run(label: str, tokens: list[list[int]], logits: list[np.ndarray], dtype: str = "float32") -> ck.Run:
    return ck.Run(label, dtype, tokens, logits)


def _onehot(tokens: list[int], scale: float = 5.0) -> np.ndarray:
    out = np.zeros((len(tokens), V), np.float32)
    out[np.arange(len(tokens)), tokens] = scale
    return out


def test_teacher_forced_comparison_counts_every_step():
    toks = [[3, 4, 5], [1, 2]]
    run = _run("a", toks, [_onehot(t) for t in toks])
    ref_logits = [_onehot(t) for t in toks]
    ref_logits[0][2, 5] -= 1e-4  # within fp32 tolerance
    c = ck.compare(run, _run("ref", toks, ref_logits), ck.tolerance_for("float32"), teacher_forced=True)
    assert (c.steps, c.greedy_rows, c.rows, c.top1) == (5, 2, 2, 1.0) and c.ok
    assert c.max_abs == pytest.approx(1e-4, rel=1e-2)
    # the reference prefers another token at the last step of row 1: greedy differs there
    ref_logits[1][1] = _onehot([7])[0]
    c = ck.compare(run, _run("ref", toks, ref_logits), ck.tolerance_for("float32"), teacher_forced=True)
    assert c.greedy_rows == 1 and c.top1 == pytest.approx(4 / 5) and c.max_abs == pytest.approx(5.0)
    assert not c.ok and any("greedy tokens differ in 1/2 rows" in f for f in c.failures)


def test_free_running_comparison_stops_after_the_first_divergence():
    a_toks, b_toks = [[1, 2, 3, 4]], [[1, 2, 9, 9]]
    a_logits = _onehot(a_toks[0])
    b_logits = _onehot(b_toks[0])
    b_logits[3] += 100.0  # after the divergence: other contexts, must not count
    c = ck.compare(_run("a", a_toks, [a_logits]), _run("b", b_toks, [b_logits]), ck.tolerance_for("float16"),
                   teacher_forced=False)
    assert c.steps == 3  # steps 0, 1 (same tokens) and 2 (same context, different choice)
    assert c.max_abs == pytest.approx(5.0) and c.top1 == pytest.approx(2 / 3) and c.greedy_rows == 0


def test_tolerances_by_dtype_and_atol_override():
    assert ck.tolerance_for("float32") == ck.Tolerance(1e-3, 1.0, True)
    assert ck.tolerance_for("float32", "bfloat16") == ck.TOLERANCES["bfloat16"]
    assert ck.tolerance_for("float16", "float32") == ck.TOLERANCES["float16"]
    assert ck.tolerance_for("float32", atol=0.5) == ck.Tolerance(0.5, 1.0, True)


def test_nan_logits_fail():
    toks = [[1, 2]]
    bad = _onehot(toks[0])
    bad[1, 3] = np.nan
    for tol in (ck.tolerance_for("float32"), ck.TOLERANCES["int8-activations"]):  # also with no max|Δ| bound
        c = ck.compare(_run("a", toks, [bad]), _run("r", toks, [_onehot(toks[0])]), tol, True)
        assert not c.ok and c.max_abs == float("inf") and "non-finite logits" in c.failures


def test_int8_activation_tolerance_bounds_the_median_step():
    """One step far off (a flipped near-tied expert choice) passes; a run off everywhere does not."""
    toks = [list(range(10))]
    ref = _onehot(toks[0])
    one_off = ref + 0.01
    one_off[4] += 3.0 * (np.arange(V) % 2)  # same argmax, big |Δ| at one step
    tol = ck.TOLERANCES["int8-activations"]
    assert ck.compare(_run("a", toks, [one_off]), _run("r", toks, [ref]), tol, True).ok
    scaled = ref * 1.5  # same argmax everywhere, 50% off at every step
    c = ck.compare(_run("a", toks, [scaled]), _run("r", toks, [ref]), tol, True)
    assert not c.ok and any("median rel. L2" in f for f in c.failures)


def test_plan_runs_skips_unavailable_backends_unless_named(tiny_artifact, monkeypatch, tmp_path):
    import shutil

    trt_like = tmp_path / "trt_art"
    shutil.copytree(tiny_artifact, trt_like)
    text = (trt_like / "qmoe.json").read_text().replace('"target": "onnxruntime"', '"target": "tensorrt"')
    (trt_like / "qmoe.json").write_text(text)
    monkeypatch.setattr(ck, "backend_available", lambda b: "not installed" if b == "tensorrt" else None)
    runs, skipped = ck.plan_runs([tiny_artifact, trt_like], None)
    assert runs == [(tiny_artifact, "onnxruntime")] and skipped == ["tensorrt (trt_art): not installed"]
    with pytest.raises(ck.CheckError, match="backend tensorrt is not available: not installed"):
        ck.plan_runs([tiny_artifact, trt_like], ["onnxruntime", "tensorrt"])
    with pytest.raises(ck.CheckError, match="none of the artifacts was exported for it"):
        ck.plan_runs([tiny_artifact], ["tensorrt"])
    with pytest.raises(ck.CheckError, match="unknown backend 'torch'"):
        ck.plan_runs([tiny_artifact], ["torch"])


# --- CLI, end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_seed_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.tiny import tiny_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_seed1") / "ck", tiny_config(), seed=1)


def test_check_onnxruntime_against_transformers(tiny_artifact, tiny_checkpoint):
    result = CliRunner().invoke(main, ["check", str(tiny_artifact), "--reference", str(tiny_checkpoint),
                                       "--prompts", "3", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("3 prompts (") and lines[0].endswith(" tokens), 8 greedy steps each")
    row = next(line for line in lines if line.startswith("onnxruntime ("))
    fields = row.split()
    assert fields[2] == "transformers" and fields[3] == "24"  # 3 rows x 8 steps, all compared
    assert float(fields[4]) < 1e-4 and float(fields[5]) < 1e-5  # max |Δ logits|, median rel. L2: fp32 vs fp32
    assert fields[6:] == ["100.0%", "3/3", "ok"]
    assert "tolerance: max|Δ| <= 0.001, top-1 >= 100%, greedy tokens identical" in result.stdout


def test_check_fails_against_another_checkpoint(tiny_artifact, other_seed_checkpoint):
    result = CliRunner().invoke(main, ["check", str(tiny_artifact), "--reference", str(other_seed_checkpoint),
                                       "--prompts", "2", "-n", "4"])
    assert result.exit_code == 1
    assert "FAIL: max|Δ|" in result.stdout
    assert result.stderr.splitlines()[-1] == f"error: check failed: onnxruntime ({tiny_artifact.name}) vs transformers"


def test_check_atol_is_the_only_thing_that_fails_when_tiny(tiny_artifact, tiny_checkpoint):
    result = CliRunner().invoke(main, ["check", str(tiny_artifact), "--reference", str(tiny_checkpoint),
                                       "--prompts", "1", "-n", "2", "--atol", "1e-12"])
    assert result.exit_code == 1
    fail = next(line for line in result.stdout.splitlines() if "FAIL" in line).split("FAIL: ")[1]
    assert fail.startswith("max|Δ| ") and fail.endswith(" > 1e-12") and ";" not in fail  # top-1, greedy still fine


def test_check_named_backend_without_artifact_or_install(tiny_artifact):
    result = CliRunner().invoke(main, ["check", str(tiny_artifact), "--backends", "onnxruntime,tensorrt"])
    assert result.exit_code == 1
    assert result.stderr == ("error: backend tensorrt: none of the artifacts was exported for it "
                             "(`qmoe export ... --target tensorrt`)\n")


def test_check_needs_two_things_to_compare(tiny_artifact):
    result = CliRunner().invoke(main, ["check", str(tiny_artifact)])
    assert result.exit_code == 1 and "nothing to compare" in result.stderr


def test_check_reference_must_be_a_local_checkpoint_folder(tiny_artifact, tmp_path):
    """Refused before any run, in one line, and never looked up on a model hub."""
    for ref, msg in [("no_such_org/no_such_model", "no such checkpoint folder"),
                     (str(tmp_path / "nope"), "no such checkpoint folder"),
                     (str(tiny_artifact), "")]:
        result = CliRunner().invoke(main, ["check", str(tiny_artifact), "--reference", ref, "-n", "1"])
        assert result.exit_code == 1 and result.stderr.startswith("error: ") and msg in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
        assert "running onnxruntime" not in result.output and "huggingface" not in result.stderr
