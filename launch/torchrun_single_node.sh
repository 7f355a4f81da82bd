#!/usr/bin/env bash
# One node, NPROC ranks. NPROC always wins; without it, one rank per GPU this process may use (CUDA_VISIBLE_DEVICES,
# else nvidia-smi), or 2 on a node without a usable GPU. Hydra overrides pass through:
#   launch/torchrun_single_node.sh model=llama_60m train.steps=1000 run_dir=runs/60m
#   NPROC=2 launch/torchrun_single_node.sh -m optim.lr=1e-3,3e-3 experiment=smoke   # a sweep: runs/<time>/<job>
# Exit codes (launch/common.sh): 0 finished, 75 saved and stopped on request (SIGTERM/SIGUSR1 to this script or
# to torchrun, train.max_duration_minutes), else torchrun's. MAX_RESTARTS=N relaunches a failed run from its
# latest checkpoint up to N times. SHUTDOWN_TIMEOUT (default 300 s) is how long torchrun lets the ranks finish
# their step and save after a signal before it kills them.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(megaeff_gpu_count)
    ((NPROC > 0)) || NPROC=2
fi
# SIGUSR1 (Slurm's warning signal) is not among torchrun's default signals: without it torchrun would die of it.
megaeff_launch torchrun --standalone --nproc_per_node="$NPROC" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}" \
    -m megaeff.train "$@"
