#!/usr/bin/env bash
# The whole test suite. Creates .venv and installs everything the tests need; safe to run again.
# Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh" export,serve,triton,test
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
