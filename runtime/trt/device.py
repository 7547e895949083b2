"""The few CUDA runtime calls the TensorRT layer needs, through cuda-python (no torch, no pycuda):
the device's compute capability, one stream, raw device allocations and async copies on it.

Every cuda-python call returns (error, *values); `_ok` turns a failed call into one TensorRTError
that names the call and CUDA's own error name.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from . import INSTALL_HINT, TensorRTError, TensorRTMissingError

ALIGN = 256  # cudaMalloc's own alignment; sub-allocations keep it


def cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise TensorRTMissingError(f"cuda-python is not installed; {INSTALL_HINT}") from None
    return runtime


def _ok(call: str, result: Any) -> Any:
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        raise TensorRTError(f"CUDA {call} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def current_device() -> tuple[str, str]:
    """(compute capability 'major.minor', device name) of the current CUDA device."""
    rt = cudart()
    dev = _ok("cudaGetDevice", rt.cudaGetDevice())
    prop = _ok("cudaGetDeviceProperties", rt.cudaGetDeviceProperties(dev))
    name = prop.name.decode(errors="replace").rstrip("\0") if isinstance(prop.name, bytes) else str(prop.name)
    return f"{prop.major}.{prop.minor}", name


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


class Stream:
    """One CUDA stream; every copy and every TensorRT launch of a backend goes on it, in order."""

    def __init__(self) -> None:
        self._rt = cudart()
        self.stream = _ok("cudaStreamCreate", self._rt.cudaStreamCreate())
        self.handle = int(self.stream)  # what TensorRT's execute_async_v3 takes

    def synchronize(self) -> None:
        _ok("cudaStreamSynchronize", self._rt.cudaStreamSynchronize(self.stream))

    def upload(self, dst: int, array: np.ndarray) -> None:
        """Host -> device. From pageable memory the call returns once the source has been staged,
        so `array` may be dropped right after."""
        a = np.ascontiguousarray(array)
        _ok("cudaMemcpyAsync", self._rt.cudaMemcpyAsync(dst, a.ctypes.data, a.nbytes,
                                                        self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def download(self, out: np.ndarray, src: int) -> None:
        """Device -> host into `out` (C-contiguous); valid after synchronize()."""
        assert out.flags.c_contiguous
        _ok("cudaMemcpyAsync", self._rt.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes,
                                                        self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def zero(self, ptr: int, nbytes: int) -> None:
        _ok("cudaMemsetAsync", self._rt.cudaMemsetAsync(ptr, 0, nbytes, self.stream))

    def close(self) -> None:
        if self.stream is not None:
            self._rt.cudaStreamDestroy(self.stream)
            self.stream = None


def malloc(nbytes: int) -> int:
    rt = cudart()
    try:
        return int(_ok("cudaMalloc", rt.cudaMalloc(max(nbytes, 1))))
    except TensorRTError as e:
        raise TensorRTError(f"{e} (asked for {nbytes / 2**30:.2f} GiB; use a smaller batch or context)") from None


def free_all(ptrs: list[int]) -> None:
    """Finalizer of device allocations; never raises (it runs at garbage collection)."""
    try:
        rt = cudart()
        for p in ptrs:
            rt.cudaFree(p)
    except Exception:  # noqa: BLE001  (interpreter shutdown, a dead context: nothing left to free)
        pass
    ptrs.clear()
