#!/usr/bin/env bash
# The body of the per-model Slurm scripts (7b/launch_slurm.sh, 34b/launch_slurm.sh): inside an
# allocation, one torchrun per node via srun, c10d rendezvous on the allocation's first node.
#   bash examples/aquila2/srun_torchrun.sh REPO_DIR RECIPE [overrides...]
set -euo pipefail
REPO_DIR=$1
RECIPE=$2
shift 2
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# Expanded here, once, so every node gets the same endpoint and overrides (each "$@" word stays one word).
srun --nodes "$SLURM_JOB_NUM_NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 --chdir "$REPO_DIR" \
    torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m megatron_aquila.train "$RECIPE" "$@"
