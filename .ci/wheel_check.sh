#!/usr/bin/env bash
# A wheel install works: build the wheel, install it non-editable into a fresh venv, and use it
# from a folder outside the source tree (.ci/wheel_check.py), so package data that only an
# editable install would find is caught.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
source "$work/venv/bin/activate"
pip install -q torch==2.13.0
pip wheel -q --no-deps -w "$work/dist" "$root"
pip install -q "$work"/dist/hf_moe-*.whl
cd "$work"
python "$root/.ci/wheel_check.py" "$root" "$work/run"
