"""libqmoe_kernels.so on a CUDA GPU against the torch references (moe_reference.py, checked against
transformers on CPU by test_moe_reference.py). Builds the library with scripts/build_plugins.sh first.

Tolerances. The kernels take bf16/fp16 inputs, accumulate in fp32 and round three times (SwiGLU
activations, weighted expert outputs, final sum); the reference computes in float64 from the same
inputs. Unit roundoff u: bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4. Allowed: relative RMS error
2.5u (bf16 1e-2, fp16 1.2e-3) and max error 8u of the largest output (bf16 3e-2, fp16 4e-3).

Routing is tested on inputs whose fp32 dot products are exact (moe_reference's exact grid), so the
kernel and the reference round bit-identical logits and only exact ties (broken differently by
torch.topk and the kernel) are left out; the experts are tested with the kernel's own routing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.plugins import kernels as K  # noqa: E402
from tests.plugins import moe_reference as ref  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOKENS = [1, 3, 64, 257, 4096]
SHAPES = {"e64_top8": ref.E64_TOP8, "odd_small": ref.ODD_SMALL}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ROOT = Path(__file__).resolve().parents[2]
PATHS = {"decode": K.PATH_DECODE, "prefill": K.PATH_PREFILL, "wmma": K.PATH_PREFILL_WMMA}


@pytest.fixture(scope="module")
def lib() -> K.Kernels:
    return K.load()


def _case(shape: ref.MoeShape, tokens: int, dtype: torch.dtype, skew: bool, shared: bool = True):
    favoured = shape.top_k + 2 if skew else None
    w = ref.make_weights(shape, dtype, "cuda", favoured=favoured)
    if not shared:
        w = {k: v for k, v in w.items() if not k.startswith("shared")}
    x = ref.make_hidden(tokens, shape.hidden, dtype, "cuda", seed=tokens, skew=skew)
    return w, x


def _assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    u = UNIT_ROUNDOFF[dtype]
    diff = got.double() - expected
    scale_rms = expected.pow(2).mean().sqrt().item()
    scale_max = expected.abs().max().item()
    assert scale_rms > 1e-2, f"{what}: reference output is ~0, the comparison would prove nothing"
    rel_rms = diff.pow(2).mean().sqrt().item() / scale_rms
    rel_max = diff.abs().max().item() / scale_max
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    assert rel_rms <= 2.5 * u and rel_max <= 8 * u, f"{what}: rel RMS {rel_rms:.2e}, rel max {rel_max:.2e} (u={u:.1e})"


@pytest.mark.parametrize("skew", [False, True], ids=["uniform", "skewed"])
@pytest.mark.parametrize("norm", [False, True], ids=["raw", "norm"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_routing(lib: K.Kernels, shape: ref.MoeShape, tokens: int, dtype: torch.dtype, norm: bool, skew: bool) -> None:
    favoured = shape.top_k + 2 if skew else None
    w = ref.make_weights(shape, dtype, "cuda", favoured=favoured, exact_router=True)
    x = ref.make_hidden(tokens, shape.hidden, dtype, "cuda", seed=tokens, skew=skew, exact=True)
    ids, weights, shared_gate = lib.moe_route(x, w, shape.top_k, norm)
    r = ref.route(x, w, shape.top_k, norm)
    clear = r.tie_gap > 0  # logits are identical in both: only exact ties at the k-th place are ambiguous
    assert clear.float().mean().item() >= 0.9
    assert (ids >= 0).all() and (ids < shape.experts).all()
    assert all(len(set(row)) == shape.top_k for row in ids.tolist()), "an expert chosen twice"
    if skew:
        assert len(torch.unique(ids)) <= shape.top_k + 2, "skewed routing should hit only the favoured experts"

    # Same expert sets; weights compared in expert-id order (order inside the top-k may differ on ties).
    ours_ids, order = torch.sort(ids[clear].long(), dim=-1)
    ref_ids, ref_order = torch.sort(r.ids[clear], dim=-1)
    assert torch.equal(ours_ids, ref_ids)
    ours_w = torch.gather(weights[clear], 1, order)
    ref_w = torch.gather(r.weights[clear], 1, ref_order)
    assert torch.allclose(ours_w, ref_w, rtol=1e-5, atol=1e-7)
    if norm:
        assert torch.allclose(weights.sum(-1), torch.ones_like(weights[:, 0]), atol=1e-5)
    else:
        assert (weights.sum(-1) < 1 + 1e-5).all()
    assert (weights[:, :-1] >= weights[:, 1:]).all(), "top-k not in descending order"
    assert torch.allclose(shared_gate, r.shared_gate, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("skew", [False, True], ids=["uniform", "skewed"])
@pytest.mark.parametrize("norm", [False, True], ids=["raw", "norm"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward(lib: K.Kernels, shape: ref.MoeShape, tokens: int, dtype: torch.dtype, norm: bool, skew: bool,
                 path: int) -> None:
    _check_forward(lib, shape, tokens, dtype, norm, skew, path, f"T={tokens}")


def _check_forward(lib: K.Kernels, shape: ref.MoeShape, tokens: int, dtype: torch.dtype, norm: bool, skew: bool,
                   path: int, what: str):
    """The layer on `path` against the reference and run twice (deterministic); returns (w, x, out)."""
    w, x = _case(shape, tokens, dtype, skew)
    out = lib.moe_forward(x, w, shape.top_k, norm, path=path)
    # The forward pass runs the same router kernel: check the experts with exactly its routing.
    ids, weights, shared_gate = lib.moe_route(x, w, shape.top_k, norm)
    expected = ref.experts(x, w, ids, weights, shared_gate)
    _assert_close(out, expected, dtype, what)
    again = lib.moe_forward(x, w, shape.top_k, norm, path=path)
    assert torch.equal(out, again), f"{what}: forward is not deterministic"
    return w, x, out


def _auto_decode_max_tokens(lib: K.Kernels) -> int:
    """Where AUTO switches from the decode path to the prefill path (for these token counts)."""
    if lib.features() & K.FEATURE_DECODE_MAX_TOKENS:  # QMOE_DECODE_MAX_TOKENS=n
        return int(os.environ["QMOE_DECODE_MAX_TOKENS"])
    if lib.features() & K.FEATURE_DECODE_MMA:  # QMOE_DECODE_MMA=n: decode up to n tokens
        return min(512, int(os.environ["QMOE_DECODE_MMA"]))
    return 8  # 3 on Hopper: the same for 1, 64 and 257 tokens


@pytest.mark.parametrize("tokens", [1, 64, 257])
def test_paths_agree_and_auto(lib: K.Kernels, tokens: int) -> None:
    shape, dtype = ref.E64_TOP8, torch.bfloat16
    w, x = _case(shape, tokens, dtype, skew=False)
    outs = {name: lib.moe_forward(x, w, shape.top_k, False, path=p) for name, p in PATHS.items()}
    auto = lib.moe_forward(x, w, shape.top_k, False)
    assert torch.equal(auto, outs["decode" if tokens <= _auto_decode_max_tokens(lib) else "prefill"])
    u = UNIT_ROUNDOFF[dtype]
    diff = (outs["decode"].double() - outs["prefill"].double()).abs().max().item()
    assert diff <= 8 * u * outs["prefill"].double().abs().max().item()


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("tokens", [1, 64, 257])
def test_cuda_graph_replay_matches_eager(lib: K.Kernels, tokens: int, path: int) -> None:
    """The layer captured once in a CUDA graph (as the runtime and TensorRT may run it), replayed on new
    inputs: bit-identical to eager calls on the same inputs. Catches host state baked into the capture
    (arguments computed from the first input, host copies) and, under the QMOE_* switches, a side
    stream or programmatic launches that do not survive capture."""
    shape, dtype = ref.E64_TOP8, torch.bfloat16
    w, x = _case(shape, tokens, dtype, skew=True)
    static_x = x.clone()
    ws = torch.empty(lib.workspace_size(x, w, shape.top_k), dtype=torch.uint8, device="cuda")
    # Warm up off the default stream (as torch.cuda.graph expects) and capture on the same stream, so
    # that QMOE_SHARED_STREAM's side stream for it exists before the capture and is captured too.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lib.moe_forward(static_x, w, shape.top_k, True, path=path, workspace=ws)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = lib.moe_forward(static_x, w, shape.top_k, True, path=path, workspace=ws)
    for seed in (101, 102):
        fresh = ref.make_hidden(tokens, shape.hidden, dtype, "cuda", seed=seed, skew=seed % 2 == 0)
        static_x.copy_(fresh)
        graph.replay()
        expected = lib.moe_forward(fresh, w, shape.top_k, True, path=path)
        torch.cuda.synchronize()
        assert torch.equal(out, expected), f"T={tokens}: graph replay differs from eager (seed {seed})"


@pytest.mark.parametrize("tokens", [3, 257])
def test_concurrent_streams_match_sequential(lib: K.Kernels, tokens: int) -> None:
    """Two streams run the layer at the same time, each with its own workspace (the contract): the same
    outputs as one after the other. Under QMOE_SHARED_STREAM each main stream has its own side stream."""
    shape, dtype = ref.E64_TOP8, torch.bfloat16
    w, _ = _case(shape, tokens, dtype, skew=False)
    xs = [ref.make_hidden(tokens, shape.hidden, dtype, "cuda", seed=200 + i) for i in range(2)]
    expected = [lib.moe_forward(x, w, shape.top_k, False) for x in xs]
    streams = [torch.cuda.Stream() for _ in xs]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    outs: list[list[torch.Tensor]] = [[], []]
    for _ in range(4):
        for i, (stream, x) in enumerate(zip(streams, xs)):
            with torch.cuda.stream(stream):
                outs[i].append(lib.moe_forward(x, w, shape.top_k, False))
    torch.cuda.synchronize()
    for i in range(2):
        for got in outs[i]:
            assert torch.equal(got, expected[i]), f"stream {i}: differs from the sequential result"


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("tokens", [3, 257])
def test_without_shared_expert(lib: K.Kernels, tokens: int, path: int) -> None:
    shape, dtype = ref.ODD_SMALL, torch.bfloat16
    w, x = _case(shape, tokens, dtype, skew=False, shared=False)
    out = lib.moe_forward(x, w, shape.top_k, True, path=path)
    ids, weights, _ = lib.moe_route(x, w, shape.top_k, True)
    _assert_close(out, ref.experts(x, w, ids, weights, None), dtype, "no shared expert")


@pytest.mark.parametrize("tokens", [64, 257])
@pytest.mark.parametrize("norm", [False, True], ids=["raw", "norm"])
def test_forward_matches_transformers_block(lib: K.Kernels, tokens: int, norm: bool) -> None:
    """End to end against transformers' module: in float32 on the same (bf16-valued) weights, we must
    be no less accurate than transformers' own bf16 execution of the same block."""
    pytest.importorskip("transformers")
    shape, dtype = ref.E64_TOP8, torch.bfloat16
    w = ref.make_weights(shape, dtype, "cuda", exact_router=True)
    x = ref.make_hidden(tokens, shape.hidden, dtype, "cuda", seed=tokens, exact=True)
    with torch.no_grad():
        fp32_block = ref.to_transformers_block(shape, {k: v.float() for k, v in w.items()}, norm)
        exact = ref.transformers_forward(fp32_block, x.float())
        hf_bf16 = ref.transformers_forward(ref.to_transformers_block(shape, w, norm), x)
    out = lib.moe_forward(x, w, shape.top_k, norm)
    # transformers-fp32 routes on unrounded logits: leave out tokens whose k-th and (k+1)-th logits are
    # within one bf16 ulp, where rounding may change the chosen set.
    logits = torch.sort(x.double() @ w["router_weight"].double().T, dim=-1, descending=True).values
    kth = logits[:, shape.top_k - 1]
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(kth.abs().clamp_min(1e-6))))
    clear = logits[:, shape.top_k - 1] - logits[:, shape.top_k] > ulp
    assert clear.float().mean().item() >= 0.5

    def rel_rms(got: torch.Tensor) -> float:
        d = (got.double() - exact.double())[clear]
        return d.pow(2).mean().sqrt().item() / exact.double()[clear].pow(2).mean().sqrt().item()

    u = UNIT_ROUNDOFF[dtype]
    ours, theirs = rel_rms(out), rel_rms(hf_bf16)
    assert ours <= min(4 * u, 1.25 * theirs + 1e-3), f"ours {ours:.2e}, transformers bf16 {theirs:.2e}"


