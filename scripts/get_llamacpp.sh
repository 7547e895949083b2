#!/usr/bin/env bash
# Builds llama.cpp's CPU tools (llama-bench, llama-quantize) and keeps its HF -> GGUF converter, for
# scripts/bench_llamacpp.py. Source: the llama.cpp tree vendored in the llama-cpp-python sdist on
# PyPI (the package registries are the only network these machines have). ~10 min on 2 cores.
#
#   scripts/get_llamacpp.sh [DEST]      # default DEST: build/llamacpp
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/build/llamacpp}"
VERSION="0.3.36"  # llama-cpp-python release whose vendored llama.cpp is built
PY="$ROOT/.venv/bin/python"

if [[ -x "$DEST/build/bin/llama-bench" && -x "$DEST/build/bin/llama-quantize" ]]; then
    echo "get_llamacpp: llama.cpp tools in $DEST/build/bin"
    exit 0
fi
command -v cmake >/dev/null || { echo "get_llamacpp: cmake is needed" >&2; exit 1; }

cmake_cpu_flags() {
    local flags="-DGGML_NATIVE=OFF" f
    for f in avx avx2 fma f16c avx_vnni; do
        grep -qw "$f" /proc/cpuinfo && flags+=" -DGGML_${f^^}=ON"
    done
    grep -qw avx512_vnni /proc/cpuinfo && flags+=" -DGGML_AVX512_VNNI=ON"
    grep -qw avx512_bf16 /proc/cpuinfo && flags+=" -DGGML_AVX512_BF16=ON"
    grep -qw avx512f /proc/cpuinfo && flags+=" -DGGML_AVX512=ON"
    echo "$flags"
}
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
tar xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST.partial"
mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST.partial"
# Native minus AMX: the VMs list AMX in /proc/cpuinfo but an AMX build dies with SIGILL there (Q8_0).
cmake -S "$DEST.partial" -B "$DEST.partial/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF $(cmake_cpu_flags) >/dev/null
cmake --build "$DEST.partial/build" -j"$(nproc)" --target llama-quantize llama-bench >/dev/null
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "get_llamacpp: llama.cpp tools in $DEST/build/bin"
