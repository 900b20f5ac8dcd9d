#!/usr/bin/env bash
# The README's main-job command: installs eplb_native, then plans a placement for the bundled
# example load and writes it as a vllm-ascend expert map.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh cli
mkdir -p out
eplb-native plan --load examples/loads/deepseek_v3_like.npz --ranks 32 --nodes 4 --groups 8 \
  --redundant 32 -o out/expert_map.json "$@"
