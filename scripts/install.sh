#!/usr/bin/env bash
# Installs eplb_native and what it needs into the current Python, on a fresh machine or not.
# torch comes first and only when missing (a CUDA or NPU host keeps its own); the extension is
# then built against it without build isolation.  Usage: scripts/install.sh [extras, e.g. test]
# Which Python: see scripts/python_env.sh ($PYTHON, python3, or .venv where python3 is
# externally managed).
#   EPLB_TORCH_VERSION  torch to install when none is (default 2.13.0)
#   EPLB_TORCH_INDEX    a pip index for it, e.g. https://download.pytorch.org/whl/cpu for the
#                       CPU-only build (PyPI's default Linux wheel is the CUDA one)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/python_env.sh
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_q "torch==${EPLB_TORCH_VERSION:-2.13.0}" ${EPLB_TORCH_INDEX:+--index-url "$EPLB_TORCH_INDEX"}
fi
pip_q "scikit-build-core>=0.10" "pybind11>=2.12" "numpy>=1.24" ninja cmake
extras=${1:-}
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation ".${extras:+[$extras]}"
