#!/usr/bin/env bash
# A GPU lease in one device command: verifies and times the default kernel schedule and the
# experimental QMOE_* switches (plugins/kernels/moe_internal.h) with one library built beforehand on
# the CPU machine (same nvcc 13.0; saves the ~70 s CUTLASS compile of the lease).
#
#   here:    scripts/gpu_session.sh --prepare     -> build/carry/libqmoe_kernels.so (sm_90a + CUTLASS)
#                                                    and build/carry/<tile variant>.so (TILE_VARIANTS)
#   device:  OUT=$OUT scripts/gpu_session.sh      (device tool: carry ["build/carry"], timeout_s 600)
#
# On the device, scripts/gpu_check.sh twice with that library:
#   default  GPU tests, benchmark (with transformers), compute-sanitizer; plus each switch alone and
#            each tile variant, benchmark only (VARIANTS), at 1/8/64/512/4096 tokens
#   exp      GPU tests, benchmark, compute-sanitizer under all three switches
# then scripts/compare_bench.py. $OUT receives three files (the device tool returns at most 8):
#   summary.txt  every stage's exit code; compare.md  the timing table; results.tgz  all logs + JSON.
# Exit code: 0 when both checks passed. Typical total 6-7 minutes.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
carry=$root/build/carry
lib=$carry/libqmoe_kernels.so
switches=(QMOE_PDL=1 QMOE_ROUTER_TC=1 QMOE_PERMUTE_CTAS=64)
# Hopper small-tile shapes (memory-bound 8-512 tokens): deeper K boxes read 256-byte weight-row segments.
TILE_VARIANTS=("k128:-DQMOE_SM90_SMALL_TILE_K=128" "n128k128:-DQMOE_SM90_SMALL_TILE_N=128 -DQMOE_SM90_SMALL_TILE_K=128")

if [ "${1:-}" = "--prepare" ]; then
    set -e
    bash scripts/get_cutlass.sh
    scripts/build_plugins.sh --werror --arch 90a --build-dir "$root/build/carry-build"
    mkdir -p "$carry"
    cp "$root/build/carry-build/lib/libqmoe_kernels.so" "$lib"
    for v in "${TILE_VARIANTS[@]}"; do
        scripts/build_plugins.sh --werror --arch 90a --build-dir "$root/build/carry-build-${v%%:*}" --cuda-flags "${v#*:}"
        cp "$root/build/carry-build-${v%%:*}/lib/libqmoe_kernels.so" "$carry/${v%%:*}.so"
    done
    { git rev-parse HEAD; git status --short -- plugins/kernels; } >"$carry/SOURCE"
    echo "gpu_session: $lib ready (source: $(head -1 "$carry/SOURCE")); carry build/carry to the device"
    exit 0
fi

[ -f "$lib" ] || { echo "gpu_session: $lib missing: run scripts/gpu_session.sh --prepare here first" >&2; exit 2; }
out=${OUT:?gpu_session: set OUT, the folder that comes back}
work=$(mktemp -d)
mkdir -p "$out" "$work/variants"
cp "$carry/SOURCE" "$work/" 2>/dev/null

variants=""
for s in "${switches[@]}"; do
    variants+="${s%%=*}:env:$s;"
done
for v in "${TILE_VARIANTS[@]}"; do
    [ -f "$carry/${v%%:*}.so" ] && variants+="${v%%:*}:@$carry/${v%%:*}.so;"
done
env -u QMOE_PDL -u QMOE_ROUTER_TC -u QMOE_PERMUTE_CTAS OUT="$work/default" LIB="$lib" VARIANTS="${variants%;}" \
    VARIANT_TOKENS="1 8 64 512 4096" VARIANT_JSON_DIR="$work/variants" scripts/gpu_check.sh
rc_default=$?
env "${switches[@]}" OUT="$work/exp" LIB="$lib" scripts/gpu_check.sh
rc_exp=$?

{
    echo "library source: $(head -1 "$work/SOURCE" 2>/dev/null)"
    echo "== default (rc=$rc_default)"
    cat "$work/default/summary.txt"
    echo "== exp: ${switches[*]} (rc=$rc_exp)"
    cat "$work/exp/summary.txt"
} >"$out/summary.txt" 2>&1
specs=(default="$work/default/bench.json" exp="$work/exp/bench.json")
for s in "${switches[@]}"; do
    specs+=("${s%%=*}=$work/variants/bench-${s%%=*}.json")
done
for v in "${TILE_VARIANTS[@]}"; do
    specs+=("${v%%:*}=$work/variants/bench-${v%%:*}.json")
done
existing=()
for spec in "${specs[@]}"; do
    [ -f "${spec#*=}" ] && existing+=("$spec")
done
"${PYTHON:-python3}" scripts/compare_bench.py "${existing[@]}" >"$out/compare.md" 2>&1
tar czf "$out/results.tgz" -C "$work" .
cat "$out/summary.txt" "$out/compare.md"
[ "$rc_default" -eq 0 ] && [ "$rc_exp" -eq 0 ]
