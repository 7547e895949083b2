"""Where a tritonserver is and how to start one on a generated repository.

Two servers are covered:
- a stock Triton (NGC container `nvcr.io/nvidia/tritonserver:<yy.mm>-py3`): its python backend
  ships a stub, so `tritonserver --model-repository REPO` is enough once qmoe is installed in the
  container's python3 (or in the environment named by EXECUTION_ENV_PATH);
- the one inside the `nvidia-pytriton` wheel (no Docker): `pytriton/tritonserver/bin/tritonserver`,
  shared libraries in `site-packages/nvidia_pytriton.libs`, and a python backend folder without
  its stub: the stubs sit in `python_backend_stubs/<python X.Y>/`. pytriton copies the backend
  folder and drops in the stub for the running Python before each start; `prepare_backends` does
  the same.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .protocol import PARAMETERS


@dataclass(frozen=True)
class WheelServer:
    """The tritonserver shipped in the nvidia-pytriton wheel."""

    root: Path  # site-packages/pytriton/tritonserver
    libs: Path  # site-packages/nvidia_pytriton.libs (wheel) or tritonserver/external_libs (editable)

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, python_version: str | None = None) -> Path:
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def find_wheel_server() -> WheelServer | None:
    """The nvidia-pytriton wheel's server, without importing pytriton (slow); None if absent."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(list(spec.submodule_search_locations)[0])
    root = package / "tritonserver"
    libs = package.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        libs = root / "external_libs"
    server = WheelServer(root, libs)
    return server if server.binary.is_file() and server.stub().is_file() else None


def prepare_backends(server: WheelServer, dest: str | Path, python_version: str | None = None) -> Path:
    """Makes a --backend-directory at `dest`: the wheel's python backend plus the stub for the
    given Python (default: this one). Returns `dest`."""
    folder = Path(dest) / "python"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(server.python_backend / name, folder / name)
    shutil.copy2(server.stub(python_version), folder / "triton_python_backend_stub")
    return Path(dest)


