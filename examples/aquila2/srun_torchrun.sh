#!/usr/bin/env bash
# The body of the per-model Slurm scripts (7b/launch_slurm.sh, 34b/launch_slurm.sh), run by the batch
# shell inside the allocation: one launch_torchrun.sh (one torchrun) per node via srun, c10d
# rendezvous on the allocation's first node.
#   bash examples/aquila2/srun_torchrun.sh REPO_DIR RECIPE [overrides...]
# Stopping: the batch shell receives `#SBATCH --signal=B:USR1@<seconds>` (and Slurm's SIGTERM); this
# script forwards SIGUSR1 and SIGTERM to srun, srun to its tasks, and each node's launch_torchrun.sh
# to its ranks, which save at the end of the iteration and exit 0 (docs/gpu.md section 6).
set -euo pipefail
REPO_DIR=$1
RECIPE=$2
shift 2
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

source "$REPO_DIR/examples/aquila2/stop_signals.sh"
# For launch_torchrun.sh on every node (srun passes the environment on; GPUS_PER_NODE and
# OMP_NUM_THREADS too, when set). Expanded here, once, so every node gets the same endpoint and
# overrides (each "$@" word stays one word).
export NNODES=$SLURM_JOB_NUM_NODES RDZV_ENDPOINT=$RDZV_HOST:$RDZV_PORT RDZV_ID=$SLURM_JOB_ID
# NCCL flight-recorder traces (launch_torchrun.sh sets the rest): $NCCL_TRACE_DIR/nccl_trace_rank_<rank> on
# each node after a collective times out; set NCCL_TRACE_DIR to an existing shared directory to gather them.
export NCCL_TRACE_DIR=${NCCL_TRACE_DIR:-/tmp}
run_srun_forwarding_stop_signals srun --nodes "$SLURM_JOB_NUM_NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 \
    --chdir "$REPO_DIR" bash examples/aquila2/launch_torchrun.sh "$RECIPE" "$@"
