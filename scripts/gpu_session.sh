#!/usr/bin/env bash
# A GPU lease in two device commands: verifies and times the default kernel schedule and the
# experimental QMOE_* switches (plugins/kernels/moe_internal.h) with libraries built beforehand on
# the CPU machine (same nvcc 13.0; saves the ~70 s CUTLASS compile per library on the lease).
#
#   here:    scripts/gpu_session.sh prepare        -> build/carry/libqmoe_kernels.so (sm_90a + CUTLASS)
#                                                     and build/carry/<tile variant>.so (TILE_VARIANTS)
#   device:  OUT=$OUT scripts/gpu_session.sh check  (device tool: carry ["build/carry"], timeout_s 600)
#            OUT=$OUT scripts/gpu_session.sh tune   (same machine while warm; timeout_s 420, or what the
#                                                     lease has left: then GPU_SESSION_BUDGET_S=timeout-20)
#
#   check  scripts/gpu_check.sh (GPU tests, benchmark with transformers, compute-sanitizer) on the
#          default schedule, then again under all the switches. ~6-7 min.
#   tune   benchmark only (no transformers) at 1/8/64/512/4096 tokens: the default schedule, each
#          switch alone, spread_set (the 512-token combination), each tile variant,
#          QMOE_TILE_ROWS=48 with QMOE_SHARED_INTERLEAVE=32, and 64-row tiles everywhere
#          (QMOE_TILE_ROWS=1048576: 4096 tokens) (15 benches, ~20 s each; all switches together are
#          in check's second pass; default and the two tile-height runs also at 1024 and 2048); then
#          Nsight Compute (if present) on one call at 512 tokens, at 512 with QMOE_SHARED_INTERLEAVE=32,
#          at 64 with QMOE_DECODE_MMA=64, at 4096 and at 64 (scripts/profile_moe_gpu.py; each only
#          while GPU_SESSION_BUDGET_S allows). ~5-7 min.
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
# QMOE_TILE_ROWS=48: 128-row tiles from 48 mean rows per routed expert (512 tokens: 64) instead of 96.
switches=(QMOE_PDL=1 QMOE_ROUTER_TC=1 QMOE_PERMUTE_CTAS=64 QMOE_SHARED_STREAM=8 QMOE_DECODE_SPLIT=1 QMOE_DECODE_MMA=64
    QMOE_SHARED_INTERLEAVE=32 QMOE_TILE_ROWS=48)
# Hopper tile shapes (compile time). k128, the small tiles (memory-bound 8-512 tokens): deeper K boxes
# read 256-byte weight-row segments. pp128: the compute-bound (4096-token) tiles as 128x128 ping-pong
# instead of 128x256 cooperative. (64x128 tiles were no faster at 64 tokens and slower at 512 in
# run 4: no N=128 small variant.)
TILE_VARIANTS=("k128:-DQMOE_SM90_SMALL_TILE_K=128" "pp128:-DQMOE_SM90_LARGE_PINGPONG=1 -DQMOE_SM90_LARGE_TILE_N=128")
# The 512-token prediction's combination (plugins/results/NOTES.md): all_switches has QMOE_SHARED_STREAM,
# which takes the shared GEMM 1 off the spread, so this set leaves it out.
spread_set=(QMOE_SHARED_INTERLEAVE=32 QMOE_ROUTER_TC=1 QMOE_PERMUTE_CTAS=64 QMOE_PDL=1)
mode=${1:-}
# What the carried libraries are built from (no git needed on the device): kernel sources, build
# files and the variants' flags. check/tune refuse libraries built from other sources.
source_id() {
    { cat plugins/kernels/* plugins/CMakeLists.txt scripts/build_plugins.sh; printf '%s\n' "${TILE_VARIANTS[@]}"; } \
        | sha256sum | cut -c1-16
}

if [ "$mode" = prepare ]; then
    set -e
    bash scripts/get_cutlass.sh
    scripts/build_plugins.sh --werror --arch 90a --build-dir "$root/build/carry-build"
    mkdir -p "$carry"
    rm -f "$carry"/*.so "$carry/SOURCE"  # no library of an older variant list travels along
    cp "$root/build/carry-build/lib/libqmoe_kernels.so" "$lib"
    for v in "${TILE_VARIANTS[@]}"; do
        scripts/build_plugins.sh --werror --arch 90a --build-dir "$root/build/carry-build-${v%%:*}" --cuda-flags "${v#*:}"
        cp "$root/build/carry-build-${v%%:*}/lib/libqmoe_kernels.so" "$carry/${v%%:*}.so"
    done
    { git rev-parse HEAD; echo "sources $(source_id)"; git status --short -- plugins/kernels; } >"$carry/SOURCE"
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
unset "${switches[@]%%=*}"  # the default schedule: none of the switches from the environment
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
    specs=(default="$work/default/bench.json" all_switches="$work/exp/bench.json")
else
    # The tile-height runs add 1024 and 2048 tokens, where 128-row tiles pad 25-50% of the routed rows.
    wide=(default QMOE_TILE_ROWS small_tiles)
    bench() {  # bench NAME LIB [ENV...]: benchmark without transformers into $work/bench-NAME.{json,log}
        local name=$1 vlib=$2 tokens=(1 8 64 512 4096)
        shift 2
        [[ " ${wide[*]} " == *" $name "* ]] && tokens=(1 8 64 512 1024 2048 4096)
        env "$@" QMOE_KERNELS_LIB="$vlib" timeout 90 "$py" scripts/bench_moe_gpu.py --no-transformers \
            --tokens "${tokens[@]}" --out "$work/bench-$name.json" >"$work/bench-$name.log" 2>&1
        local rc=$?
        note "bench $name: rc=$rc"
        [ "$rc" -eq 0 ] || status=1
        specs+=("$name=$work/bench-$name.json")
        publish
    }
    bench default "$lib"
    for s in "${switches[@]}"; do
        bench "${s%%=*}" "$lib" "$s"
    done
    bench spread_set "$lib" "${spread_set[@]}"
    for v in "${TILE_VARIANTS[@]}"; do
        [ -f "$carry/${v%%:*}.so" ] && bench "${v%%:*}" "$carry/${v%%:*}.so"
    done
    # Both answers to the 512-token gap together: 128-row tiles from 48 rows and the spread shared expert.
    bench tile48_interleave "$lib" QMOE_TILE_ROWS=48 QMOE_SHARED_INTERLEAVE=32
    # 64-row ping-pong tiles at 4096 tokens: half the padded rows of 128-row tiles (~6% of the routed
    # math instead of ~12%), twice the weight-tile loads into shared memory.
    bench small_tiles "$lib" QMOE_TILE_ROWS=1048576
    # Nsight Compute on one layer call each, as NAME:TOKENS:FLAG:ENV, the most telling first (the
    # budget may cut the list): 512 tokens with the default schedule and with the spread shared
    # expert (DRAM and L2 throughput: do the two limits overlap?), the tensor-core decode at 64 (L1
    # hit rate of its activation loads, spills), the routed experts at 4096 (tensor pipes), and the
    # default at 64 (why the grouped GEMMs stream below vLLM there).
    ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
    if [ -n "$ncu" ]; then
        for spec in "512:512::" "512il:512::QMOE_SHARED_INTERLEAVE=32" "64mma:64::QMOE_DECODE_MMA=64" \
            "4096:4096:--routed-only:" "64:64::"; do
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
