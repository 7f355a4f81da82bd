#!/usr/bin/env bash
# Run on every node with the same MASTER_ADDR/MASTER_PORT/NNODES and that node's NODE_RANK:
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=$i launch/torchrun_multi_node.sh model=llama_1b run_dir=runs/1b
# NPROC ranks per node: NPROC always wins; without it one per GPU this process may use (CUDA_VISIBLE_DEVICES,
# else nvidia-smi), or 1 on a node without a usable GPU.
# Pass run_dir explicitly so all nodes write into one directory (and train.resume=auto finds it after a restart).
# Exit codes as launch/torchrun_single_node.sh: 75 when the ranks saved and stopped on request (each node's script
# sees its own ranks' marker), MAX_RESTARTS=N restarts from the latest checkpoint (run it with the same N on every
# node: a failure on one node fails the others, and each node's script restarts its own torchrun).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(megaeff_gpu_count)
    ((NPROC > 0)) || NPROC=1
fi
export MASTER_PORT="${MASTER_PORT:-29500}"
megaeff_launch torchrun \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}" \
    -m megaeff.train "$@"
