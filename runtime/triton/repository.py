"""Writes a Triton model repository that serves a qmoe artifact with the python backend.

    <repo>/README.md                 how to start tritonserver on it (exact commands)
    <repo>/<name>/config.pbtxt       written through Triton's own ModelConfig protobuf
    <repo>/<name>/1/model.py         runtime/triton/model.py, verbatim
    <repo>/<name>/1/artifact/        the artifact, with --copy (else config points at its absolute path)

The model folder is assembled next to the repository and renamed into place, so a polling server
never sees half of it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import manifest as mf
from ..errors import QmoeError
from . import protocol
from .server import readme_text

MODEL_TEMPLATE = Path(__file__).with_name("model.py")
COPIED_ARTIFACT = "artifact"  # folder inside the version folder, with --copy
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class RepositoryError(QmoeError, ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str = "qwen2_moe"
    instances: int = 1
    kind: Literal["cpu", "gpu"] = "cpu"
    copy: bool = False
    python_env: Path | None = None  # EXECUTION_ENV_PATH: the environment the stub activates
    default_max_tokens: int = protocol.DEFAULT_MAX_TOKENS
    max_batch: int = protocol.DEFAULT_MAX_BATCH  # requests sharing a step, per instance
    max_context: int | None = None  # tokens per request the KV cache holds (None: min(model context, 32768))
    speculative_config: str | None = None  # n-gram speculative decoding, vLLM's JSON
    max_num_batched_tokens: int | None = None  # the most tokens one step runs (None: no limit)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise RepositoryError(f"model name {self.name!r} must be letters, digits, '_', '.' or '-'")
        if isinstance(self.instances, bool) or not isinstance(self.instances, int) or self.instances < 1:
            raise RepositoryError(f"instances must be an integer >= 1, got {self.instances!r}")
        if self.kind not in ("cpu", "gpu"):
            raise RepositoryError(f"kind must be 'cpu' or 'gpu', got {self.kind!r}")
        if self.default_max_tokens < 1:
            raise RepositoryError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        for name, low in (("max_batch", 1), ("max_context", 2), ("max_num_batched_tokens", self.max_batch)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise RepositoryError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.speculative_config is not None:
            from ..speculative import NgramSpeculation, SpeculationError

            try:
                NgramSpeculation.from_config(self.speculative_config)
            except SpeculationError as e:
                raise RepositoryError(str(e)) from None
        if self.python_env is not None:
            env = Path(self.python_env).resolve()
            if not (env / "bin" / "activate").is_file():
                raise RepositoryError(f"python env {env} has no bin/activate; give a virtualenv or conda environment")
            object.__setattr__(self, "python_env", env)


def current_python_env() -> Path | None:
    """The running virtualenv (where qmoe is installed), or None outside one."""
    prefix = Path(sys.prefix)
    if sys.prefix != sys.base_prefix and (prefix / "bin" / "activate").is_file():
        return prefix.resolve()
    return None


def model_config(spec: ModelSpec, artifact_param: str):
    """The config.pbtxt message (tritonclient.grpc.model_config_pb2.ModelConfig)."""
    mc = _model_config_pb2()
    config = mc.ModelConfig(name=spec.name, backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    for specs, field in ((protocol.INPUTS, config.input), (protocol.OUTPUTS, config.output)):
        for t in specs:
            entry = field.add(name=t.name, data_type=mc.DataType.Value(t.data_type), dims=[1])
            if t.optional:
                entry.optional = True
    kind = mc.ModelInstanceGroup.KIND_GPU if spec.kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=spec.instances, kind=kind)
    parameters = {"artifact": artifact_param, "default_max_tokens": str(spec.default_max_tokens),
                  "max_batch": str(spec.max_batch)}
    if spec.max_context is not None:
        parameters["max_context"] = str(spec.max_context)
    if spec.speculative_config is not None:
        parameters["speculative_config"] = spec.speculative_config
    if spec.max_num_batched_tokens is not None:
        parameters["max_num_batched_tokens"] = str(spec.max_num_batched_tokens)
    if spec.python_env is not None:
        parameters["EXECUTION_ENV_PATH"] = str(spec.python_env)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def config_text(config) -> str:
    from google.protobuf import text_format  # type: ignore[import-untyped]

    return text_format.MessageToString(config)


def write_repository(artifact: str | Path, repo_dir: str | Path, spec: ModelSpec = ModelSpec(),
                     force: bool = False) -> Path:
    """Writes <repo_dir>/<spec.name> and <repo_dir>/README.md; returns the model folder."""
    artifact = Path(artifact).resolve()
    mf.read(artifact)  # refuse anything that is not a qmoe artifact, with the manifest's own error
    repo = Path(repo_dir).resolve()
    if repo.exists() and not repo.is_dir():
        raise RepositoryError(f"{repo} exists and is not a folder")
    target = repo / spec.name
    if target.exists() and not force:
        raise RepositoryError(f"{target} exists; pass --force to replace it")
    if spec.copy and repo.is_relative_to(artifact):
        raise RepositoryError(f"the repository {repo} is inside the artifact {artifact}; choose another folder")
    config = model_config(spec, COPIED_ARTIFACT if spec.copy else str(artifact))

    created_repo = not repo.exists()
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo.name}.{spec.name}.", dir=repo.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
        version = staging / "1"
        version.mkdir()
        shutil.copyfile(MODEL_TEMPLATE, version / "model.py")
        if spec.copy:
            try:
                shutil.copytree(artifact, version / COPIED_ARTIFACT)
            except shutil.Error as e:  # a list of (src, dst, reason): the first says enough
                src, _, reason = e.args[0][0]
                raise RepositoryError(f"cannot copy {src} into the repository ({reason})") from None
        (staging / "config.pbtxt").write_text(config_text(config), encoding="utf-8")
        _replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_repo:
            with contextlib.suppress(OSError):
                repo.rmdir()  # only if still empty
        raise
    _write_atomic(repo / "README.md", readme_text(repo, spec.name, artifact, spec.copy, spec.python_env))
    return target


def read_config(model_dir: str | Path):
    """Parses <model_dir>/config.pbtxt back into a ModelConfig (what tritonserver reads)."""
    from google.protobuf import text_format  # type: ignore[import-untyped]

    path = Path(model_dir) / "config.pbtxt"
    return text_format.Parse(path.read_text(encoding="utf-8"), _model_config_pb2().ModelConfig())


def _replace(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=new.parent))
    os.rename(target, old / target.name)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2  # type: ignore[import-untyped]
    except ImportError as e:
        raise RepositoryError(
            f"writing a Triton repository needs the triton extra ({e.name} is missing): pip install 'qmoe[triton]'"
        ) from None
    return model_config_pb2