# Token counts for the tensor-core decode: n-tile passes of 1, 2, 4 and 8 tiles with partial tiles,
# groups over 64 rows (several passes, forced decode path) and AUTO's threshold at 64.
MMA_TOKENS = [1, 3, 8, 13, 24, 33, 64, 65, 257]
# Shapes: the test shapes (ODD_SMALL's H = 136 and I = 40 end in partial K steps) and one whose shared
# expert's down projection splits into 8 K-slices of 96.
MMA_SHAPES = {**SHAPES, "split8": ref.MoeShape(hidden=192, experts=16, top_k=4, inter=64, shared_inter=768)}


ALL_ROUTINGS = ((False, False), (False, True), (True, False), (True, True))  # (skew, norm)


def _checked_cases(shapes: dict[str, ref.MoeShape], tokens_list: list[int], path: int, label: str,
                   routings: tuple[tuple[bool, bool], ...] = ALL_ROUTINGS):
    """_check_forward for every shape, token count, dtype and (skew, norm) routing (skewed: most
    routed groups empty; norm: top-k renormalised). Yields (lib, shape, tokens, norm, w, x, out, what)
    for further checks."""
    lib = K.load(build_if_needed=False)
    for shape in shapes.values():
        for tokens in tokens_list:
            for dtype in DTYPES.values():
                for skew, norm in routings:
                    what = f"{label} {shape} T={tokens} {dtype} skew={skew} norm={norm}"
                    w, x, out = _check_forward(lib, shape, tokens, dtype, norm, skew, path, what)
                    yield lib, shape, tokens, norm, w, x, out, what


