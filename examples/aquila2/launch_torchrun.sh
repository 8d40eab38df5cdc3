#!/usr/bin/env bash
# Multi-node torchrun for any recipe, one torchrun per node; the per-model scripts in 7b/ and 34b/
# call it with their recipe and node count. Run the same command on every node:
#   RDZV_ENDPOINT=node0:29500 NNODES=12 bash examples/aquila2/launch_torchrun.sh RECIPE.yaml [overrides...]
# Environment:
#   NNODES          number of nodes (required here; the per-model scripts give a default)
#   GPUS_PER_NODE   processes per node, one per GPU (default 8)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous (any one node of the job); node ranks are assigned
#                   by the rendezvous, NODE_RANK is not needed. RDZV_ID names the job.
#   or MASTER_ADDR, MASTER_PORT (default 29500) and NODE_RANK (0..NNODES-1): static rendezvous, as
#                   set by many cluster schedulers.
# Stopping: SIGUSR1 or SIGTERM to this script is forwarded to the ranks (not to torchrun, which
# ignores SIGUSR1 here); every rank saves at the end of its iteration and exits 0
# (examples/aquila2/stop_signals.sh; timing in docs/gpu.md section 6).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "launch_torchrun.sh: the first argument must be a recipe file, got '${1:-}'" >&2
    exit 2
fi
RECIPE=$1
shift
NNODES=${NNODES:?set NNODES, the number of nodes}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

if [ -n "${RDZV_ENDPOINT:-}" ]; then
    rendezvous=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-aquila2-${USER:-user}}")
elif [ -n "${MASTER_ADDR:-}" ]; then
    if [ -z "${NODE_RANK:-}" ]; then
        echo "launch_torchrun.sh: MASTER_ADDR is set but NODE_RANK is not; set NODE_RANK (0..$((NNODES - 1))) on each node," \
             "or use RDZV_ENDPOINT=host:port instead" >&2
        exit 2
    fi
    rendezvous=(--master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --node_rank "$NODE_RANK")
else
    echo "launch_torchrun.sh: set RDZV_ENDPOINT=host:port (c10d rendezvous) or MASTER_ADDR (+ MASTER_PORT, NODE_RANK)" >&2
    exit 2
fi

# One CPU thread pool per process is plenty: the GPU does the work.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# One CUDA work queue per device: kernels start in the order they are launched, so a collective launched
# before a GEMM (parallel.tp_comm_overlap, docs/design.md "TP communication overlap") runs beside it
# instead of queueing behind it (Megatron-LM requires the same).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# NCCL flight recorder: each rank keeps its last TORCH_NCCL_TRACE_BUFFER_SIZE collectives, and when one
# waits longer than distributed.nccl_timeout_minutes every rank writes them to
# $NCCL_TRACE_DIR/nccl_trace_rank_<global rank>, on its own node (NCCL_TRACE_DIR must exist there;
# /tmp by default; a shared directory gathers the whole job). Stalls outside NCCL: the hang watchdog
# prints every thread's stack to the job's stderr (distributed.hang_timeout_minutes).
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-${NCCL_TRACE_DIR:-/tmp}/nccl_trace_rank_}

source examples/aquila2/stop_signals.sh
run_torchrun_forwarding_stop_signals torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    "${rendezvous[@]}" -m megatron_aquila.train "$RECIPE" "$@"
