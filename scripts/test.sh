#!/usr/bin/env bash
# The README's test command: installs eplb_native with its test extras, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