def mma_decode_cases() -> None:
    """Run in a process with QMOE_DECODE_MMA=64 (switches are read once per process): the decode
    path on tensor cores against the reference, forced and through AUTO (decode up to 64 tokens,
    prefill above)."""
    assert K.load(build_if_needed=False).features() & K.FEATURE_DECODE_MMA, "QMOE_DECODE_MMA is not in effect"
    for lib, shape, tokens, norm, w, x, forced, what in _checked_cases(MMA_SHAPES, MMA_TOKENS, K.PATH_DECODE,
                                                                        "mma decode"):
        auto = lib.moe_forward(x, w, shape.top_k, norm)
        if tokens <= 64:
            assert torch.equal(auto, forced), f"{what}: AUTO did not take the decode path"
        else:
            prefill = lib.moe_forward(x, w, shape.top_k, norm, path=K.PATH_PREFILL)
            assert torch.equal(auto, prefill), f"{what}: AUTO did not take the prefill path"


def _run_with_switch(lib: K.Kernels, switches: dict[str, str], cases: str) -> None:
    """Runs cases() of this module in a fresh process with these QMOE_* switches (they are read once
    per process), beside the other switches of this process (scripts/gpu_session.sh's second pass
    sets the opt-in ones)."""
    env = {**os.environ, **switches}
    if "QMOE_KERNELS_LIB" not in env:
        env["QMOE_KERNELS_LIB"] = str(lib.path)
    code = f"from tests.plugins.test_kernels_gpu import {cases}; {cases}(); print('cases: ok')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "cases: ok" in proc.stdout


def test_decode_mma_switch(lib: K.Kernels) -> None:
    """QMOE_DECODE_MMA=64 (plugins/README.md, schedule switches); QMOE_DECODE_MAX_TOKENS would win."""
    _run_with_switch(lib, {"QMOE_DECODE_MMA": "64", "QMOE_DECODE_MAX_TOKENS": "0"}, "mma_decode_cases")


# QMOE_SHARED_INTERLEAVE=32: shapes whose shared GEMM 1 splits into whole 256-column tiles (slices32:
# 32 x 256, as many pieces as the 57B model's; E64_TOP8: 4 x 256; split8: 2 x 768) or into slices of
# 8-column multiples (ODD_SMALL: 2 x 88); token counts with (<= 512) and without the K-sliced shared
# down projection, small and large tiles.
INTERLEAVE_SHAPES = {**MMA_SHAPES, "slices32": ref.MoeShape(hidden=256, experts=64, top_k=8, inter=128,
                                                            shared_inter=4096)}
