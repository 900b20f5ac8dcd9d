#!/usr/bin/env bash
# Developer build: compiles the native modules with ninja into build/dev and drops them next to
# the sources, so `PYTHONPATH=python pytest` runs against this checkout without installing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DEPLB_NATIVE_TESTS=ON "$@" >/dev/null
cmake --build build/dev
cp build/dev/_planner*.so build/dev/_ops*.so python/eplb_native/
