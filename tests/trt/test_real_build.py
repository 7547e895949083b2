"""A real engine from the tiny tensorrt artifact: `qmoe build`, then `qmoe check` of the engine
against ONNX Runtime and transformers. Needs TensorRT, cuda-python, a GPU and the plugin library
(QMOE_TRT_PLUGIN_LIB or build/plugins/lib/libqmoe_trt_plugins.so); skipped otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.trt.conftest import requires_trt

pytestmark = [pytest.mark.trt, pytest.mark.gpu, requires_trt]


@pytest.fixture(scope="module")
def built(tiny_trt_artifact: Path, plugin_lib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime.cli import main

    art = tmp_path_factory.mktemp("built") / "art"
    shutil.copytree(tiny_trt_artifact, art)
    result = CliRunner().invoke(main, ["build", str(art), "--plugin-lib", str(plugin_lib), "--max-batch", "4",
                                       "--max-context", "128", "--opt-batch", "2"])
    assert result.exit_code == 0, result.output
    return art


def test_build_records_the_engine(built: Path, plugin_lib: Path):
    import tensorrt as trt

    from runtime.trt.build import sha256
    from runtime.trt.device import current_device

    rec = json.loads((built / "qmoe.json").read_text())["extra"]["tensorrt"]
    assert (built / "model.engine").stat().st_size == rec["engine_bytes"] > 0
    assert rec["tensorrt_version"] == trt.__version__ and rec["compute_capability"] == current_device()[0]
    assert rec["plugin_library"]["sha256"] == sha256(plugin_lib) == sha256(built / rec["plugin_library"]["file"])
    assert rec["max_batch"] == 4 and rec["max_context"] == rec["max_prefill"] == 128 and len(rec["profiles"]) == 2
    assert (built / "timing.cache").stat().st_size > 0


def test_rebuild_reuses_the_timing_cache(built: Path, plugin_lib: Path):
    from runtime.cli import main

    result = CliRunner().invoke(main, ["build", str(built), "--plugin-lib", str(plugin_lib), "--max-batch", "4",
                                       "--max-context", "128", "--opt-batch", "2"])
    assert result.exit_code == 0 and "reusing timing cache" in result.stderr


def test_check_engine_against_onnxruntime_and_transformers(built: Path, tiny_artifact: Path, tiny_checkpoint: Path):
    from runtime.cli import main

    result = CliRunner().invoke(main, ["check", str(tiny_artifact), str(built), "--reference", str(tiny_checkpoint),
                                       "--prompts", "4", "-n", "16"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("onnxruntime (", "tensorrt ("))]
    assert [r[0] for r in rows] == ["onnxruntime", "tensorrt"]
    assert all(r[-3:] == ["100.0%", "4/4", "ok"] for r in rows)


def _assert_engine_matches_onnxruntime(engine_artifact: Path, tiny_artifact: Path, prompts: list[list[int]],
                                       new_tokens: int) -> None:
    """Greedy generation through the engine and through ONNX Runtime: same tokens, logits within 1e-3."""
    import runtime
    from runtime.sampling import SamplingParams

    p = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ref = runtime.load(tiny_artifact, backend="onnxruntime").generate(prompts, p, output_logits=True)
    got = runtime.load(engine_artifact, backend="tensorrt").generate(prompts, p, output_logits=True)
    for r, g in zip(ref, got):
        assert g.tokens == r.tokens
        np.testing.assert_allclose(np.stack(g.logits), np.stack(r.logits), atol=1e-3, rtol=0)


def test_engine_matches_onnxruntime_step_by_step(built: Path, tiny_artifact: Path):
    """Ragged batch with a single-token prompt, through the engine's prefill and decode profiles."""
    prompts = [[9707, 11, 1879, 0, 220], [151644], [40, 1079, 264, 5562, 8806, 13, 576]]
    _assert_engine_matches_onnxruntime(built, tiny_artifact, prompts, 12)


def test_mismatched_tensorrt_version_is_refused(built: Path, tmp_path: Path):
    import runtime
    from runtime.backends import BackendError

    art = tmp_path / "art"
    shutil.copytree(built, art)
    m = json.loads((art / "qmoe.json").read_text())
    m["extra"]["tensorrt"]["tensorrt_version"] = "9.0.0.1"
    (art / "qmoe.json").write_text(json.dumps(m))
    with pytest.raises(BackendError, match="engine built with TensorRT 9.0.0.1"):
        runtime.load(art)


def test_full_sequence_logits_match_onnxruntime(built: Path, tiny_artifact: Path):
    """One prefill step asking for every position's logits (N = S > 1: the prefill profile's
    logit rows and the backend's larger logits buffer)."""
    import runtime
    from runtime.yarn import default_inv_freq, rope_tables

    prompts = np.array([[9707, 11, 1879, 0, 220, 108386], [151644, 872, 198, 0, 0, 0]], np.int64)
    lengths = np.array([6, 3], np.int32)
    rows = np.tile(np.arange(6, dtype=np.int64), (2, 1))
    out = []
    for art, name in ((tiny_artifact, "onnxruntime"), (built, "tensorrt")):
        engine = runtime.load(art, backend=name)
        c = engine.config
        cache = engine.backend.new_cache(2, 8)
        engine.backend.bind_rope(cache, *rope_tables(default_inv_freq(c.head_dim, c.rope_theta), 1.0, 64))
        out.append(engine.backend.step(cache, prompts, lengths, lengths - 1, rows))
    valid = [(0, slice(0, 6)), (1, slice(0, 3))]  # padded rows of the second prompt are not defined
    for b, s in valid:
        np.testing.assert_allclose(out[1][b, s], out[0][b, s], atol=1e-3, rtol=0)


def test_gate_up_blocks_engine_matches_onnxruntime(tiny_checkpoint: Path, tiny_artifact: Path, plugin_lib: Path,
                                                   tmp_path: Path):
    """An artifact exported with gate/up rows in 16-row blocks (the plugin's gate_up_block field; the
    tiny model's sizes do not allow 128): built and stepped like the default one."""
    from exporter.export import export
    from runtime.cli import main

    art = export(tiny_checkpoint, tmp_path / "art", target="tensorrt", gate_up_block=16)
    result = CliRunner().invoke(main, ["build", str(art), "--plugin-lib", str(plugin_lib), "--max-batch", "2",
                                       "--max-context", "64"])
    assert result.exit_code == 0, result.output
    _assert_engine_matches_onnxruntime(art, tiny_artifact, [[9707, 11, 1879, 0, 220], [151644]], 8)
