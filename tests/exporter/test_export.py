"""`qmoe export` as users run it: dtypes, linked weights, and every bad input (one line, exit 1,
nothing left behind)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

import runtime
from exporter.export import export
from runtime.sampling import SamplingParams

QMOE = [sys.executable, "-m", "runtime.cli"]
PROMPTS = [[9707, 11, 1879, 0, 220, 108386], [151644, 872, 198]]


def qmoe(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([*QMOE, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def first_logits(art):
    r = runtime.load(art).generate(PROMPTS, SamplingParams(max_new_tokens=1), output_logits=True)
    return np.stack([x.logits[0] for x in r])


def test_artifact_layout_and_manifest(tiny_artifact, tiny_checkpoint):
    names = {p.name for p in tiny_artifact.iterdir()}
    assert {"model.onnx", "model.onnx.data", "qmoe.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    m = json.loads((tiny_artifact / "qmoe.json").read_text())
    assert m["target"] == "onnxruntime" and m["format_version"] == "1.0" and m["kv_layout"] == "BNSH-shared-buffer"
    assert m["source_checkpoint"] == str(tiny_checkpoint.absolute())
    model = onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False)
    assert model.ir_version == 10
    big = [i for i in model.graph.initializer if np.prod(i.dims) > 1024]
    assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)
    assert any(n.name == "/model/layers/0/self_attn/q_proj/Gemm" for n in model.graph.node)
    assert os.path.getsize(tiny_artifact / "model.onnx") < 1 << 20


def test_link_weights_shares_checkpoint_bytes(tiny_checkpoint, tiny_artifact, tmp_path):
    art = export(tiny_checkpoint, tmp_path / "linked", link_weights=True)
    shards = sorted(p.name for p in tiny_checkpoint.glob("*.safetensors"))
    for name in shards:
        assert os.path.samefile(art / name, tiny_checkpoint / name)  # hard links, no copy
    # only the repacked experts were written
    assert (art / "model.onnx.data").stat().st_size < (tiny_artifact / "model.onnx.data").stat().st_size / 10
    assert np.array_equal(first_logits(art), first_logits(tiny_artifact))


@pytest.mark.parametrize("dtype, atol", [("float16", 5e-2), ("bfloat16", 1e-1)])
def test_reduced_precision_artifacts(tiny_checkpoint, tiny_artifact, tmp_path, dtype, atol):
    """fp16 computes in fp16 (GQA, MoE, Gemm on CPU); bf16 stores bf16 weights and computes in fp32.
    Tolerance vs the fp32 artifact: |delta| <= atol on logits of unit scale."""
    art = export(tiny_checkpoint, tmp_path / dtype, dtype=dtype)
    got, ref = first_logits(art), first_logits(tiny_artifact)
    assert np.abs(got - ref).max() <= atol
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_cli_export_and_run(tiny_checkpoint, tmp_path):
    out = tmp_path / "art"
    r = qmoe("export", tiny_checkpoint, "-o", out)
    assert r.returncode == 0, r.stderr
    r = qmoe("run", out, "--prompt", "你好", "-n", "5", "--raw")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


@pytest.mark.parametrize("case", ["missing", "corrupt", "unsupported", "exists", "target", "dtype", "unwritable",
                                  "head_dim"])
def test_cli_export_errors(case, tiny_checkpoint, tmp_path):
    ck, out = tiny_checkpoint, tmp_path / "out"
    extra = []
    if case == "missing":
        ck, msg = tmp_path / "nope", "no such checkpoint folder"
    elif case in ("corrupt", "unsupported", "head_dim"):
        ck = tmp_path / "ck"
        shutil.copytree(tiny_checkpoint, ck)
        cfg = json.loads((ck / "config.json").read_text())
        if case == "corrupt":
            shard = next(ck.glob("*.safetensors"))
            shard.write_bytes(shard.read_bytes()[:1000])
            msg = "truncated"
        elif case == "unsupported":
            cfg["model_type"] = "mixtral"
            msg = "model_type is 'mixtral'; qmoe supports only 'qwen2_moe'"
        else:
            from exporter.tiny import tiny_config, write_checkpoint

            shutil.rmtree(ck)
            write_checkpoint(ck, tiny_config(num_attention_heads=8, num_key_value_heads=2), tokenizer=False)
            cfg = json.loads((ck / "config.json").read_text())
            msg = "head_dim 8 is not a multiple of 16"
        (ck / "config.json").write_text(json.dumps(cfg))
    elif case == "exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        msg = "already exists (use --force to replace it)"
    elif case == "target":
        extra, msg = ["--target", "openvino"], "Invalid value for '--target'"
    elif case == "dtype":
        extra, msg = ["--dtype", "int4"], "Invalid value for '--dtype'"
    else:
        blocker = tmp_path / "file"  # a file where a folder is needed: unwritable even for root
        blocker.write_text("x")
        out, msg = blocker / "out", "cannot write there"
    r = qmoe("export", ck, "-o", out, *extra)
    assert r.returncode == (2 if case in ("target", "dtype") else 1)  # 2: a usage error, as click's
    assert msg in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    if case == "exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]  # no temp folder left


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_link_weights_with_shards_of_one_name_in_subfolders(tiny_checkpoint, tiny_artifact, tmp_path):
    """Shards a/model.safetensors, b/model.safetensors, ... each get a link of their own: the source
    checkpoint is never written (a second link of one name used to copy over the first shard)."""
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    moved = {}
    for i, name in enumerate(sorted(set(index["weight_map"].values()))):
        (ck / f"s{i}").mkdir()
        (ck / name).rename(ck / f"s{i}" / "model.safetensors")
        moved[name] = f"s{i}/model.safetensors"
    assert len(moved) >= 2
    index["weight_map"] = {k: moved[v] for k, v in index["weight_map"].items()}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    before = {p: _sha(p) for p in ck.glob("s*/model.safetensors")}
    art = export(ck, tmp_path / "linked", link_weights=True)
    assert {p: _sha(p) for p in ck.glob("s*/model.safetensors")} == before
    assert np.array_equal(first_logits(art), first_logits(tiny_artifact))


def test_output_that_is_the_checkpoint_by_another_path_is_refused(tiny_checkpoint, tmp_path):
    """--force must not replace the checkpoint (or a folder holding it) reached through `..` or a
    symlink; the checkpoint stays as it was."""
    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    (tmp_path / "here").symlink_to(tmp_path)
    # the shards in a subfolder the index points into
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    (ck / "sub").mkdir()
    for name in set(index["weight_map"].values()):
        (ck / name).rename(ck / "sub" / name)
    index["weight_map"] = {k: f"sub/{v}" for k, v in index["weight_map"].items()}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    before = sorted(str(p.relative_to(ck)) for p in ck.rglob("*"))
    for out in (tmp_path / "here" / "ck", ck / ".." / "ck", ck / "sub" / ".." / "..", tmp_path, ck / "sub"):
        r = qmoe("export", ck, "-o", out, "--force")
        assert r.returncode == 1 and "must not be the checkpoint folder or contain it" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
    assert sorted(str(p.relative_to(ck)) for p in ck.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_force_through_dotdot_replaces_the_artifact_cleanly(tiny_checkpoint, tmp_path):
    art = export(tiny_checkpoint, tmp_path / "art")
    (art / "stale.txt").write_text("old")
    export(tiny_checkpoint, tmp_path / "art" / ".." / "art", force=True)
    assert (tmp_path / "art" / "qmoe.json").is_file() and not (tmp_path / "art" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_failed_output_removes_the_folders_it_created(tmp_path):
    from exporter.atomic import atomic_dir

    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "kept" / "a" / "b" / "out") as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("export failed")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())
    import errno

    from runtime.errors import QmoeError

    with pytest.raises(QmoeError, match=r"kept/new: no space left on the device \(writing out\)"):
        with atomic_dir(tmp_path / "kept" / "new" / "out"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not any((tmp_path / "kept").iterdir())


def test_sigterm_during_export_leaves_nothing(tiny_checkpoint, tmp_path):
    """SIGTERM (timeout, kill, a container stop) cleans up like Ctrl-C."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.Popen([*QMOE, "export", str(tiny_checkpoint), "-o", str(tmp_path / "out")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*.partial")):
        assert p.poll() is None and time.monotonic() < deadline, "export ended before its temp folder appeared"
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert list(tmp_path.iterdir()) == [], err


def test_a_symlink_in_the_output_place_is_replaced_not_followed(tmp_path):
    """An existing symlink (to a folder, dangling) needs --force like a folder, is replaced by the
    new folder and leaves no .old behind; what it pointed at stays."""
    from exporter.atomic import OutputExistsError, atomic_dir

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("mine")
    for link_to in (tmp_path / "real", tmp_path / "nowhere"):
        out = tmp_path / "out"
        out.symlink_to(link_to)
        with pytest.raises(OutputExistsError):
            with atomic_dir(out):
                pass
        for _ in range(2):  # the second run replaces a real folder
            with atomic_dir(out, force=True) as tmp:
                (tmp / "new.txt").write_text("new")
            assert out.is_dir() and not out.is_symlink() and (out / "new.txt").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]
        assert (tmp_path / "real" / "keep.txt").read_text() == "mine"
        import shutil as sh

        sh.rmtree(out)