# Uniform and skewed routing only: the order of the entries does not depend on the routing weights.
INTERLEAVE_TOKENS = [3, 64, 257, 513, 4096]


def _interleave_cases(shapes: dict[str, ref.MoeShape], tokens_list: list[int]) -> None:
    # The feature bit is on under "auto" too (unset): only the variable says the spread is forced.
    assert os.environ.get("QMOE_SHARED_INTERLEAVE") == "32", "QMOE_SHARED_INTERLEAVE=32 is not set"
    assert K.load(build_if_needed=False).features() & K.FEATURE_SHARED_INTERLEAVE
    for _ in _checked_cases(shapes, tokens_list, K.PATH_PREFILL, "spread shared expert",
                            routings=((False, False), (True, True))):
        pass


def interleave_prefill_cases() -> None:
    """Run in a process with QMOE_SHARED_INTERLEAVE=32 (switches are read once per process): the
    Hopper grouped GEMMs with the shared expert's pieces spread among the routed experts, against the
    reference (skewed routing: most entries between the pieces are M = 0 problems)."""
    _interleave_cases(INTERLEAVE_SHAPES, INTERLEAVE_TOKENS)


def interleave_stream_cases() -> None:
    """The same with QMOE_SHARED_STREAM=8 too: the side stream runs the whole shared GEMM 1, the main
    stream's GEMM 1 has only the routed experts, and GEMM 2's K-slices are spread."""
    assert K.load(build_if_needed=False).features() & K.FEATURE_SHARED_STREAM, "QMOE_SHARED_STREAM is not in effect"
    shapes = {name: INTERLEAVE_SHAPES[name] for name in ("slices32", "odd_small")}
    _interleave_cases(shapes, [3, 257, 4096])  # 257 with GEMM 2's K-slices, 4096 without


def test_shared_interleave_switch(lib: K.Kernels) -> None:
    """QMOE_SHARED_INTERLEAVE=32 (plugins/README.md, schedule switches), alone and with
    QMOE_SHARED_STREAM=8. Not checked here: that the pieces really are spread (only the host test of
    sched_entry sees the order; the output is the same either way)."""
    if torch.cuda.get_device_capability() != (9, 0) or not lib.features() & K.FEATURE_SM90_GEMM:
        pytest.skip("the switch orders the Hopper (sm_90a, CUTLASS) grouped GEMMs only")
    _run_with_switch(lib, {"QMOE_SHARED_INTERLEAVE": "32"}, "interleave_prefill_cases")
    _run_with_switch(lib, {"QMOE_SHARED_INTERLEAVE": "32", "QMOE_SHARED_STREAM": "8"}, "interleave_stream_cases")


def switches_off_cases() -> None:
    """Run in a process with K.SWITCHES_OFF: both paths against the reference."""
    off = K.SWITCH_BITS & ~K.FEATURE_TILE_ROWS  # QMOE_TILE_ROWS=96 is on: not the default threshold
    assert K.load(build_if_needed=False).features() & off == 0, "a switch is still on"
    for path, label in ((K.PATH_DECODE, "decode, switches off"), (K.PATH_PREFILL, "prefill, switches off")):
        for _ in _checked_cases(SHAPES, [1, 64, 257, 4096], path, label, routings=((False, False), (True, True))):
            pass


def decode_threshold_cases() -> None:
    """Run in a process with QMOE_DECODE_MAX_TOKENS=2: AUTO decodes 1-2 tokens and takes the prefill
    path from 3, unless the call's decode_max_tokens says otherwise."""
    lib = K.load(build_if_needed=False)
    assert lib.features() & K.FEATURE_DECODE_MAX_TOKENS, "QMOE_DECODE_MAX_TOKENS is not in effect"
    shape, dtype = ref.E64_TOP8, torch.bfloat16
    for tokens in (1, 2, 3, 4):
        w, x = _case(shape, tokens, dtype, skew=False)
        auto = lib.moe_forward(x, w, shape.top_k, False)
        decode = lib.moe_forward(x, w, shape.top_k, False, path=K.PATH_DECODE)
        prefill = lib.moe_forward(x, w, shape.top_k, False, path=K.PATH_PREFILL)
        assert not torch.equal(decode, prefill), f"T={tokens}: the paths' outputs cannot tell them apart"
        assert torch.equal(auto, decode if tokens <= 2 else prefill), f"T={tokens}: AUTO took the other path"
        by_call = lib.moe_forward(x, w, shape.top_k, False, decode_max_tokens=4)
        assert torch.equal(by_call, decode), f"T={tokens}: the call's decode_max_tokens did not win"


def test_decode_threshold_switch(lib: K.Kernels) -> None:
    """QMOE_DECODE_MAX_TOKENS (plugins/README.md, schedule switches)."""
    _run_with_switch(lib, {"QMOE_DECODE_MAX_TOKENS": "2"}, "decode_threshold_cases")


def test_switches_off(lib: K.Kernels) -> None:
    """Every QMOE_* switch off (the schedule measured on the H100 before stop 20)."""
    _run_with_switch(lib, K.SWITCHES_OFF, "switches_off_cases")


# QMOE_TILE_ROWS: 1 gives every Hopper grouped GEMM 128-row cooperative tiles (also a 3-token layer,
# whose groups have 0-3 rows), 1048576 gives every one 64-row ping-pong tiles (also 4096 tokens).
TILE_ROWS_SHAPES = {name: INTERLEAVE_SHAPES[name] for name in ("e64_top8", "odd_small", "slices32")}
TILE_ROWS_TOKENS = [3, 257, 4096]


