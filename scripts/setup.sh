#!/usr/bin/env bash
# Creates .venv (idempotent) and installs qmoe with the extras given as arguments.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh export,test
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
extras=${1:-export}
venv="$root/.venv"
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv" || { echo "error: '$py -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
fi
stamp="$venv/.qmoe-installed-$extras"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch 2.13 first: pip then keeps it (a CPU build where a local wheel exists) instead of
    # resolving a newer release for the `export` extra.
    case ",$extras," in *,export,*|*,test,*)
        "$venv/bin/python" -m pip install -q "torch==2.13.*" ;;
    esac
    "$venv/bin/python" -m pip install -q -e "$root[$extras]"
    # Type stubs for TensorRT's Python API; their own dependencies would try to install TensorRT.
    case ",$extras," in *,test,*)
        "$venv/bin/python" -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1" ;;
    esac
    touch "$stamp"
fi
