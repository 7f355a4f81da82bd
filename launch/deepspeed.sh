#!/usr/bin/env bash
# The deepspeed launcher (pip install 'megaeff[deepspeed]'): it starts one process per GPU on every host of the
# hostfile and passes --local_rank=N, which megaeff accepts and strips before Hydra parses the overrides.
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh model=llama_350m run_dir=runs/350m
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:-launch/hostfile.example}" --master_port "${MASTER_PORT:-29500}" \
  --module megaeff.train "$@"
