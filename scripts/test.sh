#!/usr/bin/env bash
# The whole test suite. Creates .venv and installs everything the tests need; safe to run again.
# Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh" export,serve,triton,test
# CUTLASS headers for the compile check of the Hopper kernels (tests/plugins/test_build.py), where nvcc is.
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
    bash "$root/scripts/get_cutlass.sh"
fi
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
