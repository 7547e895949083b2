"""`qmoe triton` / write_repository: the files a tritonserver reads, parsed back with Triton's protobuf."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient.grpc", reason="needs the triton extra (tritonclient)")

from runtime.cli import main  # noqa: E402
from runtime.triton import ModelSpec, RepositoryError, read_config, write_repository  # noqa: E402
from runtime.triton import protocol  # noqa: E402
from runtime.triton.repository import MODEL_TEMPLATE  # noqa: E402


def test_config_is_a_decoupled_python_model(tiny_artifact: Path, tmp_path: Path):
    from tritonclient.grpc import model_config_pb2 as mc  # type: ignore[import-untyped]

    model = write_repository(tiny_artifact, tmp_path / "repo", ModelSpec(instances=3))
    config = read_config(model)
    assert config.name == "qwen2_moe" and config.backend == "python" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in config.input] == [
        (t.name, t.data_type, [1], True) for t in protocol.INPUTS]
    assert [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
        (t.name, t.data_type, [1]) for t in protocol.OUTPUTS]
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_CPU and group.count == 3
    assert config.parameters["artifact"].string_value == str(tiny_artifact.resolve())
    assert config.parameters["default_max_tokens"].string_value == str(protocol.DEFAULT_MAX_TOKENS)
    assert config.parameters["max_batch"].string_value == str(protocol.DEFAULT_MAX_BATCH)
    for absent in ("EXECUTION_ENV_PATH", "max_context", "speculative_config", "max_num_batched_tokens"):
        assert absent not in config.parameters
    spec = ModelSpec(max_batch=2, max_context=512, speculative_config='{"num_speculative_tokens": 4}',
                     max_num_batched_tokens=64)
    config = read_config(write_repository(tiny_artifact, tmp_path / "repo2", spec))
    keys = ("max_batch", "max_context", "speculative_config", "max_num_batched_tokens")
    assert {k: config.parameters[k].string_value for k in keys} == {
        "max_batch": "2", "max_context": "512", "speculative_config": '{"num_speculative_tokens": 4}',
        "max_num_batched_tokens": "64"}
    assert (model / "1" / "model.py").read_bytes() == MODEL_TEMPLATE.read_bytes()
    assert sorted(p.name for p in model.parent.iterdir()) == ["README.md", "qwen2_moe"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "repo2"]  # no staging folder left behind


def test_copy_puts_a_loadable_artifact_in_the_version_folder(tiny_artifact: Path, tmp_path: Path):
    import runtime

    model = write_repository(tiny_artifact, tmp_path / "repo", ModelSpec(name="m", kind="gpu", copy=True))
    config = read_config(model)
    assert config.parameters["artifact"].string_value == "artifact"  # relative to the version folder
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    copied = model / "1" / "artifact"
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in tiny_artifact.iterdir())
    assert runtime.load(copied).tokenizer.encode("hi") == runtime.load(tiny_artifact).tokenizer.encode("hi")


def test_python_env_becomes_execution_env_path(tiny_artifact: Path, tmp_path: Path):
    env = tmp_path / "venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "activate").write_text("")
    model = write_repository(tiny_artifact, tmp_path / "repo", ModelSpec(python_env=env))
    assert read_config(model).parameters["EXECUTION_ENV_PATH"].string_value == str(env.resolve())
    assert str(env.resolve()) in (model.parent / "README.md").read_text()
    with pytest.raises(RepositoryError, match="has no bin/activate"):
        ModelSpec(python_env=tmp_path)


def test_existing_model_needs_force_and_other_models_stay(tiny_artifact: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    model = write_repository(tiny_artifact, repo, ModelSpec(instances=1))
    with pytest.raises(RepositoryError, match="exists; pass --force"):
        write_repository(tiny_artifact, repo, ModelSpec(instances=2))
    assert read_config(model).instance_group[0].count == 1
    write_repository(tiny_artifact, repo, ModelSpec(instances=2), force=True)
    assert read_config(model).instance_group[0].count == 2
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "other", "qwen2_moe"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "a/b"}, "model name 'a/b'"),
    ({"instances": 0}, "instances must be an integer >= 1"),
    ({"kind": "tpu"}, "kind must be 'cpu' or 'gpu'"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"max_context": 1}, "max_context must be an integer >= 2"),
    ({"max_batch": 4, "max_num_batched_tokens": 3}, "max_num_batched_tokens must be an integer >= 4"),
    ({"speculative_config": '{"method": "eagle", "num_speculative_tokens": 2}'}, "only \"ngram\""),
])
def test_bad_specs(kwargs, message):
    with pytest.raises(RepositoryError, match=message):
        ModelSpec(**kwargs)


def test_cli_writes_a_repository_and_reports_errors_in_one_line(tiny_artifact: Path, tmp_path: Path):
    runner = CliRunner()
    repo = tmp_path / "repo"
    args = ["triton", str(tiny_artifact), "-o", str(repo), "--name", "tiny", "--instances", "2",
            "--python-env", "none", "--max-tokens", "32"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    config = read_config(repo / "tiny")
    assert config.instance_group[0].count == 2 and "EXECUTION_ENV_PATH" not in config.parameters
    assert config.parameters["default_max_tokens"].string_value == "32"
    readme = (repo / "README.md").read_text()
    assert f"tritonserver --model-repository {repo.resolve()}" in readme

    again = runner.invoke(main, args)
    assert again.exit_code == 1 and again.output.strip().count("\n") == 0 and "--force" in again.output
    not_artifact = runner.invoke(main, ["triton", str(tmp_path), "-o", str(tmp_path / "r2")])
    assert not_artifact.exit_code == 1 and "qmoe.json" in not_artifact.output
    assert not (tmp_path / "r2").exists()


def test_a_failed_copy_is_one_line_and_leaves_no_repository(tiny_artifact: Path, tmp_path: Path, monkeypatch):
    """A disk that fills while --copy copies the artifact (shutil.copytree raises one shutil.Error
    listing every file): one line naming the first file, and the folder it created is removed."""
    import shutil

    def full_disk(src, dst, *args, **kwargs):
        raise shutil.Error([(str(Path(src) / "model.onnx.data"), str(Path(dst) / "model.onnx.data"),
                             "[Errno 28] No space left on device")] * 20)

    monkeypatch.setattr(shutil, "copytree", full_disk)
    with pytest.raises(RepositoryError) as e:
        write_repository(tiny_artifact, tmp_path / "repo", ModelSpec(copy=True))
    assert str(e.value) == (f"cannot copy {tiny_artifact.resolve() / 'model.onnx.data'} into the repository "
                            "([Errno 28] No space left on device)")
    assert list(tmp_path.iterdir()) == []
