#!/usr/bin/env bash
# The README's test command: installs eplb_native with its test extras, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
. scripts/python_env.sh
"$PY" -m ruff check .
# C++ / CUDA / Ascend C sources keep the repo's .clang-format (pinned clang-format from the extras)
git ls-files -z 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'tests/cpp/*.cpp' 'tests/npu/*.cpp' |
  xargs -0 clang-format --dry-run -Werror
"$PY" -m pytest -q "$@"
