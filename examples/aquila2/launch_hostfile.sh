#!/usr/bin/env bash
# Multi-node launch from a hostfile, as Aquila2's and Baichuan's scripts do: one torchrun per host over ssh.
#   bash examples/aquila2/launch_hostfile.sh HOSTFILE RECIPE.yaml [overrides...]
# HOSTFILE: one line per node, "HOST slots=N" (an address or name, and its processes: one per GPU); '#'
# starts a comment, blank lines are skipped; every node must have the same slots. Node ranks follow the
# line order and the rendezvous is on the first host. Paths are relative to the repository root, which
# must be the same path on every host (a shared filesystem), as must the Python environment.
# Before anything starts, the recipe's layout is checked against nodes x slots processes here
# (Config.validate): a mismatch prints the configuration error and no host is contacted.
# Each host runs examples/aquila2/launch_torchrun.sh (static rendezvous: MASTER_ADDR, MASTER_PORT,
# NODE_RANK); its output appears here prefixed with "[HOST] " and goes to LOG_DIR/node<rank>_<host>.log.
# Environment:
#   MASTER_PORT   rendezvous port on the first host (default 29500)
#   LOG_DIR       per-node logs (default runs/launch_logs)
#   SSH           the ssh command and its options (default ssh; e.g. "ssh -p 2222 -o BatchMode=yes")
#   PYTHON        the Python that validates the recipe here (default python)
#   PATH, PYTHONPATH, OMP_NUM_THREADS and every NCCL_*, GLOO_* and TORCH_* variable set here are set on
#   every host too.
# Stopping (examples/aquila2/stop_signals.sh, docs/gpu.md section 6): SIGUSR1 or SIGTERM to this script
# is sent to every node's launch_torchrun.sh, which forwards it to its ranks: they save at the end of the
# iteration and exit 0. Ctrl-C (SIGINT), or a node that exits non-zero (its ranks failed, or ssh did),
# stops every node at once (each kills its torchrun and ranks) and this script exits non-zero. A node
# whose connection to this script drops stops the same way.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 2 ] || [ ! -f "$1" ] || [ ! -f "$2" ]; then
    echo "launch_hostfile.sh: usage: launch_hostfile.sh HOSTFILE RECIPE.yaml [overrides...];" \
         "got hostfile '${1:-}' and recipe '${2:-}' (paths relative to $PWD)" >&2
    exit 2
fi
HOSTFILE=$1
RECIPE=$2
shift 2
MASTER_PORT=${MASTER_PORT:-29500}
LOG_DIR=${LOG_DIR:-runs/launch_logs}
read -r -a ssh_command <<< "${SSH:-ssh}"

