#!/usr/bin/env bash
# A GPU lease in two device commands: verifies and times the default kernel schedule and the other
# settings of the QMOE_* switches (plugins/kernels/moe_internal.h) with a library built beforehand on
# the CPU machine (same nvcc 13.0; saves the ~70 s CUTLASS compile on the lease).
#
#   here:    scripts/gpu_session.sh prepare        -> build/carry/libqmoe_kernels.so (sm_90a + CUTLASS)
#                                                     (+ build/carry/<tile variant>.so for TILE_VARIANTS)
#   device:  OUT=$OUT scripts/gpu_session.sh check  (device tool: carry ["build/carry"], timeout_s 500: stop 22
#                                                     added the gate/up block tests, ~1 min over both passes,
#                                                     stop 23 test_skip_pad_switch, ~30 s per pass)
#            OUT=$OUT scripts/gpu_session.sh tune   (same machine while warm; timeout_s 420, or what the
#                                                     lease has left: then GPU_SESSION_BUDGET_S=timeout-20)
#
#   check  scripts/gpu_check.sh (GPU tests, benchmark with transformers, compute-sanitizer) on the
#          default schedule, then again under the opt-in switches (`switches`). ~5 min (H200, stop 20),
#          ~6-7 min with stop 21's and 22's tests (estimate).
#   tune   benchmark only (no transformers) at 1/2/3/4/8/64/512/4096 tokens (the default also at 128,
#          256, 384, 1024 and 2048): the default schedule, the settings in `tune_sets`, the schedule
#          before stop 20 (every switch off) and each tile variant (~20 s each); then Nsight Compute
#          (if present) on one call each (`ncu` specs below; scripts/profile_moe_gpu.py; each only
#          while GPU_SESSION_BUDGET_S allows). ~4-5 min.
# Each command leaves three files in $OUT (the device tool returns at most 8): summary.txt (every
# stage's exit code), compare.md (scripts/compare_bench.py), results.tgz (all logs and JSON).
# Exit code: 0 when every stage passed.
set -uo pipefail
# The C locale for the whole script: source_id's glob must list plugins/kernels in the same order here
# and on the device (a shell's glob sorts by its own LC_COLLATE, not by the LC_ALL given to a command:
# in stop 20 the two machines hashed the same files in different orders).
export LC_ALL=C
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
carry=$root/build/carry
lib=$carry/libqmoe_kernels.so
py=${PYTHON:-python3}
# check's second pass: the opt-in switches (off by default) together, and the "auto" ones forced at
# every size. The default-on ones set back are test_switches_off's (tests/plugins/test_kernels_gpu.py)
# and tune's.
switches=(QMOE_SHARED_STREAM=8 QMOE_DECODE_MMA=64 QMOE_SHARED_INTERLEAVE=32 QMOE_SWAP_AB=128 QMOE_GEMM_PDL=1
          QMOE_SKIP_PAD=1)
# Each default-on switch set back (test_switches_off's set, and tune's switches_off).
back=(QMOE_PDL=0 QMOE_ROUTER_TC=0 QMOE_PERMUTE_CTAS=1 QMOE_DECODE_SPLIT=0 QMOE_SHARED_INTERLEAVE=0 QMOE_TILE_ROWS=96
      QMOE_SHARED_STREAM=0)
every=("${back[@]%%=*}" "${switches[@]%%=*}" QMOE_DECODE_MAX_TOKENS)  # unset for the default schedule
# tune: the settings timed against the default, "NAME:VAR=VALUE ..." (bench-NAME.json). What stop 21
# changed without a GPU: the side stream's auto range (set back, forced at every size), swapped
# tiles alone and with the side stream, the tile threshold and the spread shared expert set back.
# Not again: PDL, the tensor-core router, the multi-CTA permutation and the split shared down
# projection (each won alone in run 5; switches_off sets them back together), QMOE_DECODE_MMA (lost
# by 6-35%).
# FUSED_128: the weights in 128-row gate/up blocks (stop 22), so that Hopper's GEMM 1 does SwiGLU in
# its epilogue (bench_moe_gpu.py --gate-up-block from the environment), alone and with GEMM PDL.
# SKIP_PAD_1 (stop 23): no math for a 128-row tile's warp group of padding rows, alone, with the
# fused GEMM 1, and with 128-row tiles at every size (TILE_ROWS_1: where groups have <= 64 rows the
# cooperative tiles then work like 64-row ones, reading each weight tile once per 128 rows).
tune_sets=("FUSED_128:QMOE_BENCH_GATE_UP_BLOCK=128" "FUSED_128+SKIP_PAD_1:QMOE_BENCH_GATE_UP_BLOCK=128 QMOE_SKIP_PAD=1"
           "SKIP_PAD_1:QMOE_SKIP_PAD=1" "SKIP_PAD_1+TILE_ROWS_1:QMOE_SKIP_PAD=1 QMOE_TILE_ROWS=1"
           "FUSED_128+GEMM_PDL_1:QMOE_BENCH_GATE_UP_BLOCK=128 QMOE_GEMM_PDL=1"
           "SHARED_STREAM_0:QMOE_SHARED_STREAM=0" "SHARED_STREAM_8:QMOE_SHARED_STREAM=8" "SWAP_AB_128:QMOE_SWAP_AB=128"
           "GEMM_PDL_1:QMOE_GEMM_PDL=1" "TILE_ROWS_96:QMOE_TILE_ROWS=96" "SHARED_INTERLEAVE_0:QMOE_SHARED_INTERLEAVE=0")
