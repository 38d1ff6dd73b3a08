#!/usr/bin/env bash
# A wheel install fits beside the user's own stack and works from outside the source tree:
#   1. pip's dry run of installing the wheel with [train] into an environment that already holds
#      the newest torch and transformers (the python given as $1; .ci/run passes its newest suite's)
#      replaces neither and downgrades nothing (.ci/no_downgrade.py).
#   2. The wheel without extras (the core) in a fresh venv: import, from_pretrained, generate,
#      hf-moe upcycle --verify, export and import with model cards, and a recipe that stops with one
#      line naming the [train] extra (.ci/wheel_check.py core).
#   3. The same venv with [train]: a recipe run (.ci/wheel_check.py train).
# The size and package count of both installs are printed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
newest_python=${1:-$root/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
source "$work/venv/bin/activate"
pip wheel -q --no-deps -w "$work/dist" "$root"
wheel=$(ls "$work"/dist/hf_moe-*.whl)

"$newest_python" -m pip install -q --dry-run --report "$work/report.json" "$wheel[train]"
"$newest_python" "$root/.ci/no_downgrade.py" "$work/report.json"

installed() {
  echo "== $1: $(pip list 2>/dev/null | tail -n +3 | wc -l) packages," \
    "$(du -sm "$work"/venv/lib/python3*/site-packages | cut -f1) MB in site-packages"
}
pip install -q torch==2.13.0
pip install -q "$wheel"
installed "core, with the torch 2.13.0 CPU build"
cd "$work"
python "$root/.ci/wheel_check.py" core "$root" "$work/run"
pip install -q "$wheel[train]"
installed "core + [train]"
python "$root/.ci/wheel_check.py" train "$root" "$work/run"
