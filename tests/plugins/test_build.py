"""Builds the native libraries and checks them without a GPU.

- libqmoe_kernels.so (needs nvcc + cmake): compiles warning-free for sm_80 and sm_90a, exports exactly
  the C ABI of qmoe_kernels.h, its structs match the ctypes mirrors, and the launchers validate
  arguments (error codes) before touching the GPU.
- libqmoe_trt_plugins.so, once per TensorRT header set in third_party/tensorrt-*/include (fetched
  from NVIDIA's TensorRT OSS repository; see plugins/README.md): compiles against those headers,
  exports only getCreators and setLoggerFinder, and tests/plugins/trt_smoke.cpp drives its creators and plugins through
  TensorRT's interfaces, checked here against runtime/contract.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import contract
from tests.plugins import kernels as K

ROOT = K.ROOT
HEADER = K.KERNELS_DIR / "qmoe_kernels.h"
TRT_INCLUDES = sorted(p for p in (ROOT / "third_party").glob("tensorrt-*/include") if (p / "NvInfer.h").exists())
CUDA_INCLUDE = Path("/usr/local/cuda/include")

needs_toolchain = pytest.mark.skipif(
    not (K.nvcc_available() and shutil.which("cmake") and shutil.which("nm")),
    reason="needs nvcc, cmake and nm",
)
pytestmark = [needs_toolchain, pytest.mark.slow]


def _build(build_dir: Path, *args: str) -> Path:
    proc = subprocess.run([str(ROOT / "scripts" / "build_plugins.sh"), "--werror", "--build-dir", str(build_dir), *args],
                          capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "warning" not in log.lower(), log[-6000:]
    assert "C7510" not in log, log[-6000:]  # ptxas: wgmma pipeline serialised across a call (slow GEMMs)
    return build_dir / "lib"


def _exported(lib: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    # Global text/data symbols only (lower-case letters are local; nm -D lists none of those).
    return {line.split()[-1] for line in out.splitlines() if len(line.split()) == 3 and line.split()[1].isupper()}


@pytest.fixture(scope="module")
def kernels_lib() -> Path:
    return _build(ROOT / "build" / "plugins-test") / "libqmoe_kernels.so"


@pytest.fixture(scope="module", params=TRT_INCLUDES, ids=lambda p: p.parent.name)
def trt_build(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    include: Path = request.param
    lib = _build(ROOT / "build" / f"plugins-test-{include.parent.name}", "--trt-include", str(include),
                 "--cutlass", "off")  # the wrappers do not depend on it; the kernels build above covers it
    return lib / "libqmoe_trt_plugins.so", include


def test_kernels_export_exactly_the_c_abi(kernels_lib: Path) -> None:
    declared = set(re.findall(r"^\w[\w\s\*]*?\b(qmoe_\w+)\(", HEADER.read_text(), flags=re.M))
    assert "qmoe_moe_forward" in declared and "qmoe_rotary_forward" in declared
    assert _exported(kernels_lib) == declared


def _c_layout(struct: str, fields: list[str]) -> list[int]:
    """sizeof and offsetof of a qmoe_kernels.h struct, from the C compiler."""
    src = "#include <stddef.h>\n#include <stdio.h>\n#include \"qmoe_kernels.h\"\nint main(void) {\n"
    src += f'printf("%zu\\n", sizeof({struct}));\n'
    src += "".join(f'printf("%zu\\n", offsetof({struct}, {f}));\n' for f in fields)
    src += "return 0; }\n"
    exe = ROOT / "build" / "plugins-test" / f"layout_{struct}"
    exe.parent.mkdir(parents=True, exist_ok=True)
    c = exe.with_suffix(".c")
    c.write_text(src)
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", f"-I{K.KERNELS_DIR}", f"-I{CUDA_INCLUDE}", str(c), "-o",
                    str(exe)], check=True, capture_output=True)
    return [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]


@pytest.mark.skipif(not (shutil.which("gcc") and (CUDA_INCLUDE / "cuda_runtime_api.h").exists()),
                    reason="needs gcc and the CUDA headers")
@pytest.mark.parametrize("struct, mirror", [("qmoe_moe_params", K.MoeParams), ("qmoe_rotary_params", K.RotaryParams)])
def test_ctypes_structs_match_the_header(struct: str, mirror: type[ctypes.Structure]) -> None:
    names = [name for name, _ in mirror._fields_]
    size, *offsets = _c_layout(struct, names)
    assert size == ctypes.sizeof(mirror)
    assert offsets == [getattr(mirror, n).offset for n in names]


def _params(**kw: int) -> K.MoeParams:
    p = K.MoeParams(num_tokens=5, hidden_size=64, num_experts=8, top_k=2, norm_topk_prob=0, moe_intermediate_size=32,
                    shared_intermediate_size=48, dtype=K.DTYPE_BF16)
    for ptr in ("hidden", "router_weight", "gate_up_weight", "down_weight", "shared_gate_up_weight",
                "shared_down_weight", "shared_expert_gate_weight", "output"):
        setattr(p, ptr, 0x10000)  # never dereferenced: every case below fails or returns before a launch
    p.workspace = 0x20000
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_feature_bits_match_the_header() -> None:
    """kernels.py's FEATURE_* constants and names (benchmarks print them) are the header's QMOE_FEATURE_* bits."""
    defined = {int(v): n.lower() for n, v in re.findall(r"#define QMOE_FEATURE_(\w+) (\d+)", HEADER.read_text())}
    assert defined == K.FEATURE_NAMES
    assert all(getattr(K, f"FEATURE_{name.upper()}") == bit for bit, name in defined.items())


def test_kernels_report_the_cutlass_path(kernels_lib: Path) -> None:
    """scripts/build_plugins.sh --cutlass auto builds the Hopper GEMMs exactly when the headers are there."""
    have_headers = (ROOT / "third_party" / "cutlass" / "include" / "cutlass" / "cutlass.h").exists()
    assert bool(K.Kernels(kernels_lib).features() & K.FEATURE_SM90_GEMM) == have_headers


# Every switch on, QMOE_TILE_ROWS away from its default.
EXPERIMENTAL = {"QMOE_PDL": "1", "QMOE_ROUTER_TC": "1", "QMOE_PERMUTE_CTAS": "64", "QMOE_SHARED_STREAM": "8",
                "QMOE_DECODE_SPLIT": "1", "QMOE_DECODE_MMA": "64", "QMOE_SHARED_INTERLEAVE": "32",
                "QMOE_TILE_ROWS": "96", "QMOE_DECODE_MAX_TOKENS": "2", "QMOE_SWAP_AB": "128", "QMOE_GEMM_PDL": "1",
                "QMOE_SKIP_PAD": "1"}
SWITCH_BITS = K.SWITCH_BITS
# On by default since the H200 lease of stop 20 (plugins/results/NOTES.md); QMOE_SHARED_INTERLEAVE
# unset is "auto" (spread at 48-128 mean routed rows per expert), and since stop 21 QMOE_SHARED_STREAM
# unset too (side stream up to 8 mean routed rows), which features() reports as on.
DEFAULT_BITS = (K.FEATURE_PDL | K.FEATURE_ROUTER_TC | K.FEATURE_PERMUTE_MULTI | K.FEATURE_DECODE_SPLIT
                | K.FEATURE_SHARED_INTERLEAVE | K.FEATURE_SHARED_STREAM)


def _probe(lib: Path, env: dict[str, str]) -> tuple[int, list[int]]:
    """features() and workspace sizes at 1/64/4096 tokens in a fresh process (switches are read once)."""
    code = ("import ctypes, json, sys\n"
            "from tests.plugins import kernels as K\n"
            "from tests.plugins.test_build import _params\n"
            "k = K.Kernels(sys.argv[1])\n"
            "sizes = [k.lib.qmoe_moe_workspace_size(ctypes.byref(_params(num_tokens=t))) for t in (1, 64, 4096)]\n"
            "print(json.dumps([k.features(), sizes]))\n")
    base = {k: v for k, v in os.environ.items() if k not in EXPERIMENTAL}
    proc = subprocess.run([sys.executable, "-c", code, str(lib)], env={**base, **env}, cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    features, sizes = json.loads(proc.stdout)
    return features, sizes


def test_schedule_switches_follow_the_environment_not_the_workspace(kernels_lib: Path) -> None:
    """The QMOE_* switches (defaults: plugins/README.md) are read from the environment and never
    change the workspace size, so a TensorRT engine built under one setting (getWorkspaceSize) runs
    under another (enqueue)."""
    default_features, default_sizes = _probe(kernels_lib, {})
    assert default_features & SWITCH_BITS == DEFAULT_BITS
    on_features, on_sizes = _probe(kernels_lib, EXPERIMENTAL)
    assert on_features & SWITCH_BITS == SWITCH_BITS
    off_features, off_sizes = _probe(kernels_lib, K.SWITCHES_OFF)
    assert off_features & SWITCH_BITS == K.FEATURE_TILE_ROWS  # 96 is not the default threshold
    assert on_sizes == off_sizes == default_sizes
    # Empty values and junk mean the default; "0" and a single CTA mean off.
    junk_features, _ = _probe(kernels_lib, {"QMOE_PDL": "", "QMOE_ROUTER_TC": "", "QMOE_PERMUTE_CTAS": "lots",
                                            "QMOE_SHARED_STREAM": "", "QMOE_DECODE_SPLIT": "",
                                            "QMOE_DECODE_MMA": "none", "QMOE_SHARED_INTERLEAVE": "x",
                                            "QMOE_TILE_ROWS": "96 rows", "QMOE_DECODE_MAX_TOKENS": "two",
                                            "QMOE_SWAP_AB": "all", "QMOE_GEMM_PDL": "sometimes",
                                            "QMOE_SKIP_PAD": "perhaps"})
    assert junk_features & SWITCH_BITS == DEFAULT_BITS
    for name, bit in (("QMOE_PDL", K.FEATURE_PDL), ("QMOE_ROUTER_TC", K.FEATURE_ROUTER_TC),
                      ("QMOE_DECODE_SPLIT", K.FEATURE_DECODE_SPLIT), ("QMOE_SHARED_INTERLEAVE", K.FEATURE_SHARED_INTERLEAVE),
                      ("QMOE_SHARED_STREAM", K.FEATURE_SHARED_STREAM)):
        assert _probe(kernels_lib, {name: "0"})[0] & SWITCH_BITS == DEFAULT_BITS & ~bit, name
    assert _probe(kernels_lib, {"QMOE_PERMUTE_CTAS": "1"})[0] & K.FEATURE_PERMUTE_MULTI == 0
    # Boolean switches: numbers, on/off, true/false, yes/no in any case; anything else is the default.
    for value, on in (("off", False), ("FALSE", False), ("00", False), ("no", False), ("-0", False),
                      ("yes", True), ("ON", True), ("2", True), ("maybe", True)):
        assert bool(_probe(kernels_lib, {"QMOE_PDL": value})[0] & K.FEATURE_PDL) == on, value
    # The tile threshold is a number of rows: its default (48) is off, anything else (clamped to
    # 1..2^20) is on, and it changes the workspace no more than the others.
    assert _probe(kernels_lib, {"QMOE_TILE_ROWS": "48"})[0] & K.FEATURE_TILE_ROWS == 0
    for rows in ("0", "1", "99999999"):
        features, sizes = _probe(kernels_lib, {"QMOE_TILE_ROWS": rows})
        assert features & K.FEATURE_TILE_ROWS and sizes == default_sizes, rows
    # QMOE_SWAP_AB is a number of rows too: 0 (the default) is off, 1..2^20 on.
    for rows, on in (("0", False), ("-3", False), ("1", True), ("99999999", True)):
        features, sizes = _probe(kernels_lib, {"QMOE_SWAP_AB": rows})
        assert bool(features & K.FEATURE_SWAP_AB) == on and sizes == default_sizes, rows


SCHED_PROGRAM = r"""
#include "moe_internal.h"
#include <cstdio>
int main() {
    int const experts[] = {1, 2, 7, 8, 64, 256};
    int const parts[] = {1, 2, 5, 8, 32, 64};
    for (int E : experts) for (int P : parts) for (int spread = 0; spread < 2; ++spread) {
        std::printf("%d %d %d", E, P, spread);
        for (int i = 0; i < E + P; ++i) std::printf(" %d", qmoe::sched_entry(i, E, P, spread != 0));
        std::printf("\n");
    }
    long const inter[] = {0, 8, 40, 88, 128, 512, 768, 2560, 20480, 65536};
    int const most[] = {0, 1, 2, 3, 32, 64, 1000};
    for (long Is : inter) for (int n : most) std::printf("parts %ld %d %d\n", Is, n, qmoe::shared_gemm1_parts(Is, n));
    for (long Is : inter) for (int n : most)
        std::printf("wparts %ld %d %d\n", Is, n, qmoe::shared_gemm1_parts(Is, n, true));
    long const tokens[] = {1, 64, 256, 383, 384, 512, 1024, 1025, 4096};
    int const settings[] = {qmoe::kInterleaveAuto, 0, 8};
    for (long T : tokens) for (int set : settings) for (long Is : {0L, 20480L})
        std::printf("auto %ld %d %ld %d\n", T, set, Is, qmoe::interleave_parts(set, T, 8, 64, Is));
    long const few[] = {1, 5, 8, 63, 64, 65, 128, 4096};
    for (long T : few) for (int set : {qmoe::kSharedStreamAuto, 0, 4})
        std::printf("stream %ld %d %d\n", T, set, qmoe::shared_stream_sms_for(set, T, 8, 64));
    return 0;
}
"""


needs_host_compiler = pytest.mark.skipif(not (shutil.which("g++") and (CUDA_INCLUDE / "cuda_runtime.h").exists()),
                                         reason="needs g++ and the CUDA headers")


def _host_program_lines(name: str, source: str, *flags: str) -> list[str]:
    """Output lines of a C++ program built with g++ against the kernels' headers and run on the host."""
    exe = ROOT / "build" / "plugins-test" / name
    exe.parent.mkdir(parents=True, exist_ok=True)
    src = exe.with_suffix(".cpp")
    src.write_text(source)
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", *flags, f"-I{K.KERNELS_DIR}", f"-I{CUDA_INCLUDE}",
                    str(src), "-o", str(exe)], check=True, capture_output=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()