# Hopper tile shapes (compile time), "NAME:NVCC FLAGS". None at present: the H200 lease of stop 20
# measured k128 (small tiles with 256-byte weight-row segments: 30% slower at 512 tokens) and pp128
# (128x128 ping-pong tiles at 4096 tokens: 12% slower), and run 4 the 2x1/1x2 clusters and 64x128
# small tiles (no gain).
TILE_VARIANTS=()
mode=${1:-}
# What the carried libraries are built from (no git needed on the device): kernel sources, build
# files and the variants' flags. check/tune refuse libraries built from other sources.
source_id() {
    { cat plugins/kernels/* plugins/CMakeLists.txt scripts/build_plugins.sh; printf '%s\n' "${TILE_VARIANTS[@]+"${TILE_VARIANTS[@]}"}"; } \
        | sha256sum | cut -c1-16
}

if [ "$mode" = prepare ]; then
    set -e
    # Hashed before the build: a source edited while nvcc runs must not be recorded as built.
    built_from="$(git rev-parse HEAD)
sources $(source_id)
$(git status --short -- plugins/kernels)"
    bash scripts/get_cutlass.sh
    scripts/build_plugins.sh --werror --arch 90a --build-dir "$root/build/carry-build"
    mkdir -p "$carry"
    rm -f "$carry"/*.so "$carry/SOURCE"  # no library of an older variant list travels along
    cp "$root/build/carry-build/lib/libqmoe_kernels.so" "$lib"
    for v in "${TILE_VARIANTS[@]+"${TILE_VARIANTS[@]}"}"; do
        scripts/build_plugins.sh --werror --arch 90a --build-dir "$root/build/carry-build-${v%%:*}" --cuda-flags "${v#*:}"
        cp "$root/build/carry-build-${v%%:*}/lib/libqmoe_kernels.so" "$carry/${v%%:*}.so"
    done
    printf '%s\n' "$built_from" >"$carry/SOURCE"
    echo "gpu_session: $(ls "$carry"/*.so | tr '\n' ' ')ready (source $(head -1 "$carry/SOURCE")); carry build/carry"
    exit 0
fi
if [ "$mode" != check ] && [ "$mode" != tune ]; then
    echo "usage: scripts/gpu_session.sh prepare|check|tune (see the header)" >&2
    exit 2
fi
[ -f "$lib" ] || { echo "gpu_session: $lib missing: run scripts/gpu_session.sh prepare here first" >&2; exit 2; }
if ! grep -qx "sources $(source_id)" "$carry/SOURCE" 2>/dev/null; then
    echo "gpu_session: build/carry was built from other kernel sources: run scripts/gpu_session.sh prepare here first" >&2
    exit 2
fi
out=${OUT:?gpu_session: set OUT, the folder that comes back}
work=$(mktemp -d)
mkdir -p "$out"
cp "$carry/SOURCE" "$work/" 2>/dev/null
unset "${every[@]}"  # the default schedule: none of the switches from the environment
status=0
: >"$work/summary.txt"
note() { echo "$*" | tee -a "$work/summary.txt"; }
note "library source: $(head -1 "$work/SOURCE" 2>/dev/null)"
specs=()
# Copies what exists so far to $OUT (summary.txt, compare.md, results.tgz). Called after every stage:
# if the device tool's time limit kills this script, the last copy still comes back.
publish() {
    local existing=() spec
    for spec in "${specs[@]}"; do
        [ -f "${spec#*=}" ] && existing+=("$spec")
    done
    if [ "${#existing[@]}" -gt 0 ]; then
        "$py" scripts/compare_bench.py "${existing[@]}" >"$out/compare.md" 2>&1
    else
        echo "no benchmark results" >"$out/compare.md"
    fi
    cp "$work/summary.txt" "$out/summary.txt"
    tar czf "$out/results.tgz" -C "$work" .
}
# tune: Nsight Compute runs only start while this many seconds of the call's 420 remain unused.
budget_s=${GPU_SESSION_BUDGET_S:-400}

if [ "$mode" = check ]; then
    OUT="$work/default" LIB="$lib" scripts/gpu_check.sh >/dev/null
    rc=$?
    note "== default schedule: rc=$rc"
    cat "$work/default/summary.txt" >>"$work/summary.txt"
    [ "$rc" -eq 0 ] || status=1
    specs=(default="$work/default/bench.json")
    publish
    env "${switches[@]}" OUT="$work/exp" LIB="$lib" scripts/gpu_check.sh >/dev/null
    rc=$?
    note "== ${switches[*]}: rc=$rc"
    cat "$work/exp/summary.txt" >>"$work/summary.txt"
    [ "$rc" -eq 0 ] || status=1
    specs=(default="$work/default/bench.json" opt_in="$work/exp/bench.json")
else
    bench() {  # bench NAME LIB [ENV...]: benchmark without transformers into $work/bench-NAME.{json,log}
        local name=$1 vlib=$2 tokens=(1 2 3 4 8 64 512 4096)
        shift 2
        # The default also where the spread shared expert starts and stops paying (plugins/README.md).
        [ "$name" = default ] && tokens=(1 2 3 4 8 64 128 256 384 512 1024 2048 4096)
        env "$@" QMOE_KERNELS_LIB="$vlib" timeout 90 "$py" scripts/bench_moe_gpu.py --no-transformers \
            --tokens "${tokens[@]}" --out "$work/bench-$name.json" >"$work/bench-$name.log" 2>&1
        local rc=$?
        note "bench $name: rc=$rc"
        [ "$rc" -eq 0 ] || status=1
        specs+=("$name=$work/bench-$name.json")
        publish
    }
    bench default "$lib"
    for c in "${tune_sets[@]}"; do
        # shellcheck disable=SC2086  # the VAR=VALUE list splits into words
        bench "${c%%:*}" "$lib" ${c#*:}
    done
    bench switches_off "$lib" "${back[@]}"
    for v in "${TILE_VARIANTS[@]+"${TILE_VARIANTS[@]}"}"; do
        [ -f "$carry/${v%%:*}.so" ] && bench "${v%%:*}" "$carry/${v%%:*}.so"
    done
    # Nsight Compute on one layer call each, as NAME:TOKENS:FLAG:ENV, the most telling first (the
    # budget may cut the list): the routed experts at 4096 with SwiGLU in GEMM 1's epilogue (its
    # stores from registers), with the padding warp groups' math skipped (tensor pipe and duration
    # against the default's) and as they are, swapped tiles at 512 and 64 tokens (DRAM throughput
    # against the default's), the default at 512 (the spread GEMMs).
    ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
    if [ -n "$ncu" ]; then
        for spec in "4096fused:4096:--routed-only:QMOE_BENCH_GATE_UP_BLOCK=128" "4096skip:4096:--routed-only:QMOE_SKIP_PAD=1" \
            "4096:4096:--routed-only:" \
            "512swap:512::QMOE_SWAP_AB=128" "64swap:64::QMOE_SWAP_AB=128" "512:512::"; do
            IFS=: read -r name t flag envs <<<"$spec"
            left=$((budget_s - SECONDS))
            if [ "$left" -lt 45 ]; then
                note "ncu $name: skipped (${SECONDS}s used of ${budget_s})"
                continue
            fi
            # shellcheck disable=SC2086  # the flag and env are empty or one word
            env $envs QMOE_KERNELS_LIB="$lib" timeout $((left < 120 ? left : 120)) "$ncu" --profile-from-start off \
                --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
                --section LaunchStats --section Occupancy "$py" scripts/profile_moe_gpu.py --tokens "$t" $flag \
                >"$work/ncu-$name.txt" 2>&1
            note "ncu $name: rc=$?"
            publish
        done
    else
        note "ncu: not found"
    fi
fi

publish
cat "$out/compare.md"
exit "$status"