# ---------------------------------------------------------------------------------- the hostfile
hosts=()
slots=""
slots_line=0
line_number=0
while IFS= read -r line || [ -n "$line" ]; do
    line_number=$((line_number + 1))
    line=${line%%#*}
    [[ $line =~ ^[[:space:]]*$ ]] && continue
    if [[ ! $line =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]]; then
        echo "launch_hostfile.sh: $HOSTFILE line $line_number: expected 'HOST slots=N' (N >= 1), got '$line'" >&2
        exit 2
    fi
    if [ -z "$slots" ]; then
        slots=${BASH_REMATCH[2]}
        slots_line=$line_number
    elif [ "${BASH_REMATCH[2]}" != "$slots" ]; then
        echo "launch_hostfile.sh: $HOSTFILE line $line_number: ${BASH_REMATCH[1]} has slots=${BASH_REMATCH[2]}," \
             "line $slots_line has slots=$slots: every node runs the same number of processes" \
             "(torchrun --nproc-per-node); give every line the same slots" >&2
        exit 2
    fi
    hosts+=("${BASH_REMATCH[1]}")
done < "$HOSTFILE"
if [ ${#hosts[@]} -eq 0 ]; then
    echo "launch_hostfile.sh: $HOSTFILE lists no host; write one line 'HOST slots=N' per node" >&2
    exit 2
fi
nnodes=${#hosts[@]}

# ---------------------------------------------------------------------------------- the layout, here
"${PYTHON:-python}" - "$RECIPE" "$nnodes" "$slots" "$@" <<'EOF' || exit 2
import sys
from megatron_aquila.config import ConfigError, load_config
recipe, nodes, slots, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
try:
    load_config(recipe, overrides).validate(nodes * slots)
except ConfigError as error:
    sys.exit(f"launch_hostfile.sh: configuration error for {nodes} nodes x {slots} slots = {nodes * slots} "
             f"processes: {error}")
EOF

# ---------------------------------------------------------------------------------- one node
# _run_node runs on each host (shipped with `declare -f`): launch_torchrun.sh in the background, and a
# reader of the control channel (this script's end of the ssh connection, on stdin) that passes each
# signal name it reads to launch_torchrun.sh. At the channel's end (this script stops the node, or the
# connection dropped) the reader kills the node's run: it freezes launch_torchrun.sh and torchrun (so
# that neither starts anything more), then kills torchrun's ranks, torchrun and launch_torchrun.sh.
_run_node() {  # REPO_DIR NODE_RANK NAME=VALUE... -- RECIPE [overrides...]
    cd "$1" || exit 2
    local node=$2 assignments=()
    shift 2
    while [ "$1" != -- ]; do assignments+=("$1"); shift; done
    shift
    echo "node $node on $(hostname): bash examples/aquila2/launch_torchrun.sh $*"
    exec 3<&0
    env "${assignments[@]}" bash examples/aquila2/launch_torchrun.sh "$@" < /dev/null &
    local launcher=$! status=0
    {
        while read -r signal <&3; do kill -s "$signal" "$launcher" 2>/dev/null; done
        kill -STOP "$launcher" 2>/dev/null
        local torchrun
        for torchrun in $(pgrep -P "$launcher"); do
            kill -STOP "$torchrun" 2>/dev/null
            pkill -KILL -P "$torchrun"
            kill -KILL "$torchrun" 2>/dev/null
        done
        kill -KILL "$launcher" 2>/dev/null
    } &
    local reader=$!
    wait "$launcher" || status=$?
    kill "$reader" 2>/dev/null
    echo "node $node on $(hostname): launch_torchrun.sh exited with status $status"
    return "$status"
}

forwarded=()
for name in PATH PYTHONPATH OMP_NUM_THREADS $(compgen -v | grep -E '^(NCCL|GLOO|TORCH)_' || true); do
    if [ -n "${!name+set}" ]; then forwarded+=("$name=${!name}"); fi
done

remote_command() {  # NODE_RANK: the command line ssh runs on that node
    printf 'bash -c %q hostfile-node' "$(declare -f _run_node); _run_node \"\$@\""
    printf ' %q' "$PWD" "$1" "NNODES=$nnodes" "GPUS_PER_NODE=$slots" "MASTER_ADDR=${hosts[0]}" \
        "MASTER_PORT=$MASTER_PORT" "NODE_RANK=$1" "RDZV_ENDPOINT=" "${forwarded[@]}" -- "$RECIPE" \
        ${overrides[@]+"${overrides[@]}"}
}

# ---------------------------------------------------------------------------------- start, watch, stop
overrides=("$@")
mkdir -p "$LOG_DIR"
control=$(mktemp -d)
trap 'rm -rf "$control"' EXIT
pids=()
for rank in "${!hosts[@]}"; do
    host=${hosts[$rank]}
    mkfifo "$control/$rank"
    "${ssh_command[@]}" "$host" "$(remote_command "$rank")" < "$control/$rank" \
        > >(tee "$LOG_DIR/node${rank}_${host}.log" | awk -v host="$host" '{ print "[" host "] " $0; fflush() }') 2>&1 &
    pids+=($!)
done
channels=()   # opened once every node has started, so that no node inherits another's channel
for rank in "${!hosts[@]}"; do
    exec {fd}>"$control/$rank"
    channels+=("$fd")
done
echo "launch_hostfile.sh: started $nnodes nodes x $slots processes (${hosts[*]}), rendezvous" \
     "${hosts[0]}:$MASTER_PORT, logs in $LOG_DIR" >&2

forward() {  # SIGNAL: to every node's launch_torchrun.sh, through the control channels
    echo "launch_hostfile.sh: SIG$1: forwarding to every node" >&2
    local fd
    for fd in ${channels[@]+"${channels[@]}"}; do (echo "$1" >&"$fd") 2>/dev/null || true; done
}

stop_nodes() {  # WHY: close the control channels (each node kills its ranks) and end the ssh processes
    echo "launch_hostfile.sh: $1: stopping every node" >&2
    local fd
    for fd in "${channels[@]}"; do exec {fd}>&-; done
    channels=()
    kill "${pids[@]}" 2>/dev/null || true
}

stopping=""
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'stopping="SIGINT"' INT
status=0
running=("${!hosts[@]}")
while [ ${#running[@]} -gt 0 ]; do
    still=()
    for rank in "${running[@]}"; do
        if kill -0 "${pids[$rank]}" 2>/dev/null; then
            still+=("$rank")
            continue
        fi
        code=0
        wait "${pids[$rank]}" || code=$?
        if [ "$code" != 0 ] && [ "$status" = 0 ] && [ -z "$stopping" ]; then
            status=$code
            stopping="node $rank (${hosts[$rank]}) exited with status $code"
        fi
    done
    running=(${still[@]+"${still[@]}"})
    if [ -n "$stopping" ] && [ ${#channels[@]} -gt 0 ]; then
        stop_nodes "$stopping"
    fi
    [ ${#running[@]} -gt 0 ] && { sleep 0.2 & wait $! || true; }
done
if [ "$stopping" = SIGINT ]; then
    exit 130
fi
exit "$status"
