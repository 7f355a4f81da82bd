#!/usr/bin/env bash
# The deepspeed launcher (pip install 'megaeff[deepspeed]'): one process per GPU of this node by default, or on every
# host of HOSTFILE. It passes --local_rank=N, which megaeff accepts and strips before Hydra parses the overrides.
# Launcher options go before a `--`, Hydra overrides after it (without `--`, every argument is an override):
#   launch/deepspeed.sh model=llama_350m run_dir=runs/350m                   # this node, all its GPUs
#   launch/deepspeed.sh --num_gpus 2 -- experiment=smoke run_dir=runs/smoke  # deepspeed options, then overrides
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh model=llama_1b ...    # several hosts, reached over ssh/pdsh
# (deepspeed itself reads /job/hostfile when that file exists and no hostfile is given.)
# Exit codes as launch/torchrun_single_node.sh (launch/common.sh): 75 when the ranks saved and stopped on request,
# MAX_RESTARTS=N restarts a failed run from its latest checkpoint.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ds_args=(--master_port "${MASTER_PORT:-29500}")
[[ -n "${HOSTFILE:-}" ]] && ds_args+=(--hostfile "$HOSTFILE")
for arg in "$@"; do
    if [[ "$arg" == -- ]]; then
        while [[ "$1" != -- ]]; do
            ds_args+=("$1")
            shift
        done
        shift
        break
    fi
done
megaeff_launch deepspeed "${ds_args[@]}" --module megaeff.train "$@"