@needs_host_compiler
def test_grouped_gemm_schedule_orders() -> None:
    """moe_internal.h's sched_entry (the Hopper grouped GEMMs' entry order) and shared_gemm1_parts
    (QMOE_SHARED_INTERLEAVE's column slices), compiled from the header and run on the host."""
    lines = _host_program_lines("sched_entry", SCHED_PROGRAM)
    orders = [list(map(int, line.split())) for line in lines
              if not line.startswith(("parts", "wparts", "auto", "stream"))]
    assert len(orders) == 6 * 6 * 2
    from tests.plugins.test_model_schedule import M as model  # scripts/model_schedule.py

    for experts, parts, spread, *entries in orders:
        case = f"E={experts} parts={parts} spread={spread}: {entries}"
        assert model.entry_order(experts, parts, bool(spread)) == entries, case  # the model's copy
        pieces = [(i, v) for i, v in enumerate(entries) if v >= 0]
        routed = [-1 - v for v in entries if v < 0]
        assert routed == list(range(experts)), case  # every routed expert once, in expert order
        assert [v for _, v in pieces] == list(range(parts)), case  # every piece once, in order
        positions = [i for i, _ in pieces]
        n = experts + parts
        if not spread:
            assert positions == list(range(parts)), case  # the shared expert first
        else:
            # Piece j at floor(j n / parts): evenly spread, and piece 0 (the whole shared expert when
            # it is one piece) first.
            assert positions == [j * n // parts for j in range(parts)], case
    got = {(int(is_), int(n)): int(p) for _, is_, n, p in (line.split() for line in lines if line.startswith("parts"))}
    for (inter, most), p in got.items():
        cap = min(most, 64)
        assert 1 <= p <= max(cap, 1) and p & (p - 1) == 0, (inter, most, p)
        if p > 1:
            assert (2 * inter) % (8 * p) == 0, (inter, most, p)  # 16-byte aligned slices
    assert got[(20480, 32)] == 32  # Qwen2-57B: 32 slices of 1280 columns (5 whole 256-column tiles)
    assert got[(20480, 1000)] == 32  # 64 slices would split tiles: whole tiles win
    assert got[(65536, 1000)] == 64  # capped at kMaxSharedParts
    assert got[(512, 32)] == 4  # E64_TOP8's shared expert: whole tiles (4 x 256) before finer slices
    assert got[(88, 32)] == 2 and got[(40, 32)] == 2  # no whole tiles: multiples of 8 columns (88, 40)
    assert got[(768, 32)] == 2  # 1536 = 6 tiles: 2 slices of 3
    assert got[(20480, 3)] == 2 and got[(20480, 0)] == 1 and got[(20480, 1)] == 1 and got[(0, 32)] == 1
    # With SwiGLU in GEMM 1's epilogue (whole_tiles): only slices of whole 256-column tiles, else one.
    whole = {(int(is_), int(n)): int(p) for _, is_, n, p in
             (line.split() for line in lines if line.startswith("wparts"))}
    for (inter, most), p in whole.items():
        assert p == 1 or (2 * inter) % (256 * p) == 0, (inter, most, p)
        assert p == got[(inter, most)] or (p == 1 and (2 * inter) % 512 != 0), (inter, most, p)
    assert whole[(20480, 32)] == 32 and whole[(88, 32)] == 1 and whole[(768, 32)] == 2
    # interleave_parts at the 57B routing (top-8 of 64): a setting wins; unset (-1), 32 slices from 48
    # to 128 mean routed rows per expert (384-1024 tokens) and with a shared expert only.
    auto = {(int(t), int(st), int(is_)): int(p) for _, t, st, is_, p in
            (line.split() for line in lines if line.startswith("auto"))}
    for (tokens, setting, inter), p in auto.items():
        if setting >= 0:
            expected = setting
        else:
            expected = 32 if inter > 0 and 384 <= tokens <= 1024 else 0
        assert p == expected, (tokens, setting, inter, p)
    # shared_stream_sms_for at the 57B routing: a setting wins; unset, 8 SMs for the routing chain up
    # to 8 mean routed rows per expert (64 tokens), no side stream above.
    stream = {(int(t), int(st)): int(n) for _, t, st, n in (line.split() for line in lines if line.startswith("stream"))}
    assert len(stream) == 8 * 3
    for (tokens, setting), sms in stream.items():
        expected = setting if setting >= 0 else (8 if tokens <= 64 else 0)
        assert sms == expected, (tokens, setting, sms)


LAYOUT_PROGRAM = r"""
#include "moe_internal.h"
#include <cstdio>
int main() {
    for (int n : {8, 24, 256, 2560}) for (int b : {0, 8, 128}) if (b == 0 || n % b == 0)
        for (int j = 0; j < n; ++j) for (int up = 0; up < 2; ++up)
            std::printf("row %d %d %d %d %ld\n", n, b, j, up, static_cast<long>(qmoe::gate_up_row(j, up, n, b)));
    long const shapes[][4] = {{1, 8, 2560, 20480}, {4096, 8, 2560, 20480}, {257, 8, 128, 512}, {3, 2, 40, 88},
                              {64, 4, 384, 1280}, {5, 2, 32, 0}};
    for (auto const& s : shapes) {
        long const T = s[0], k = s[1], I = s[2], Is = s[3];
        qmoe::WorkspaceLayout const l = qmoe::workspace_layout(T, 64, 8, k, I, Is, 2);
        std::printf("act %ld %ld %ld %ld %ld %ld %ld %ld\n", T, k, I, Is, static_cast<long>(l.y - l.act),
                    static_cast<long>(qmoe::sm90_act_row(T * k, T, k, I, Is)),
                    static_cast<long>(qmoe::sm90_act_row(T * k + 1, T, k, I, Is)),
                    static_cast<long>(qmoe::sm90_act_row(T * k + T, T, k, I, Is)));
    }
    return 0;
}
"""


@needs_host_compiler
def test_gate_up_rows_and_hopper_act_layout() -> None:
    """moe_internal.h's gate_up_row (the kernels' row of gate/up column j for a gate_up_block) is where
    kernels.interleave_gate_up (the tests' and benchmark's weight layout) puts it, block 0 being gate
    rows then up rows; and sm90_act_row (where the Hopper GEMM 1 writes a permuted row) keeps the T
    shared rows of 2*Is after the T*k routed rows of 2*I, inside the workspace's act region."""
    torch = pytest.importorskip("torch")
    lines = _host_program_lines("layout", LAYOUT_PROGRAM, "-DQMOE_HAS_SM90_GEMM")
    rows: dict[tuple[int, int], dict[tuple[int, int], int]] = {}
    for _, n, b, j, up, row in (line.split() for line in lines if line.startswith("row")):
        rows.setdefault((int(n), int(b)), {})[(int(j), int(up))] = int(row)
    assert set(rows) == {(8, 0), (8, 8), (24, 0), (24, 8), (256, 0), (256, 8), (256, 128), (2560, 0), (2560, 8),
                         (2560, 128)}
    for (n, b), mapping in rows.items():
        ids = torch.arange(2 * n).reshape(1, 2 * n, 1)  # row r holds gate (r < n) or up (r >= n) of r % n
        stored = ids if b == 0 else K.interleave_gate_up({"gate_up_weight": ids}, b)["gate_up_weight"]
        where = {int(v): r for r, v in enumerate(stored.flatten().tolist())}
        assert mapping == {(j, up): where[up * n + j] for j in range(n) for up in (0, 1)}, (n, b)
    acts = [list(map(int, line.split()[1:])) for line in lines if line.startswith("act")]
    assert len(acts) == 6
    for T, k, inter, shared, region_bytes, first_shared, second_shared, end in acts:
        assert first_shared == T * k * 2 * inter  # after the routed rows
        assert second_shared == first_shared + 2 * shared  # shared rows are 2*Is apart
        assert end == T * k * 2 * inter + T * 2 * shared
        assert 2 * end <= region_bytes  # bf16/fp16 elements inside the act region


def test_launchers_validate_before_touching_the_gpu(kernels_lib: Path) -> None:
    lib = K.Kernels(kernels_lib)
    size = lib.lib.qmoe_moe_workspace_size
    check = lib.lib.qmoe_moe_check

    def status(**kw: int) -> int:
        p = _params(**kw)
        if "workspace_size" not in kw:
            p.workspace_size = size(ctypes.byref(p))
        return check(ctypes.byref(p))

    assert status() == K.OK
    assert status(hidden_size=60) == K.ERR_BAD_SHAPE  # not a multiple of 8
    assert status(moe_intermediate_size=36) == K.ERR_BAD_SHAPE
    assert status(top_k=9) == K.ERR_BAD_SHAPE  # > num_experts
    assert status(num_experts=257, top_k=2) == K.ERR_BAD_SHAPE
    assert status(dtype=K.DTYPE_FP32) == K.ERR_BAD_DTYPE
    assert status(path=K.PATH_PREFILL_WMMA) == K.OK
    assert status(path=4) == K.ERR_BAD_SHAPE
    assert status(gate_up_weight=0) == K.ERR_NULL_POINTER
    assert status(down_weight=0x10008) == K.ERR_MISALIGNED
    assert status(workspace=0x20080) == K.ERR_MISALIGNED  # workspace needs 256 bytes
    assert status(workspace_size=100) == K.ERR_WORKSPACE
    # gate_up_block: a multiple of 8 dividing I (32) and Is (48), or 0; the shared expert's size only
    # counts when there is one.
    for block, expected in ((0, K.OK), (8, K.OK), (16, K.OK), (32, K.ERR_BAD_SHAPE), (12, K.ERR_BAD_SHAPE),
                            (-8, K.ERR_BAD_SHAPE), (K.GATE_UP_FUSED_BLOCK, K.ERR_BAD_SHAPE)):
        assert status(gate_up_block=block) == expected, block
    assert status(gate_up_block=32, shared_intermediate_size=0) == K.OK
    # No shared expert: its pointers are not needed.
    assert status(shared_intermediate_size=0, shared_gate_up_weight=0, shared_down_weight=0,
                  shared_expert_gate_weight=0) == K.OK
    assert status(shared_expert_gate_weight=0) == K.ERR_NULL_POINTER
    # The router alone needs the workspace too (its logits live there).
    p = _params(workspace=0)
    assert lib.lib.qmoe_moe_route(ctypes.byref(p), 0x30000, 0x30000, 0x30000, None) == K.ERR_NULL_POINTER
    # Zero tokens: nothing to do, nothing launched (this machine may have no GPU at all).
    p = _params(num_tokens=0, output=0)
    assert lib.lib.qmoe_moe_forward(ctypes.byref(p), None) == K.OK
    rp = K.RotaryParams(0, 4, 4, 2, 8, 16, K.DTYPE_FP16)
    assert lib.lib.qmoe_rotary_forward(ctypes.byref(rp), None) == K.OK
    rp = K.RotaryParams(1, 4, 2, 4, 8, 16, K.DTYPE_FP16)  # more kv heads than heads
    assert lib.lib.qmoe_rotary_forward(ctypes.byref(rp), None) == K.ERR_BAD_SHAPE

    # Never smaller for more tokens (a TensorRT engine sizes it once for its profile's largest T and
    # runs every smaller T in it): every T up to 1100, then around the 4096-row router reserve.
    for shape in ({}, {"hidden_size": 3584, "num_experts": 64, "top_k": 8, "moe_intermediate_size": 2560,
                       "shared_intermediate_size": 20480}, {"shared_intermediate_size": 0}):
        tokens = [*range(1, 1101), *range(3990, 4200), 8192]
        seq = [size(ctypes.byref(_params(num_tokens=t, **shape))) for t in tokens]
        drops = [(tokens[i], tokens[i + 1]) for i in range(len(seq) - 1) if seq[i + 1] < seq[i]]
        assert not drops, f"{shape}: workspace shrinks at {drops[:5]}"

    # Workspace grows with the token count and covers the two large per-row buffers.
    sizes = [size(ctypes.byref(_params(num_tokens=t))) for t in (1, 64, 4096)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3
    T, H, k, I, Is = 4096, 64, 2, 32, 48
    assert sizes[-1] >= 2 * (T * k * I + T * Is) + 2 * (T * k + T) * H
    assert lib.status_string(K.ERR_WORKSPACE).startswith("workspace")


@pytest.mark.skipif(not TRT_INCLUDES, reason="no third_party/tensorrt-*/include (see plugins/README.md)")
def test_trt_plugin_library_exports_only_its_entry_points(trt_build: tuple[Path, Path]) -> None:
    lib, _ = trt_build
    assert _exported(lib) == {"getCreators", "setLoggerFinder"}


def _field_type_code(include: Path, name: str) -> int:
    text = (include / "NvInferPluginBase.h").read_text()
    m = re.search(rf"\b{name}\s*=\s*(\d+)", text)
    assert m, f"{name} not in {include}"
    return int(m.group(1))


@pytest.mark.skipif(not TRT_INCLUDES, reason="no third_party/tensorrt-*/include (see plugins/README.md)")
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_trt_creators_follow_the_contract(trt_build: tuple[Path, Path]) -> None:
    lib, include = trt_build
    exe = lib.parent / "trt_smoke"
    subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-isystem",
                    str(include), "-isystem", str(CUDA_INCLUDE), str(Path(__file__).with_name("trt_smoke.cpp")),
                    "-o", str(exe), "-ldl"], check=True, capture_output=True)
    proc = subprocess.run([str(exe), str(lib)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    creators = {c["name"]: c for c in map(json.loads, proc.stdout.splitlines())}
    assert set(creators) == {spec.name for spec in contract.PLUGINS}
    int32 = _field_type_code(include, "kINT32")
    for spec in contract.PLUGINS:
        c = creators[spec.name]
        assert c["version"] == spec.version
        assert c["namespace"] == contract.PLUGIN_NAMESPACE
        assert c["interface"] == "PLUGIN CREATOR_V3ONE"
        assert c["fields"] == [f.name for f in spec.fields]
        assert c["field_types"] == [int32] * len(spec.fields)
    assert creators[contract.ROUTED_EXPERTS.name]["workspace"] > 0
