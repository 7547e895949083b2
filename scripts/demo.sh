#!/usr/bin/env bash
# The main job on the embedded default: make the tiny checkpoint, export it, generate text.
# Creates .venv and installs what it needs on first use; safe to run again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh" export
qmoe="$root/.venv/bin/qmoe"
out="$root/artifacts"
[ -f "$out/tiny-ckpt/config.json" ] || "$qmoe" tiny "$out/tiny-ckpt"
[ -f "$out/tiny-onnx/qmoe.json" ] || "$qmoe" export "$out/tiny-ckpt" -o "$out/tiny-onnx"
"$qmoe" run "$out/tiny-onnx" --prompt "${1:-Give me a short introduction to large language models.}" --max-new-tokens 32
