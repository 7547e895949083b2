"""TensorRT: `qmoe build` (build.py: ONNX -> model.engine) and the TensorRT backend (backend.py).

Nothing here imports TensorRT or cuda-python at module level: the pure parts (optimisation
profiles, the manifest record, version checks) are importable and tested everywhere, and a
missing TensorRT is one line for the user, not a traceback.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import QmoeError

ENGINE_FILE = "model.engine"
PLUGIN_FILE = "libqmoe_trt_plugins.so"  # the plugin library, copied next to the engine by `qmoe build`
RECORD_KEY = "tensorrt"  # Manifest.extra[RECORD_KEY]: what `qmoe build` made, see build.record()

INSTALL_HINT = ("pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12 cuda-python, "
                "or run inside an NGC container (nvcr.io/nvidia/tensorrt:25.xx-py3)")


class TensorRTError(QmoeError, RuntimeError):
    pass


class TensorRTMissingError(TensorRTError):
    pass


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTMissingError(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from None
    if not hasattr(tensorrt, "Builder"):  # e.g. only tensorrt-stubs' folder, imported as a namespace package
        raise TensorRTMissingError(f"TensorRT is not installed (only its type stubs); {INSTALL_HINT}")
    return tensorrt


def available() -> bool:
    """Whether TensorRT and cuda-python import (says nothing about a GPU being present)."""
    from .device import cudart

    try:
        import_tensorrt()
        cudart()
    except TensorRTMissingError:
        return False
    return True
