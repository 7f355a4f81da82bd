#!/usr/bin/env bash
# Run on every node with the same MASTER_ADDR/MASTER_PORT/NNODES and that node's NODE_RANK:
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=$i NPROC=8 launch/torchrun_multi_node.sh model=llama_1b run_dir=runs/1b
# Pass run_dir explicitly so all nodes write into one directory (and train.resume=auto finds it after a restart).
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
exec torchrun \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="${NPROC:-8}" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
  -m megaeff.train "$@"