def tile_rows_cases() -> None:
    """Run in a process with QMOE_TILE_ROWS set (switches are read once per process): the Hopper
    grouped GEMMs with the other tile height than the default gives these token counts."""
    assert K.load(build_if_needed=False).features() & K.FEATURE_TILE_ROWS, "QMOE_TILE_ROWS is not in effect"
    for _ in _checked_cases(TILE_ROWS_SHAPES, TILE_ROWS_TOKENS, K.PATH_PREFILL, "tile rows",
                            routings=((False, False), (True, True))):
        pass


def test_tile_rows_switch(lib: K.Kernels) -> None:
    """QMOE_TILE_ROWS (plugins/README.md, schedule switches): all 128-row tiles, with
    QMOE_SHARED_STREAM=8 so that the side stream's one group (T rows, 3 at the least) follows the
    threshold too; then all 64-row tiles (the shared expert in the main stream's GEMMs)."""
    if torch.cuda.get_device_capability() != (9, 0) or not lib.features() & K.FEATURE_SM90_GEMM:
        pytest.skip("the switch picks the Hopper (sm_90a, CUTLASS) grouped GEMMs' tiles only")
    _run_with_switch(lib, {"QMOE_TILE_ROWS": "1", "QMOE_SHARED_STREAM": "8"}, "tile_rows_cases")
    _run_with_switch(lib, {"QMOE_TILE_ROWS": "1048576", "QMOE_SHARED_STREAM": "0"}, "tile_rows_cases")


# QMOE_SWAP_AB=1048576: swapped tiles at every size, narrow (32 rows) up to 12 mean rows per group,
# wide (80) above: 3 tokens (narrow; the shared group's 3 rows too), 64 (e64_top8: 8 mean rows,
# narrow; the shared group's 64 rows in two tiles), 257 (32 mean rows: wide) and 4096 (512: wide, a
# weight tile in several row tiles).
SWAP_TOKENS = [3, 64, 257, 4096]


def _kernel_names(lib: K.Kernels, shape: ref.MoeShape, tokens: int, path: int = K.PATH_PREFILL,
                  gate_up_block: int = 0) -> set[str]:
    """The kernels of one layer call (bf16, uniform routing), as the torch profiler names them."""
    from torch.profiler import ProfilerActivity, profile

    w, x = _case(shape, tokens, torch.bfloat16, skew=False)
    if gate_up_block:
        w = K.interleave_gate_up(w, gate_up_block)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        lib.moe_forward(x, w, shape.top_k, False, path=path, gate_up_block=gate_up_block)
        torch.cuda.synchronize()
    return {ev.key for ev in prof.key_averages()}


def _gemm_tiles(lib: K.Kernels, shape: ref.MoeShape, tokens: int) -> set[str]:
    """The CUTLASS tile shapes of one prefill-path layer call."""
    return {t for t in map(K.cutlass_tile, _kernel_names(lib, shape, tokens)) if t is not None}


def swap_ab_cases() -> None:
    """Run in a process with QMOE_SWAP_AB=1048576: the Hopper grouped GEMMs with swapped operands
    against the reference, and the tiles they ran."""
    lib = K.load(build_if_needed=False)
    assert lib.features() & K.FEATURE_SWAP_AB, "QMOE_SWAP_AB is not in effect"
    for _ in _checked_cases(TILE_ROWS_SHAPES, SWAP_TOKENS, K.PATH_PREFILL, "swapped tiles",
                            routings=((False, False), (True, True))):
        pass
    assert _gemm_tiles(lib, ref.E64_TOP8, 3) == {"128x32x64"}
    assert _gemm_tiles(lib, ref.E64_TOP8, 257) == {"128x80x64"}


def test_swap_ab_switch(lib: K.Kernels) -> None:
    """QMOE_SWAP_AB (plugins/README.md, schedule switches): alone, then with the side stream (its one
    group of T rows picks its tiles by T) and the spread shared expert (pieces of swapped entries)."""
    if torch.cuda.get_device_capability() != (9, 0) or not lib.features() & K.FEATURE_SM90_GEMM:
        pytest.skip("the switch picks the Hopper (sm_90a, CUTLASS) grouped GEMMs' tiles only")
    if not lib.features() & (K.FEATURE_SWAP_AB | K.FEATURE_TILE_ROWS):  # this process: the default tiles
        assert _gemm_tiles(lib, ref.E64_TOP8, 3) == {"64x256x64"}  # 64-row ping-pong below 48 mean rows
    _run_with_switch(lib, {"QMOE_SWAP_AB": "1048576", "QMOE_SHARED_STREAM": "0", "QMOE_SHARED_INTERLEAVE": "0"},
                     "swap_ab_cases")
    _run_with_switch(lib, {"QMOE_SWAP_AB": "1048576", "QMOE_SHARED_STREAM": "8", "QMOE_SHARED_INTERLEAVE": "32"},
                     "swap_ab_cases")


def gemm_pdl_cases() -> None:
    """Run in a process with QMOE_GEMM_PDL=1: the Hopper grouped GEMMs launched with programmatic
    dependent launch behind griddepcontrol.wait, against the reference (with and without the side
    stream, small and large tiles), and the wrapper kernel is what ran."""
    lib = K.load(build_if_needed=False)
    assert lib.features() & K.FEATURE_GEMM_PDL and lib.features() & K.FEATURE_PDL, "QMOE_GEMM_PDL is not in effect"
    for _ in _checked_cases(TILE_ROWS_SHAPES, [3, 64, 257, 4096], K.PATH_PREFILL, "gemm pdl",
                            routings=((False, False), (True, True))):
        pass
    gemms = [n for n in _kernel_names(lib, ref.E64_TOP8, 257) if "cutlass" in n]
    assert gemms and all("pdl_gemm_kernel" in n for n in gemms), gemms