def server_env(server: WheelServer, python_bin: str | Path | None = None,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: the wheel's libraries on LD_LIBRARY_PATH and, as pytriton does,
    `python_bin` (the bin folder of the Python that has qmoe) first on PATH, since the stub takes
    its sys.path from the first python3 there (unless EXECUTION_ENV_PATH is set)."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = _prepend(str(server.libs), env.get("LD_LIBRARY_PATH"))
    if python_bin is not None:
        env["PATH"] = _prepend(str(python_bin), env.get("PATH"))
    return env


def server_args(server: WheelServer, repo: str | Path, backends: str | Path, address: str = "127.0.0.1",
                http_port: int = 8000, grpc_port: int = 8001, metrics: bool = False,
                shm_prefix: str | None = None) -> list[str]:
    """tritonserver's command line. The python backend's /dev/shm regions get a prefix unique to
    this start (as pytriton does), so leftovers can be traced to a server."""
    shm_prefix = shm_prefix or f"qmoe{os.getpid()}-{secrets.token_hex(4)}"
    args = [
        str(server.binary),
        f"--model-repository={Path(repo).resolve()}",
        f"--backend-directory={Path(backends).resolve()}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--http-address={address}", f"--http-port={http_port}",
        f"--grpc-address={address}", f"--grpc-port={grpc_port}",
        f"--allow-metrics={'true' if metrics else 'false'}",
    ]
    if metrics:
        args.append(f"--metrics-address={address}")
    return args


def readme_text(repo: Path, name: str, artifact: Path, copied: bool, python_env: Path | None) -> str:
    """README.md of a generated repository, with the exact commands for this machine."""
    env_note = (
        f"The config's `EXECUTION_ENV_PATH` parameter makes the Python backend activate `{python_env}` "
        "before it starts the stub, so the stub imports qmoe from there whatever the server's PATH is."
        if python_env is not None else
        "The stub imports qmoe from the first `python3` on the server's PATH: install qmoe there, or regenerate "
        "with `--python-env` naming a virtualenv that has it."
    )
    source = f"a copy of `{artifact}` in `{name}/1/artifact/`" if copied else f"`{artifact}` (absolute path)"
    lines = [
        f"# Triton model repository: `{name}`",
        "",
        f"Generated by `qmoe triton`. The model `{name}` is a decoupled (streaming) python-backend model that",
        f"runs the qmoe runtime on {source}.",
        "",
        "## Start the server",
        "",
        "Stock Triton (e.g. the NGC container `nvcr.io/nvidia/tritonserver:<yy.mm>-py3`, with qmoe installed",
        "in the Python the backend uses):",
        "",
        "```sh",
        f"tritonserver --model-repository {shlex.quote(str(repo))}",
        "```",
        "",
    ]
    wheel = find_wheel_server()
    if wheel is not None:
        env_bin = python_env / "bin" if python_env is not None else Path(sys.executable).parent
        stub = wheel.stub()
        lines += [
            "The `tritonserver` of the nvidia-pytriton wheel on this machine (no Docker; its python backend",
            f"folder lacks the stub, so copy it together with the stub for Python {stub.parent.name}):",
            "",
            "```sh",
            "BACKENDS=$(mktemp -d) && mkdir \"$BACKENDS/python\"",
            f"cp {shlex.quote(str(wheel.python_backend / 'libtriton_python.so'))} "
            f"{shlex.quote(str(wheel.python_backend / 'triton_python_backend_utils.py'))} "
            f"{shlex.quote(str(stub))} \"$BACKENDS/python/\"",
            f"PATH={shlex.quote(str(env_bin))}:$PATH "
            f"LD_LIBRARY_PATH={shlex.quote(str(wheel.libs))}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} \\",
            f"  {shlex.quote(str(wheel.binary))} --model-repository {shlex.quote(str(repo))} "
            "--backend-directory \"$BACKENDS\" \\",
            "  --backend-config=python,shm-region-prefix-name=qmoe$$",
            "```",
            "",
        ]
    lines += [
        "## The Python the stub runs",
        "",
        env_note,
        "That Python needs numpy < 2 with the stub of Triton 24.10 (2.51, the one in nvidia-pytriton 0.7.0).",
        "",
        "## Requests (gRPC streaming)",
        "",
        "Inputs (TYPE_STRING, shape [1]): `prompt` or `text_input` (text) or `messages` (JSON list of {role,",
        "content}), and optionally `sampling_parameters`: a JSON object with "
        + ", ".join(f"`{p}`" for p in PARAMETERS) + "; TYPE_BOOL `stream` and `exclude_input_in_output`",
        "(text_input defaults to the vLLM backend's: not streamed, the prompt in text_output).",
        "Each response carries `text_delta` and `text_output`; the final one (flag COMPLETE_FINAL) adds",
        "`finish_reason`, `prompt_tokens` and `completion_tokens`. A bad request gets one error response.",
        "",
        "```python",
        "import json, numpy as np, tritonclient.grpc as grpcclient",
        "c = grpcclient.InferenceServerClient(\"localhost:8001\")",
        "c.start_stream(callback=lambda result, error: print(error or result.as_numpy(\"text_delta\")[0].decode(),",
        "                                                       end=\"\", flush=True))",
        "inputs = []",
        "for key, value in {\"prompt\": \"Hello\", \"sampling_parameters\": json.dumps({\"max_tokens\": 32})}.items():",
        "    inputs.append(grpcclient.InferInput(key, [1], \"BYTES\"))",
        "    inputs[-1].set_data_from_numpy(np.array([value.encode()], dtype=np.object_))",
        f"c.async_stream_infer({name!r}, inputs)",
        "c.stop_stream()  # waits for the responses",
        "```",
        "",
        "## Requests (HTTP, Triton's generate extension)",
        "",
        "```bash",
        f"curl -s localhost:8000/v2/models/{name}/generate -d '{{\"text_input\": \"Hello\", "
        "\"parameters\": {\"max_tokens\": 32}}'",
        f"curl -sN localhost:8000/v2/models/{name}/generate_stream -d '{{\"text_input\": \"Hello\", "
        "\"stream\": true, \"parameters\": {\"max_tokens\": 32}}'",
        "```",
        "",
    ]
    return "\n".join(lines)


def _prepend(entry: str, value: str | None) -> str:
    return f"{entry}:{value}" if value else entry
