#!/usr/bin/env bash
# Aquila2-7B pretraining on 12 nodes x 8 GPUs (A800-80G in BAAI's run), one torchrun per node.
# Run this same script on every node (from any directory); extra arguments are recipe overrides:
#   RDZV_ENDPOINT=node0:29500 NNODES=12 bash examples/aquila2/7b/launch_torchrun.sh \
#       data.data_path='[/data/aquila/corpus_text_document]'
# Environment:
#   NNODES          number of nodes (default 12; the recipe's layout needs a multiple of its TP x PP GPUs)
#   GPUS_PER_NODE   processes per node, one per GPU (default 8)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous (any one node of the job); node ranks are assigned
#                   by the rendezvous, NODE_RANK is not needed.  RDZV_ID names the job (default 7b-$USER).
#   or MASTER_ADDR, MASTER_PORT (default 29500) and NODE_RANK (0..NNODES-1): static rendezvous, as
#                   set by many cluster schedulers.
# Check the layout without a GPU first:
#   python -m megatron_aquila.plan examples/aquila2/7b/aquila2_7b.yaml --nodes $NNODES --gpus-per-node 8 --gpu A800-80G
set -euo pipefail
cd "$(dirname "$0")"
NNODES=${NNODES:-12} RDZV_ID=${RDZV_ID:-7b-${USER:-user}} \
    exec bash ../launch_torchrun.sh examples/aquila2/7b/aquila2_7b.yaml "$@"
