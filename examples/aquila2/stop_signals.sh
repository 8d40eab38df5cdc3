# Forwarding of the stop signals (SIGUSR1, SIGTERM) to the training ranks, sourced by
# launch_torchrun.sh (one per node) and srun_torchrun.sh (the Slurm batch shell).
# A rank that gets either signal saves at the end of its iteration and every rank exits 0
# (megatron_aquila/checkpoint/signals.py). Why and when: docs/gpu.md section 6.
#
#   run_torchrun_forwarding_stop_signals torchrun ARGS...
#       Starts torchrun with SIGUSR1 ignored: torchrun has no handler for it, and the default
#       action would kill torchrun and orphan its ranks (Slurm signals every process of a job step).
#       A SIGUSR1 or SIGTERM that reaches this shell is sent, as the same signal, to torchrun's
#       children, the ranks, and not to torchrun: torchrun answers SIGTERM by forwarding it and
#       killing the ranks 30 s later, too soon for a large save. torchrun then exits when its ranks
#       do, with their status, and so does this function.
#   run_srun_forwarding_stop_signals srun ARGS...
#       For the batch shell, which alone receives `#SBATCH --signal=B:USR1@<seconds>`: a SIGUSR1 or
#       SIGTERM that reaches it is sent to srun, which forwards it to its tasks (one
#       launch_torchrun.sh per node, which forward it to their ranks as above).
# Both return the command's exit status. Needs pkill (procps).

_stop_signal_target=""       # pid of the command started below
_stop_signal_recipients=""   # "children" (torchrun's ranks) or "process" (srun itself)
_stop_signal_pending=0       # set by the trap, so that an interrupted `wait` is resumed

_deliver_stop_signal() {  # SIGNAL
    local signal=$1
    _stop_signal_pending=1
    [ -n "$_stop_signal_target" ] || return 0   # nothing started yet
    if [ "$_stop_signal_recipients" = children ]; then
        echo "[$(date +%T) $(hostname)] SIG$signal: forwarding to the ranks (children of torchrun, pid $_stop_signal_target)" >&2
        pkill "-$signal" -P "$_stop_signal_target" \
            || echo "[$(date +%T) $(hostname)] no rank is running under torchrun pid $_stop_signal_target" >&2
    else
        echo "[$(date +%T) $(hostname)] SIG$signal: forwarding to srun (pid $_stop_signal_target)" >&2
        kill "-$signal" "$_stop_signal_target" 2>/dev/null || true
    fi
}

_run_forwarding_stop_signals() {  # RECIPIENTS COMMAND...
    _stop_signal_recipients=$1
    shift
    trap '_deliver_stop_signal USR1' USR1
    trap '_deliver_stop_signal TERM' TERM
    if [ "$_stop_signal_recipients" = children ]; then
        (trap '' USR1; exec "$@") &   # the ignored disposition survives exec: torchrun ignores SIGUSR1
    else
        "$@" &
    fi
    _stop_signal_target=$!
    local status=0 code
    while :; do
        _stop_signal_pending=0
        code=0
        wait "$_stop_signal_target" || code=$?
        if [ "$code" = 127 ] && [ "$status" -gt 128 ]; then
            break   # the command had already ended and been waited for: keep its status
        fi
        status=$code
        # A trapped signal interrupts `wait` (status > 128) while the command still runs: wait again.
        if [ "$_stop_signal_pending" = 1 ] && [ "$status" -gt 128 ]; then
            continue
        fi
        break
    done
    trap - USR1 TERM
    return "$status"
}

run_torchrun_forwarding_stop_signals() {
    _run_forwarding_stop_signals children "$@"
}

run_srun_forwarding_stop_signals() {
    _run_forwarding_stop_signals process "$@"
}
