#!/usr/bin/env bash
# Builds the qmoe native libraries with CMake:
#   build/plugins/lib/libqmoe_kernels.so       always (CUDA kernels, C ABI; the tests load it via ctypes)
#   build/plugins/lib/libqmoe_trt_plugins.so   with --trt-include (TensorRT IPluginV3 plugins)
# Without nvcc it prints why and exits 0 without building (callers check for the .so).
#
# usage: scripts/build_plugins.sh [--trt-include DIR] [--arch "80;90a"] [--cutlass auto|off|DIR] [--build-dir DIR]
#                                [--cuda-flags FLAGS] [--werror]
#   --trt-include DIR  TensorRT headers (NvInfer.h), e.g. /usr/include/x86_64-linux-gnu in NGC
#                      TensorRT containers, or third_party/tensorrt-<ver>/include (compile check)
#   --arch LIST        CUDA architectures, CMake syntax (default 80;90a: A100 and H100/H200)
#   --cutlass X        Hopper wgmma grouped GEMMs from CUTLASS headers (needs 90a in --arch).
#                      auto (default): third_party/cutlass/include if present (scripts/get_cutlass.sh
#                      puts it there); off: portable WMMA prefill only; DIR: that include directory
#   --build-dir DIR    default build/plugins
#   --cuda-flags FLAGS extra nvcc flags, e.g. "-DQMOE_SM90_SMALL_TILE_N=128" (the tile and GEMV
#                      knobs of plugins/kernels); default: $CUDAFLAGS
#   --werror           warnings are errors
# env: NVCC (compiler path), JOBS (parallel jobs, default: all cores)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build/plugins"
arch="80;90a"
trt=""
werror=OFF
cutlass=auto
cuda_flags=${CUDAFLAGS:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --trt-include) trt=$(cd "$2" && pwd); shift 2 ;;
        --arch) arch=$2; shift 2 ;;
        --build-dir) build=$2; shift 2 ;;
        --cutlass) cutlass=$2; shift 2 ;;
        --cuda-flags) cuda_flags=$2; shift 2 ;;
        --werror) werror=ON; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build_plugins: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

nvcc=${NVCC:-$(command -v nvcc || true)}
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [ -z "$nvcc" ]; then
    echo "build_plugins: nvcc not found (set NVCC or put the CUDA toolkit on PATH); skipped, nothing built"
    exit 0
fi
command -v cmake >/dev/null || { echo "build_plugins: cmake >= 3.24 is required" >&2; exit 1; }
if [ -n "$trt" ] && [ ! -f "$trt/NvInfer.h" ]; then
    echo "build_plugins: $trt/NvInfer.h not found; --trt-include must be TensorRT's include directory" >&2
    exit 1
fi

cutlass_dir=""
case "$cutlass" in
    off) ;;
    auto) if [ -f "$root/third_party/cutlass/include/cutlass/cutlass.h" ] && [[ ";$arch;" == *";90a;"* ]]; then
              cutlass_dir="$root/third_party/cutlass/include"
          fi ;;
    *) cutlass_dir=$(cd "$cutlass" && pwd) ;;
esac

cmake -S "$root/plugins" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DQMOE_CUDA_ARCHITECTURES="$arch" -DQMOE_TRT_INCLUDE_DIR="$trt" -DQMOE_CUTLASS_INCLUDE_DIR="$cutlass_dir" -DQMOE_WERROR="$werror" \
    -DCMAKE_CUDA_FLAGS="$cuda_flags" >/dev/null
cmake --build "$build" -j "${JOBS:-$(nproc)}"
echo "build_plugins: built $(ls "$build"/lib/*.so | tr '\n' ' ')(CUTLASS: ${cutlass_dir:-none})"