def test_gemm_pdl_switch(lib: K.Kernels) -> None:
    """QMOE_GEMM_PDL (plugins/README.md, schedule switches): with the side stream forced on, then off."""
    if torch.cuda.get_device_capability() != (9, 0) or not lib.features() & K.FEATURE_SM90_GEMM:
        pytest.skip("the switch launches the Hopper (sm_90a, CUTLASS) grouped GEMMs only")
    for stream in ("8", "0"):
        _run_with_switch(lib, {"QMOE_GEMM_PDL": "1", "QMOE_PDL": "1", "QMOE_SHARED_STREAM": stream}, "gemm_pdl_cases")


# qmoe_moe_params.gate_up_block: gate/up rows in alternating blocks. 128 (K.GATE_UP_FUSED_BLOCK) is
# the layout whose SwiGLU Hopper's GEMM 1 computes in its epilogue: e64_top8 (I = 128: one 256-row
# tile per expert, Is = 512), wide (I = 384 and Is = 1280: several tiles, a shared expert of 10 blocks)
# and slices32 (QMOE_SHARED_INTERLEAVE's 32 pieces of 256 rows). Other blocks (8 here) take the
# portable paths everywhere; odd_small (I = 40, Is = 88) allows only 8.
BLOCK_SHAPES = {"e64_top8": ref.E64_TOP8, "odd_small": ref.ODD_SMALL,
                "wide": ref.MoeShape(hidden=192, experts=16, top_k=4, inter=384, shared_inter=1280),
                "slices32": INTERLEAVE_SHAPES["slices32"]}
BLOCK_TOKENS = {K.PATH_DECODE: [1, 64], K.PATH_PREFILL: [3, 64, 257, 4096], K.PATH_PREFILL_WMMA: [257]}
# One routing per dtype (the GPU lease's time): bf16 uniform, fp16 skewed (most groups empty) and renormalised.
BLOCK_ROUTINGS = {torch.bfloat16: (False, False), torch.float16: (True, True)}


def _blocks(shape: ref.MoeShape) -> list[int]:
    """8 (every path reads it through gate_up_row; on Hopper the WMMA path) and 128 where it divides."""
    return [b for b in (8, K.GATE_UP_FUSED_BLOCK) if shape.inter % b == 0 and shape.shared_inter % b == 0]


def _check_blocks(lib: K.Kernels, shape: ref.MoeShape, tokens: int, dtype: torch.dtype, skew: bool, norm: bool,
                  path: int, blocks: list[int], what: str, repeat: bool = False) -> dict[int, torch.Tensor]:
    """The layer with its weights in each gate/up block layout against the reference computed from
    the usual layout (gate rows, then up rows), with the kernels' own routing; repeat: run twice
    and require identical outputs. Returns the output of each block."""
    w, x = _case(shape, tokens, dtype, skew)
    ids, weights, shared_gate = lib.moe_route(x, w, shape.top_k, norm)
    expected = ref.experts(x, w, ids, weights, shared_gate)
    outputs = {}
    for block in blocks:
        case = f"{what} {shape} path={path} T={tokens} {dtype} skew={skew} block={block}"
        wb = K.interleave_gate_up(w, block) if block else w  # 0: gate rows, then up rows
        out = lib.moe_forward(x, wb, shape.top_k, norm, path=path, gate_up_block=block)
        _assert_close(out, expected, dtype, case)
        if repeat:
            again = lib.moe_forward(x, wb, shape.top_k, norm, path=path, gate_up_block=block)
            assert torch.equal(out, again), f"{case}: not deterministic"
        outputs[block] = out
    return outputs


def gate_up_block_cases(paths: tuple[int, ...] = tuple(BLOCK_TOKENS)) -> None:
    """Every path with the gate/up rows in alternating blocks, against the reference computed from
    the usual layout (gate rows, then up rows); bf16 with uniform routing, fp16 with skewed."""
    lib = K.load(build_if_needed=False)
    for name, shape in BLOCK_SHAPES.items():
        for path in paths:
            for tokens in BLOCK_TOKENS[path]:
                for dtype, (skew, norm) in BLOCK_ROUTINGS.items():
                    _check_blocks(lib, shape, tokens, dtype, skew, norm, path, _blocks(shape), name, repeat=True)


def test_gate_up_block(lib: K.Kernels) -> None:
    """qmoe_moe_params.gate_up_block on every path; on Hopper with CUTLASS, block 128 runs SwiGLU in
    GEMM 1's epilogue (no SwiGLU pass) and the other blocks the WMMA path, under the default switches
    and with the shared expert's pieces spread (its own process)."""
    gate_up_block_cases()
    if torch.cuda.get_device_capability() != (9, 0) or not lib.features() & K.FEATURE_SM90_GEMM:
        return
    for block, fused, cutlass in ((0, False, True), (K.GATE_UP_FUSED_BLOCK, True, True), (64, False, False)):
        names = _kernel_names(lib, ref.E64_TOP8, 257, gate_up_block=block)
        assert any("SwigluEpilogue" in n for n in names) == fused, (block, sorted(names))
        assert any("swiglu_kernel" in n for n in names) == (cutlass and not fused), (block, sorted(names))
        assert any("cutlass" in n for n in names) == cutlass, (block, sorted(names))
    _run_with_switch(lib, {"QMOE_SHARED_INTERLEAVE": "32", "QMOE_SHARED_STREAM": "0"}, "gate_up_block_prefill_cases")


