#!/usr/bin/env bash
# Creates (once) and prints the path of the Python venv used by models/recipe and scripts/.
# Usage: PY=$(models/recipe/venv.sh)/bin/python
# The YOLOX sources (yolox==0.3.0 sdist, Apache-2.0; its wheel build fails on current Python)
# are unpacked into $venv/src/yolox-0.3.0 and put on sys.path by the scripts that need them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${PERCH_VENV:-$HOME/.cache/perch/venv}
stamp="$venv/.perch-requirements"
want=$(cat "$here/requirements.txt" "$here/requirements-nodeps.txt")
if [ "$want" != "$(cat "$stamp" 2>/dev/null)" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$here/requirements.txt" >&2
  "$venv/bin/pip" install -q --no-deps -r "$here/requirements-nodeps.txt" >&2
  mkdir -p "$venv/src"
  "$venv/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation yolox==0.3.0 -d "$venv/src" >&2
  tar xzf "$venv/src/yolox-0.3.0.tar.gz" -C "$venv/src"
  printf '%s' "$want" > "$stamp"
fi
echo "$venv"
