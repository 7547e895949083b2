#!/usr/bin/env bash
# Type-checks the TensorRT layer (runtime/trt) against the TensorRT Python API stubs, so the
# calls are checked on machines without TensorRT (CI). Needs mypy and the stubs in the venv:
#   pip install mypy && pip install --no-deps "tensorrt-stubs==10.13.0.35.1"
# (scripts/setup.sh installs both with the test extra). Extra arguments go to mypy.
# cuda-python ships no stubs usable here: its modules are typed Any.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3
if ! "$py" -c "import tensorrt_stubs" 2>/dev/null && ! "$py" -c "import tensorrt" 2>/dev/null; then
    echo "typecheck: neither tensorrt-stubs nor tensorrt is installed for $py" >&2
    echo "  pip install --no-deps 'tensorrt-stubs==10.13.0.35.1'" >&2
    exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# tensorrt-stubs installs tensorrt/__init__.pyi and tensorrt_bindings/*.pyi without a py.typed
# marker (mypy skips such folders in site-packages), and a few of its generated signatures are not
# Python (a parameter named `in`, a required parameter after defaults). Copy them to a temp
# mypy_path, repairing each def line that does not parse; unrepairable ones become (*args, **kwargs).
mkdir "$tmp/stubs"
"$py" - "$tmp/stubs" <<'PY'
import ast, importlib.util, os, re, sys

def parses(line):
    try:
        ast.parse(line.strip() + "\n    ...\n")
        return True
    except SyntaxError:
        return False

def repair(line):
    if parses(line):
        return line
    fixed = re.sub(r"([(,] ?)in: ", r"\1in_: ", line)
    if not parses(fixed):  # required parameters after one with a default: give them `= ...`
        head, params, tail = re.match(r"(\s*def \w+\()(.*)(\) -> .*:)\s*$", fixed).groups()
        parts, seen_default = [], False
        for p in re.split(r", (?![^\[]*\])", params):
            seen_default = seen_default or "=" in p
            parts.append(p if "=" in p or not seen_default or p.startswith("*") else p + " = ...")
        fixed = head + ", ".join(parts) + tail
    if not parses(fixed):
        indent, name = re.match(r"(\s*)def (\w+)", line).groups()
        fixed = f"{indent}def {name}(self, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:"
    return fixed + "\n"

for name in ("tensorrt", "tensorrt_bindings"):
    spec = importlib.util.find_spec(name)
    src = next((f for f in (spec.submodule_search_locations or []) if os.path.isfile(os.path.join(f, "__init__.pyi"))),
               None) if spec else None
    if src is None:
        continue
    for dirpath, _, files in os.walk(src):
        for fn in files:
            if fn.endswith(".pyi"):
                out = os.path.join(sys.argv[1], name, os.path.relpath(os.path.join(dirpath, fn), src))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    lines = [repair(l) if l.lstrip().startswith("def ") else l for l in f]
                with open(out, "w", encoding="utf-8") as f:
                    f.writelines(lines)
PY
cfg="$tmp/mypy.ini"
cat >"$cfg" <<INI
[mypy]
mypy_path = $tmp/stubs
python_version = 3.10
check_untyped_defs = True
disallow_untyped_defs = True
disallow_incomplete_defs = True
warn_unused_ignores = True
warn_redundant_casts = True
warn_return_any = False
no_implicit_optional = True
strict_equality = True
# Other packages are imported for their types, not checked here.
follow_imports = silent

[mypy-cuda,cuda.*,tensorrt_libs]
ignore_missing_imports = True

# The generated stubs have their own faults (a module-level bool dtype shadows the builtin):
# use their types, do not report on them.
[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]
ignore_errors = True
INI
cd "$root"
"$py" -m mypy --config-file "$cfg" --cache-dir "${MYPY_CACHE_DIR:-$root/.mypy_cache}" runtime/trt "$@"
