#!/usr/bin/env bash
# One-shot GPU check of plugins/kernels: build, GPU tests, benchmark, compute-sanitizer.
# Results (8 files, no sub-folders) go to $OUT (default build/gpu_check):
#   env.txt          GPU, driver, nvcc, torch, transformers
#   build.log        scripts/build_plugins.sh --werror
#   pytest_gpu.log   pytest -m gpu tests/plugins/test_kernels_gpu.py
#   variants.log     decode-path variant builds timed by the benchmark (VARIANTS, optional)
#   bench.log        scripts/bench_moe_gpu.py (+ bench.json)
#   sanitizer.log    compute-sanitizer memcheck + racecheck on a few test cases
#   summary.txt      one line per stage with its exit code
# Exit code: 0 if every stage passed, else 1. Needs: nvcc, cmake, a CUDA torch, pytest.
# usage: OUT=/some/dir scripts/gpu_check.sh
#   env: PYTHON (default python3), ARCH (default 90a), SANITIZE=0 skips compute-sanitizer,
#        the QMOE_* switches of plugins/README.md (exported: every stage runs under them),
#        LIB=path/libqmoe_kernels.so uses that build (no build stage), VARIANTS / VARIANT_TOKENS below.
# Stage limits add up to 10 minutes (the device tool's per-command limit); typical total is 4-6.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/build/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
status=0

stage() {  # stage NAME LOG TIMEOUT_S CMD...: runs CMD with output to LOG, records its exit code
    local name=$1 log=$2 limit=$3
    shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    echo "$name: rc=$rc (${limit}s limit, took $((SECONDS - t0))s)" | tee -a "$summary"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nvcc --version | tail -2
    "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    "$py" -c "import transformers; print('transformers', transformers.__version__)" || echo "transformers: missing"
    "$py" -c "import pytest; print('pytest', pytest.__version__)" || echo "pytest: missing"
    env | grep '^QMOE_' || echo "QMOE_* switches: none set"
} >"$out/env.txt" 2>&1

if [ -n "${LIB:-}" ]; then
    # A library built elsewhere with the same nvcc (saves the ~70 s CUTLASS compile of a lease).
    export QMOE_KERNELS_LIB=$LIB
    echo "build: skipped, using $LIB" | tee -a "$summary"
# Hopper only by default: the A100 (sm_80) code is compile-checked on the CPU machine already.
elif ! stage build "$out/build.log" 150 scripts/build_plugins.sh --werror --arch "${ARCH:-90a}"; then
    echo "build failed: see build.log" | tee -a "$summary"
    exit 1
fi

# One process per test group: a sticky CUDA error in one group cannot fail the others.
: >"$out/pytest_gpu.log"
# The Hopper switch tests (a fresh process per setting) get a group of their own.
for group in "routing or rotary or bad_arguments" "decode" "wmma" "prefill" "interleave_switch or tile_rows_switch" \
    "swap_ab_switch or gemm_pdl_switch" "gate_up_block or fused_swiglu" "skip_pad" \
    "not (routing or rotary or bad_arguments or decode or wmma or prefill or interleave_switch or tile_rows_switch or swap_ab_switch or gemm_pdl_switch or gate_up_block or fused_swiglu or skip_pad)"; do
    echo "=== -k '$group'" >>"$out/pytest_gpu.log"
    stage "gpu_tests[$group]" "$out/pytest_gpu.part" 120 "$py" -m pytest -q -p no:cacheprovider -m gpu -rfE \
        -k "$group" tests/plugins/test_kernels_gpu.py
    cat "$out/pytest_gpu.part" >>"$out/pytest_gpu.log"
done
rm -f "$out/pytest_gpu.part"

stage bench "$out/bench.log" 120 "$py" scripts/bench_moe_gpu.py --out "$out/bench.json"

