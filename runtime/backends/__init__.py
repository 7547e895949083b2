"""Backends run one forward step of an exported artifact; the engine owns everything else.

Protocol (duck-typed, see OnnxRuntimeBackend):
    new_cache(batch, capacity) -> cache          KV buffers, allocated once per request batch
    bind_rope(cache, cos, sin)                   rotary tables for the request (YaRN or not)
    step(cache, input_ids, query_seqlens, seqlens_k, logits_indices) -> logits [B, N, V] float32
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QmoeError
from ..manifest import Manifest

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")


class BackendError(QmoeError, RuntimeError):
    pass


def open_backend(artifact: Path, manifest: Manifest, name: str = "auto", device: str = "auto",
                 threads: int | None = None):
    """`threads`: ONNX Runtime's intra-op threads (default: its own choice); TensorRT ignores it."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if name == "tensorrt" or (name == "auto" and manifest.target == "tensorrt"):
        from ..trt.backend import TensorRTBackend

        return TensorRTBackend(artifact, manifest, device=device)
    from .onnxrt import OnnxRuntimeBackend

    return OnnxRuntimeBackend(artifact, manifest, device=device, threads=threads)
