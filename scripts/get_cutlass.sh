#!/usr/bin/env bash
# Puts CUTLASS's headers (cutlass/, cute/) from the nvidia-cutlass wheel into third_party/cutlass/include
# (git-ignored), where scripts/build_plugins.sh finds them for the Hopper wgmma grouped GEMMs.
# Only the wheel is downloaded (no dependencies installed). usage: scripts/get_cutlass.sh [VERSION]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=${1:-4.2.0.0}
dest="$root/third_party/cutlass"
if [ -f "$dest/include/cutlass/cutlass.h" ] && [ "$(cat "$dest/VERSION" 2>/dev/null)" = "$version" ]; then
    echo "get_cutlass: CUTLASS $version already in $dest"
    exit 0
fi
py=${PYTHON:-python3}
[ -x "$root/.venv/bin/python" ] && py="$root/.venv/bin/python"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --only-binary=:all: "nvidia-cutlass==$version" -d "$tmp"
"$py" - "$tmp" "$tmp/x" <<'PY'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("nvidia_cutlass-*.whl"))
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = pathlib.Path(sys.argv[2]) / "include" / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
[ -f "$tmp/x/include/cutlass/cutlass.h" ] || { echo "get_cutlass: no CUTLASS headers in the wheel" >&2; exit 1; }
echo "$version" >"$tmp/x/VERSION"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp/x" "$dest"
echo "get_cutlass: CUTLASS $version headers in $dest/include"
