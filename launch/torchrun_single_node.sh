#!/usr/bin/env bash
# One node, NPROC ranks (default: one per visible GPU, or 2 on CPU). Hydra overrides pass through:
#   launch/torchrun_single_node.sh model=llama_60m train.steps=1000 run_dir=runs/60m
set -euo pipefail
if command -v nvidia-smi >/dev/null 2>&1; then default_nproc=$(nvidia-smi -L | wc -l); else default_nproc=2; fi
exec torchrun --standalone --nproc_per_node="${NPROC:-$default_nproc}" -m megaeff.train "$@"