def gate_up_block_prefill_cases() -> None:
    gate_up_block_cases((K.PATH_PREFILL,))


@pytest.mark.parametrize("tokens", [3, 257, 4096])
def test_gate_up_block_one_call(lib: K.Kernels, tokens: int) -> None:
    """One forced prefill-path call with 128-row gate/up blocks (SwiGLU in the Hopper GEMM 1's
    epilogue; 3 tokens: the side stream and the shared gate in [Combine]; 4096: 128-row tiles):
    scripts/gpu_check.sh runs it under compute-sanitizer."""
    _check_blocks(lib, ref.E64_TOP8, tokens, torch.bfloat16, False, False, K.PATH_PREFILL, [K.GATE_UP_FUSED_BLOCK],
                  "one call")


def fused_switch_cases() -> None:
    """Block 128 on the Hopper prefill path under the switches of this process."""
    lib = K.load(build_if_needed=False)
    for shape in (BLOCK_SHAPES["e64_top8"], BLOCK_SHAPES["wide"]):
        for tokens in (3, 64, 257, 4096):
            for dtype, (skew, norm) in BLOCK_ROUTINGS.items():
                _check_blocks(lib, shape, tokens, dtype, skew, norm, K.PATH_PREFILL, [K.GATE_UP_FUSED_BLOCK], "fused")
    if lib.features() & K.FEATURE_SWAP_AB:
        # 257 tokens (32 mean rows): the fused GEMM 1 (and the side stream's, if on) in 256-column
        # tiles, GEMM 2 in wide swapped tiles.
        names = [n for n in _kernel_names(lib, ref.E64_TOP8, 257, gate_up_block=K.GATE_UP_FUSED_BLOCK) if "cutlass" in n]
        fused = {K.cutlass_tile(n) for n in names if "SwigluEpilogue" in n}
        plain = {K.cutlass_tile(n) for n in names if "SwigluEpilogue" not in n}
        assert fused and all(t is not None and t.split("x")[1] == "256" for t in fused), fused
        assert plain == {"128x80x64"}, plain


def test_fused_swiglu_under_switches(lib: K.Kernels) -> None:
    """Block 128 with the tiles and launches the switches choose: 128-row tiles at every size with the
    side stream at every size; 64-row tiles everywhere; swapped tiles asked for (GEMM 1 keeps its
    256-column tiles, GEMM 2 swaps: checked from the kernels that ran); the GEMMs launched with PDL."""
    if torch.cuda.get_device_capability() != (9, 0) or not lib.features() & K.FEATURE_SM90_GEMM:
        pytest.skip("SwiGLU in GEMM 1's epilogue is the Hopper (sm_90a, CUTLASS) GEMMs' only")
    for switches in ({"QMOE_TILE_ROWS": "1", "QMOE_SHARED_STREAM": "8"},
                     {"QMOE_TILE_ROWS": "1048576", "QMOE_SHARED_STREAM": "0"},
                     {"QMOE_SWAP_AB": "1048576"}, {"QMOE_GEMM_PDL": "1", "QMOE_PDL": "1"}):
        _run_with_switch(lib, switches, "fused_switch_cases")


# QMOE_SKIP_PAD (moe_gemm_sm90.cuh, PadSkippingMainloop): K spans more 64-wide k-tiles than the
# cooperative kernels have stages (12 in GEMM 1, 10 in GEMM 2; the skip needs more), both gate/up
# layouts (block 128: the fused GEMM 1), and 128-row tiles at every size (QMOE_TILE_ROWS=1). Mean
# routed rows per group 0.75 / 16 / 64 / 1024: at 3 and 64 tokens every group ends in a tile's first
# 64 rows (the second warp group skips), at 257 and 4096 in either half; the shared group's 257
# rows leave one row in its last tile, its 4096 fill whole tiles.
SKIP_PAD_SHAPE = ref.MoeShape(hidden=768, experts=16, top_k=4, inter=640, shared_inter=1280)
SKIP_PAD_TOKENS = [3, 64, 257, 4096]


def skip_pad_cases() -> None:
    """Run in a process with QMOE_TILE_ROWS=1 and QMOE_SKIP_PAD set to 0 or 1: the Hopper prefill path
    against the reference (bf16 uniform, fp16 skewed: most groups empty); every output saved to
    $QMOE_TEST_OUT for test_skip_pad_switch's comparison of the two settings."""
    lib = K.load(build_if_needed=False)
    skip = os.environ["QMOE_SKIP_PAD"] == "1"
    assert bool(lib.features() & K.FEATURE_SKIP_PAD) == skip, "QMOE_SKIP_PAD is not as set"
    outputs = {}
    for tokens in SKIP_PAD_TOKENS:
        for dtype, (skew, norm) in BLOCK_ROUTINGS.items():
            got = _check_blocks(lib, SKIP_PAD_SHAPE, tokens, dtype, skew, norm, K.PATH_PREFILL,
                                [0, K.GATE_UP_FUSED_BLOCK], f"skip_pad={int(skip)}", repeat=True)
            outputs.update({f"T={tokens} {dtype} block={block}": out.cpu() for block, out in got.items()})
    torch.save(outputs, os.environ["QMOE_TEST_OUT"])


