#!/usr/bin/env bash
# The README's main-job command: installs eplb_native, then runs `eplb-native demo` (4 CPU ranks
# serve a drifting skewed MoE with the updator attached; table + out/demo.png), then plans a
# placement for the bundled example load as a vllm-ascend expert map. Extra arguments go to the
# demo (e.g. --device cuda, --policy min_move, --steps 120).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh cli
. scripts/python_env.sh
mkdir -p out
"$PY" -m eplb_native.cli demo --png out/demo.png --save-trace out/demo_trace.npz "$@"
"$PY" -m eplb_native.cli plan --load examples/loads/deepseek_v3_like.npz --ranks 32 --nodes 4 --groups 8 \
  --redundant 32 -o out/expert_map.json
