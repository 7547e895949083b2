"""ctypes bindings of ``libqmoe_kernels.so`` for the tests and ``scripts/bench_moe_gpu.py``.

``plugins/`` is C++/CUDA, not a Python package: the library is built by ``scripts/build_plugins.sh``
(CMake) and loaded here. The structs mirror ``plugins/kernels/qmoe_kernels.h`` field by field;
``test_build.py`` checks their sizes against the C header.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = ROOT / "plugins" / "kernels"
BUILD_DIR = ROOT / "build" / "plugins"
LIB_PATH = BUILD_DIR / "lib" / "libqmoe_kernels.so"
# QMOE_KERNELS_LIB: use this prebuilt library instead (benchmarking a variant build); never rebuilt.
OVERRIDE_LIB = os.environ.get("QMOE_KERNELS_LIB")
ABI_VERSION = 2

OK = 0
ERR_NULL_POINTER = 1
ERR_BAD_SHAPE = 2
ERR_BAD_DTYPE = 3
ERR_MISALIGNED = 4
ERR_WORKSPACE = 5
ERR_CUDA = 6

DTYPE_FP16 = 0
DTYPE_BF16 = 1
DTYPE_FP32 = 2

PATH_AUTO = 0
PATH_DECODE = 1
PATH_PREFILL = 2  # Hopper: CUTLASS wgmma grouped GEMMs when built in, else WMMA
PATH_PREFILL_WMMA = 3

# qmoe_moe_params.gate_up_block for which Hopper's GEMMs compute SwiGLU in GEMM 1's epilogue.
GATE_UP_FUSED_BLOCK = 128

FEATURE_SM90_GEMM = 1
FEATURE_PDL = 2
FEATURE_ROUTER_TC = 4
FEATURE_PERMUTE_MULTI = 8
FEATURE_SHARED_STREAM = 16
FEATURE_DECODE_SPLIT = 32
FEATURE_DECODE_MMA = 64
FEATURE_SHARED_INTERLEAVE = 128
FEATURE_TILE_ROWS = 256
FEATURE_DECODE_MAX_TOKENS = 512
FEATURE_SWAP_AB = 1024
FEATURE_GEMM_PDL = 2048
FEATURE_SKIP_PAD = 4096
FEATURE_NAMES = {FEATURE_SM90_GEMM: "sm90_gemm", FEATURE_PDL: "pdl", FEATURE_ROUTER_TC: "router_tc",
                 FEATURE_PERMUTE_MULTI: "permute_multi", FEATURE_SHARED_STREAM: "shared_stream",
                 FEATURE_DECODE_SPLIT: "decode_split", FEATURE_DECODE_MMA: "decode_mma",
                 FEATURE_SHARED_INTERLEAVE: "shared_interleave", FEATURE_TILE_ROWS: "tile_rows",
                 FEATURE_DECODE_MAX_TOKENS: "decode_max_tokens", FEATURE_SWAP_AB: "swap_ab",
                 FEATURE_GEMM_PDL: "gemm_pdl", FEATURE_SKIP_PAD: "skip_pad"}
# The bits of the QMOE_* schedule switches (all but what the library was built with).
SWITCH_BITS = (FEATURE_PDL | FEATURE_ROUTER_TC | FEATURE_PERMUTE_MULTI | FEATURE_SHARED_STREAM | FEATURE_DECODE_SPLIT
               | FEATURE_DECODE_MMA | FEATURE_SHARED_INTERLEAVE | FEATURE_TILE_ROWS | FEATURE_DECODE_MAX_TOKENS
               | FEATURE_SWAP_AB | FEATURE_GEMM_PDL | FEATURE_SKIP_PAD)
# The schedule before stop 20 (H100 run 4): every switch off, 128-row tiles from 96 mean rows. The
# defaults changed; this stays a setting a user can choose. features() reports only FEATURE_TILE_ROWS
# (96 is not the default threshold).
SWITCHES_OFF = {"QMOE_PDL": "0", "QMOE_ROUTER_TC": "0", "QMOE_PERMUTE_CTAS": "1", "QMOE_SHARED_STREAM": "0",
                "QMOE_DECODE_SPLIT": "0", "QMOE_DECODE_MMA": "0", "QMOE_SHARED_INTERLEAVE": "0",
                "QMOE_TILE_ROWS": "96", "QMOE_DECODE_MAX_TOKENS": "0", "QMOE_SWAP_AB": "0",
                "QMOE_GEMM_PDL": "0", "QMOE_SKIP_PAD": "0"}


_CUTE_TRIPLE = re.compile(r"tuple<(?:cute::)?C<(\d+)>, ?(?:cute::)?C<(\d+)>, ?(?:cute::)?C<(\d+)> ?>")


def cutlass_tile(kernel_name: str) -> str | None:
    """The tile shape "MxNxK" of a CUTLASS grouped-GEMM kernel from its demangled name (profiler or
    Nsight Compute), None for other kernels. The first compile-time triple in the name is the
    cluster shape (1x1x1 here), the next one the tile: 64x256x64 small, 128x256x64 large,
    128x32x64 / 128x80x64 swapped (QMOE_SWAP_AB)."""
    if "cutlass" not in kernel_name:
        return None
    triples = ["x".join(m) for m in _CUTE_TRIPLE.findall(kernel_name)]
    tiles = [t for t in triples if t != "1x1x1"]
    return tiles[0] if tiles else None


class MoeParams(ctypes.Structure):
    _fields_ = [
        ("num_tokens", ctypes.c_int32),
        ("hidden_size", ctypes.c_int32),
        ("num_experts", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("norm_topk_prob", ctypes.c_int32),
        ("moe_intermediate_size", ctypes.c_int32),
        ("shared_intermediate_size", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("path", ctypes.c_int32),
        ("decode_max_tokens", ctypes.c_int32),
        ("gate_up_block", ctypes.c_int32),
        ("hidden", ctypes.c_void_p),
        ("router_weight", ctypes.c_void_p),
        ("gate_up_weight", ctypes.c_void_p),
        ("down_weight", ctypes.c_void_p),
        ("shared_gate_up_weight", ctypes.c_void_p),
        ("shared_down_weight", ctypes.c_void_p),
        ("shared_expert_gate_weight", ctypes.c_void_p),
        ("output", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_size", ctypes.c_size_t),
    ]


class RotaryParams(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32),
        ("seq_len", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("num_positions", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("query", ctypes.c_void_p),
        ("key", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("position_ids", ctypes.c_void_p),
        ("query_out", ctypes.c_void_p),
        ("key_out", ctypes.c_void_p),
    ]


class KernelError(RuntimeError):
    """A qmoe_* function returned an error status."""


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


def _stale(lib: Path) -> bool:
    if not lib.exists():
        return True
    built = lib.stat().st_mtime
    sources = [p for p in KERNELS_DIR.iterdir() if p.suffix in {".cu", ".cuh", ".h", ".txt", ".map"}]
    return any(p.stat().st_mtime > built for p in sources)


def build(*extra: str) -> Path:
    """Builds libqmoe_kernels.so with scripts/build_plugins.sh when missing or older than its sources."""
    if _stale(LIB_PATH) or extra:
        proc = subprocess.run(
            [str(ROOT / "scripts" / "build_plugins.sh"), *extra], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not LIB_PATH.exists():
            raise RuntimeError(f"scripts/build_plugins.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return LIB_PATH


class Kernels:
    """The C functions of one loaded library, with argument types declared."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        lib = ctypes.CDLL(str(path))
        P = ctypes.POINTER
        lib.qmoe_moe_workspace_size.argtypes = [P(MoeParams)]
        lib.qmoe_moe_workspace_size.restype = ctypes.c_size_t
        lib.qmoe_moe_check.argtypes = [P(MoeParams)]
        lib.qmoe_moe_check.restype = ctypes.c_int32
        lib.qmoe_moe_forward.argtypes = [P(MoeParams), ctypes.c_void_p]
        lib.qmoe_moe_forward.restype = ctypes.c_int32
        lib.qmoe_moe_route.argtypes = [P(MoeParams), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.qmoe_moe_route.restype = ctypes.c_int32
        lib.qmoe_rotary_forward.argtypes = [P(RotaryParams), ctypes.c_void_p]
        lib.qmoe_rotary_forward.restype = ctypes.c_int32
        lib.qmoe_status_string.argtypes = [ctypes.c_int32]
        lib.qmoe_status_string.restype = ctypes.c_char_p
        lib.qmoe_kernels_features.argtypes = []
        lib.qmoe_kernels_features.restype = ctypes.c_int32
        lib.qmoe_kernels_abi_version.argtypes = []
        lib.qmoe_kernels_abi_version.restype = ctypes.c_int32
        self.lib = lib
        abi = lib.qmoe_kernels_abi_version()
        if abi != ABI_VERSION:
            raise RuntimeError(f"{path}: ABI version {abi}, tests expect {ABI_VERSION}; rebuild it")

    def features(self) -> int:
        """QMOE_FEATURE_* bits: what the library was built with, and the QMOE_* switches in effect."""
        return int(self.lib.qmoe_kernels_features())

    def status_string(self, status: int) -> str:
        return self.lib.qmoe_status_string(status).decode()

    def _raise(self, what: str, status: int) -> None:
        if status != OK:
            raise KernelError(f"{what}: {self.status_string(status)} (status {status})")

    # --- torch-facing helpers (torch imported lazily: the build tests run without it) ---------

    def moe_params(self, x: Any, weights: dict[str, Any], top_k: int, norm_topk_prob: bool, **kw: Any) -> MoeParams:
        """Params for hidden x [T, H] and the weights of one block (keys as in the contract; gate/up
        rows in the layout of kw ``gate_up_block``, see ``interleave_gate_up``)."""
        gate_up = weights["gate_up_weight"]
        shared = weights.get("shared_gate_up_weight")
        p = MoeParams()
        p.num_tokens = x.shape[0]
        p.hidden_size = x.shape[1]
        p.num_experts = gate_up.shape[0]
        p.top_k = top_k
        p.norm_topk_prob = int(norm_topk_prob)
        p.moe_intermediate_size = gate_up.shape[1] // 2
        p.shared_intermediate_size = 0 if shared is None else shared.shape[0] // 2
        p.dtype = torch_dtype_code(x.dtype)
        p.path = kw.get("path", PATH_AUTO)
        p.decode_max_tokens = kw.get("decode_max_tokens", 0)
        p.gate_up_block = kw.get("gate_up_block", 0)
        p.hidden = x.data_ptr()
        for name in ("router_weight", "gate_up_weight", "down_weight", "shared_gate_up_weight",
                     "shared_down_weight", "shared_expert_gate_weight"):
            t = weights.get(name)
            setattr(p, name, None if t is None else t.data_ptr())
        return p

    def moe_forward(self, x: Any, weights: dict[str, Any], top_k: int, norm_topk_prob: bool, **kw: Any) -> Any:
        """output [T, H] on x's device and current stream; workspace from torch's allocator."""
        import torch

        p = self.moe_params(x, weights, top_k, norm_topk_prob, **kw)
        out = torch.empty_like(x)
        ws = kw.get("workspace")
        need = self.lib.qmoe_moe_workspace_size(ctypes.byref(p))
        if ws is None or ws.numel() < need:
            ws = torch.empty(need, dtype=torch.uint8, device=x.device)
        p.output = out.data_ptr()
        p.workspace = ws.data_ptr()
        p.workspace_size = ws.numel()
        self._raise("qmoe_moe_forward", self.lib.qmoe_moe_forward(ctypes.byref(p), _stream(x)))
        return out

    def workspace_size(self, x: Any, weights: dict[str, Any], top_k: int) -> int:
        return int(self.lib.qmoe_moe_workspace_size(ctypes.byref(self.moe_params(x, weights, top_k, False))))

    def moe_route(self, x: Any, weights: dict[str, Any], top_k: int, norm_topk_prob: bool) -> tuple[Any, Any, Any]:
        """(topk_ids int32 [T, k], topk_weights fp32 [T, k], shared_gate fp32 [T])."""
        import torch

        p = self.moe_params(x, weights, top_k, norm_topk_prob)
        ws = torch.empty(self.lib.qmoe_moe_workspace_size(ctypes.byref(p)), dtype=torch.uint8, device=x.device)
        p.workspace, p.workspace_size = ws.data_ptr(), ws.numel()
        T = x.shape[0]
        ids = torch.empty(T, top_k, dtype=torch.int32, device=x.device)
        w = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
        sg = torch.empty(T, dtype=torch.float32, device=x.device)
        status = self.lib.qmoe_moe_route(ctypes.byref(p), ids.data_ptr(), w.data_ptr(), sg.data_ptr(), _stream(x))
        self._raise("qmoe_moe_route", status)
        return ids, w, sg

    def rotary(self, q: Any, k: Any, cos: Any, sin: Any, position_ids: Any, num_heads: int, num_kv_heads: int,
               head_dim: int, out: tuple[Any, Any] | None = None) -> tuple[Any, Any]:
        """Rotated (query, key); q [B, S, Hq*D], k [B, S, Hkv*D], cos/sin fp32 [P, D/2], ids int64 [B, S]."""
        import torch

        q_out, k_out = out if out is not None else (torch.empty_like(q), torch.empty_like(k))
        p = RotaryParams(q.shape[0], q.shape[1], num_heads, num_kv_heads, head_dim, cos.shape[0],
                         torch_dtype_code(q.dtype), q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                         position_ids.data_ptr(), q_out.data_ptr(), k_out.data_ptr())
        self._raise("qmoe_rotary_forward", self.lib.qmoe_rotary_forward(ctypes.byref(p), _stream(q)))
        return q_out, k_out


def interleave_gate_up(weights: dict[str, Any], block: int) -> dict[str, Any]:
    """The weights with gate_up_weight [E, 2I, H] and shared_gate_up_weight [2Is, H] rearranged from
    gate rows then up rows into blocks of ``block`` rows alternating gate, up (qmoe_moe_params'
    gate_up_block): stored row (j // b) * 2b + u * b + j % b holds gate (u = 0) or up (u = 1) of
    column j. Other entries are passed through."""

    def rows(w: Any) -> Any:
        *lead, two_n, h = w.shape
        n = two_n // 2
        if n % block:
            raise ValueError(f"gate_up_block {block} does not divide the intermediate size {n}")
        v = w.reshape(*lead, 2, n // block, block, h)
        return v.transpose(-4, -3).reshape(w.shape).contiguous()

    out = dict(weights)
    for name in ("gate_up_weight", "shared_gate_up_weight"):
        if out.get(name) is not None:
            out[name] = rows(out[name])
    return out


def torch_dtype_code(dtype: Any) -> int:
    import torch

    codes = {torch.float16: DTYPE_FP16, torch.bfloat16: DTYPE_BF16, torch.float32: DTYPE_FP32}
    if dtype not in codes:
        raise ValueError(f"qmoe kernels take float16, bfloat16 or float32 tensors, got {dtype}")
    return codes[dtype]


def _stream(t: Any) -> int:
    import torch

    return torch.cuda.current_stream(t.device).cuda_stream


@lru_cache(maxsize=1)
def load(build_if_needed: bool = True) -> Kernels:
    """The kernels library, built first if missing or stale (and nvcc exists)."""
    if OVERRIDE_LIB:
        return Kernels(Path(OVERRIDE_LIB))
    if build_if_needed and nvcc_available():
        build()
    if not LIB_PATH.exists():
        raise FileNotFoundError(f"{LIB_PATH} not built: run scripts/build_plugins.sh (needs nvcc and cmake)")
    return Kernels(LIB_PATH)