def test_skip_pad_switch(lib: K.Kernels, tmp_path: Path) -> None:
    """QMOE_SKIP_PAD: the same tiles with and without the math of the warp groups whose rows are all
    padding. Every stored row is the same math in the same order either way, so the outputs must be
    bit-identical; both settings also match the reference."""
    if torch.cuda.get_device_capability() != (9, 0) or not lib.features() & K.FEATURE_SM90_GEMM:
        pytest.skip("QMOE_SKIP_PAD is the Hopper (sm_90a, CUTLASS) GEMMs' only")
    outputs = {}
    for skip in ("0", "1"):
        path = tmp_path / f"skip_pad_{skip}.pt"
        _run_with_switch(lib, {"QMOE_TILE_ROWS": "1", "QMOE_SKIP_PAD": skip, "QMOE_TEST_OUT": str(path)},
                         "skip_pad_cases")
        outputs[skip] = torch.load(path)
    assert outputs["0"].keys() == outputs["1"].keys() and len(outputs["0"]) == 2 * len(SKIP_PAD_TOKENS) * 2
    for case, plain in outputs["0"].items():
        assert torch.equal(plain, outputs["1"][case]), f"{case}: QMOE_SKIP_PAD changed the output"


def test_bad_arguments_raise(lib: K.Kernels) -> None:
    shape = ref.ODD_SMALL
    w, x = _case(shape, 4, torch.bfloat16, skew=False)
    with pytest.raises(K.KernelError, match="dtype"):
        lib.moe_forward(x.float(), w, shape.top_k, False)
    misaligned = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view_as(x).copy_(x)
    with pytest.raises(K.KernelError, match="aligned"):
        lib.moe_forward(misaligned, w, shape.top_k, False)


ROTARY_CASES = {
    # Hq, Hkv, D: Qwen2-57B heads (16-byte vector path), an odd head size (scalar path for 16-bit types)
    "qwen2_57b": (28, 4, 128),
    "odd_head": (6, 2, 24),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", ROTARY_CASES.values(), ids=ROTARY_CASES.keys())
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 37)])
def test_rotary(lib: K.Kernels, case: tuple[int, int, int], dtype: torch.dtype, inplace: bool, batch: int,
                seq: int) -> None:
    from runtime.config import RopeScaling
    from runtime.yarn import rope_tables, yarn_inv_freq_and_attention_factor

    Hq, Hkv, D = case
    P = 4096
    # YaRN tables (attention factor != 1) from the runtime's numpy implementation.
    inv_freq, factor = yarn_inv_freq_and_attention_factor(D, 1e6, RopeScaling(factor=2.0, original_max_position_embeddings=2048))
    cos, sin = (torch.from_numpy(t).cuda() for t in rope_tables(inv_freq, factor, P))
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    q = torch.randn(batch, seq, Hq * D, generator=g).to(dtype).cuda()
    k = torch.randn(batch, seq, Hkv * D, generator=g).to(dtype).cuda()
    pos = torch.randint(0, P, (batch, seq), generator=g).cuda()
    expected_q = ref.rotary(q, cos, sin, pos, Hq, D)
    expected_k = ref.rotary(k, cos, sin, pos, Hkv, D)
    if inplace:
        got_q, got_k = lib.rotary(q, k, cos, sin, pos, Hq, Hkv, D, out=(q, k))
        assert got_q.data_ptr() == q.data_ptr()
    else:
        q0, k0 = q.clone(), k.clone()
        got_q, got_k = lib.rotary(q, k, cos, sin, pos, Hq, Hkv, D)
        assert torch.equal(q, q0) and torch.equal(k, k0), "inputs modified"
    tol = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 1e-6}[dtype]
    for got, exp in ((got_q, expected_q), (got_k, expected_k)):
        assert ((got.double() - exp).abs() <= tol * exp.abs().clamp_min(1.0)).all()


def test_rotary_misaligned_falls_back(lib: K.Kernels) -> None:
    from runtime.yarn import default_inv_freq, rope_tables

    Hq, Hkv, D, P = 4, 2, 128, 64
    cos, sin = (torch.from_numpy(t).cuda() for t in rope_tables(default_inv_freq(D, 1e6), 1.0, P))
    q = torch.randn(1 * 3 * Hq * D + 1, device="cuda", dtype=torch.float16)[1:].view(1, 3, Hq * D)
    k = torch.randn(1, 3, Hkv * D, device="cuda", dtype=torch.float16)
    pos = torch.tensor([[0, 5, 63]], device="cuda")
    got_q, _ = lib.rotary(q, k, cos, sin, pos, Hq, Hkv, D)
    assert torch.allclose(got_q.double(), ref.rotary(q, cos, sin, pos, Hq, D), atol=2e-3 * 4)


def test_hopper_prefill_runs_the_cutlass_grouped_gemm(lib: K.Kernels) -> None:
    """On an H100/H200 with CUTLASS built in, the prefill path is the wgmma grouped GEMM (not WMMA)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS path is Hopper (sm_90a) code")
    if not lib.features() & K.FEATURE_SM90_GEMM:
        pytest.skip("built without CUTLASS (scripts/get_cutlass.sh fetches its headers)")
    names = {path: _kernel_names(lib, ref.E64_TOP8, 257, path) for path in (K.PATH_PREFILL, K.PATH_PREFILL_WMMA)}
    assert any("cutlass" in n for n in names[K.PATH_PREFILL]), sorted(names[K.PATH_PREFILL])
    assert not any("cutlass" in n for n in names[K.PATH_PREFILL_WMMA]), sorted(names[K.PATH_PREFILL_WMMA])
