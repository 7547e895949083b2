"""qmoe.json as written by the exporter, and one-line ManifestErrors for every way it can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime import manifest as mf


def _with(tiny_artifact, tmp_path, edit):
    d = json.loads((tiny_artifact / mf.NAME).read_text())
    d = edit(d)
    (tmp_path / mf.NAME).write_text(json.dumps(d))
    return tmp_path


def test_the_exported_manifest_reads_back(tiny_artifact, tmp_path):
    shutil.copy(tiny_artifact / mf.NAME, tmp_path / mf.NAME)
    m = mf.read(tmp_path)
    assert m.inputs == mf.io_names(m.config.num_hidden_layers).inputs


def _set(**kv):
    return lambda d: {**d, **kv}


@pytest.mark.parametrize("edit, message", [
    (lambda d: [], "a JSON object expected, got list"),
    (_set(hf_config=[1]), "hf_config is [1]"),
    (_set(compute_dtype="bf16"), "compute_dtype is 'bf16', not one of float32, float16, bfloat16"),
    (_set(target=7), "target is 7"),
    (_set(inputs=None), "inputs is None"),
    (_set(opset=True), "opset is True"),
    (_set(outputs=["logits", 3]), "outputs must be a list of names"),
    (lambda d: {**d, "inputs": d["inputs"][:8]}, "inputs/outputs do not match the 2 layers of hf_config"),
    (lambda d: {**d, "hf_config": {**d["hf_config"], "eos_token_id": "abc"}}, "eos_token_id must be a token id"),
    (lambda d: {k: v for k, v in d.items() if k != "rope"}, "corrupt manifest"),
])
def test_a_wrong_manifest_is_one_line_naming_the_file(tiny_artifact, tmp_path, edit, message):
    folder = _with(tiny_artifact, tmp_path, edit)
    with pytest.raises(mf.ManifestError) as e:
        mf.read(folder)
    text = str(e.value)
    assert text.startswith(str(folder / mf.NAME)) and message in text and "\n" not in text, text


Q = {"scheme": "int4", "bits": 4, "block_size": 32, "activations": "float"}


@pytest.mark.parametrize("q, ok", [
    (Q, True),  # written before GPTQ: no method or symmetric, read as round-to-nearest, symmetric
    ({**Q, "method": "rtn", "symmetric": True}, True),
    ({**Q, "method": "gptq", "symmetric": False}, True),
    ({**Q, "method": "awq", "symmetric": False}, True),
    ({**Q, "method": "squeezellm"}, False),
    ({**Q, "method": "rtn", "symmetric": False}, False),  # qmoe's own quantizer has no zero points
    ({**Q, "method": "gptq", "symmetric": "no"}, False),
])
def test_quantization_method_and_symmetry(tiny_artifact, tmp_path, q, ok):
    folder = _with(tiny_artifact, tmp_path, _set(quantization=q))
    if ok:
        assert mf.read(folder).quantization == q
        return
    with pytest.raises(mf.ManifestError) as e:
        mf.read(folder)
    assert "method rtn/gptq" in str(e.value) and "\n" not in str(e.value), e.value
