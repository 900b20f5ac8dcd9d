#!/usr/bin/env bash
# The README's test command: installs eplb_native with its test extras, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
. scripts/python_env.sh
"$PY" -m ruff check .
# C++ / CUDA / Ascend C sources keep the repo's .clang-format (pinned clang-format from the extras)
# (the binary of the wheel installed into $PY, whatever clang-format PATH finds first)
CLANG_FORMAT=$("$PY" -c 'import clang_format; print(clang_format.get_executable("clang-format"))')
git ls-files -z 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'tests/cpp/*.cpp' 'tests/npu/*.cpp' |
  xargs -0 "$CLANG_FORMAT" --dry-run -Werror
"$PY" -m pytest -q "$@"