# Out-of-bounds accesses in every kernel variant (WMMA BM 32/64/128, decode, CUTLASS small/large
# tiles, both rotary code paths); shared-memory races in the hand-written kernels. No caching allocator, so each tensor is its own allocation for memcheck.
t=tests/plugins/test_kernels_gpu.py
cases=(
    "$t::test_forward[e64_top8-64-fp16-raw-uniform-decode]"
    "$t::test_forward[e64_top8-64-fp16-raw-uniform-wmma]"
    "$t::test_forward[odd_small-257-bf16-norm-skewed-decode]"
    "$t::test_forward[odd_small-257-bf16-norm-skewed-wmma]"
    "$t::test_forward[odd_small-4096-bf16-raw-uniform-wmma]"
    "$t::test_forward[odd_small-257-bf16-norm-skewed-prefill]"
    "$t::test_forward[e64_top8-4096-fp16-raw-uniform-prefill]"
    "$t::test_forward[e64_top8-3-bf16-raw-skewed-prefill]"
    "$t::test_without_shared_expert[3-prefill]"
    "$t::test_gate_up_block_one_call[3]"
    "$t::test_gate_up_block_one_call[4096]"
    "$t::test_routing[odd_small-257-bf16-norm-uniform]"
    "$t::test_routing[e64_top8-3-fp16-raw-skewed]"
    "$t::test_rotary[2-37-odd_head-bf16-out]"
    "$t::test_rotary[2-37-qwen2_57b-fp16-inplace]"
)
if [ "${SANITIZE:-1}" = 0 ]; then
    echo "sanitizer: skipped (SANITIZE=0)" | tee -a "$summary"
elif command -v compute-sanitizer >/dev/null; then
    {
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 70 compute-sanitizer --tool memcheck --error-exitcode 9 \
            "$py" -m pytest -q -p no:cacheprovider -m gpu "${cases[@]}"
        rc_mem=$?
        timeout 80 compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 \
            "$py" -m pytest -q -p no:cacheprovider -m gpu "${cases[3]}" "${cases[4]}" "${cases[11]}" "${cases[12]}"
        rc_race=$?
        echo "memcheck rc=$rc_mem racecheck rc=$rc_race"
        [ "$rc_mem" -eq 0 ] && [ "$rc_race" -eq 0 ]
    } >"$out/sanitizer.log" 2>&1
    rc=$?
    echo "sanitizer: rc=$rc" | tee -a "$summary"
    [ "$rc" -eq 0 ] || status=1
else
    echo "sanitizer: skipped (compute-sanitizer not on PATH)" | tee -a "$summary"
fi

# Variants, timed by the benchmark at VARIANT_TOKENS (default "1 8"). VARIANTS="NAME:SPEC;...":
# SPEC "@path/lib.so" is a library built elsewhere; "env:K=V ..." runs the library under test with
# those environment variables (the QMOE_* switches); else CUDAFLAGS for a build here without CUTLASS.
# Each variant's JSON goes to VARIANT_JSON_DIR (default /tmp)/bench-NAME.json.
IFS=';' read -ra variants <<<"${VARIANTS:-}"
for v in "${variants[@]}"; do
    name=${v%%:*}
    spec=${v#*:}
    {
        echo "=== variant $name ($spec)"
        venv=()
        vlib=${QMOE_KERNELS_LIB:-build/plugins/lib/libqmoe_kernels.so}
        if [ "${spec:0:1}" = "@" ]; then
            vlib=${spec:1}
        elif [ "${spec:0:4}" = "env:" ]; then
            read -ra venv <<<"${spec:4}"
        else
            vlib="build/plugins-$name/lib/libqmoe_kernels.so"
            CUDAFLAGS="$spec" scripts/build_plugins.sh --arch "${ARCH:-90a}" --cutlass off --build-dir "build/plugins-$name" >/dev/null
        fi &&
            env "${venv[@]}" QMOE_KERNELS_LIB="$vlib" timeout 60 "$py" scripts/bench_moe_gpu.py \
                --no-transformers --tokens ${VARIANT_TOKENS:-1 8} --out "${VARIANT_JSON_DIR:-/tmp}/bench-$name.json"
    } >>"$out/variants.log" 2>&1
    echo "variant $name ($spec): rc=$?" | tee -a "$summary"
done

grep -E "^=== |passed|failed|error" "$out/pytest_gpu.log" | tee -a "$summary"
exit "$status"
