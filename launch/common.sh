# Sourced by the launch scripts (not run on its own): the GPU count and the wrapper every launcher runs under.
#
# megaeff_gpu_count
#   GPUs this process may use: the entries of CUDA_VISIBLE_DEVICES when it is set (up to the first one that is
#   not a device, as CUDA reads it: "" and "-1" give 0), otherwise the lines of `nvidia-smi -L`. A node with a
#   driver but no usable GPU, or no driver at all, gives 0 instead of failing the script.
#
# megaeff_launch CMD...
#   Runs one launcher command (torchrun, deepspeed, srun) whose last arguments are megaeff's Hydra overrides,
#   and ends with the code a scheduler acts on:
#     0    the run finished;
#     75   the ranks saved a checkpoint and stopped on request (SIGTERM/SIGUSR1, train.max_duration_minutes,
#          train.exit_interval), whatever the launcher in between returned (torchrun turns the ranks' 75 into 1).
#          The ranks say so by writing the file named by MEGAEFF_STOP_MARKER once the checkpoint is complete;
#          this wrapper sets it (a fresh temporary file unless the caller exported one) and removes it at the end;
#     else the launcher's own code.
#   SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 sent to the script are passed on to the launcher, so `kill`,
#   Ctrl-C or a container stop reach the ranks as they would without the wrapper.
#   MAX_RESTARTS=N (default 0): when the launcher fails for any other reason (a rank killed, a node lost), start
#   it again, up to N times, with train.resume=auto appended: the run continues from its latest checkpoint.
#   This replaces torchrun's own --max-restarts, whose restarted gloo ranks cannot connect on torch 2.13. A
#   restart needs a fixed run directory, so without a run_dir= override one is chosen (runs/<timestamp>) and
#   passed to every attempt. No restart follows a signal the script itself received, nor a stop on request.
#   RESTART_DELAY (seconds, default 3) is the pause before a restart; MASTER_PORT, when set, moves up by one per
#   restart so that a port the killed attempt held is not reused.

megaeff_gpu_count() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local n=0 dev
        local -a devs
        IFS=, read -r -a devs <<<"$CUDA_VISIBLE_DEVICES"
        for dev in "${devs[@]}"; do
            dev="${dev// /}"
            [[ "$dev" =~ ^[0-9]+$ || "$dev" =~ ^(GPU|MIG)- ]] || break
            n=$((n + 1))
        done
        echo "$n"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

megaeff_launch() {
    local -a cmd=("$@")
    local own_marker="" arg has_run_dir=0
    if [[ -z "${MEGAEFF_STOP_MARKER:-}" ]]; then
        own_marker="$(mktemp -d "${TMPDIR:-/tmp}/megaeff-launch.XXXXXX")"
        export MEGAEFF_STOP_MARKER="$own_marker/stopped"
    fi
    rm -f "$MEGAEFF_STOP_MARKER"
    for arg in "${cmd[@]}"; do [[ "$arg" == run_dir=* ]] && has_run_dir=1; done
    local max_restarts="${MAX_RESTARTS:-0}"
    if ((max_restarts > 0 && !has_run_dir)); then
        cmd+=("run_dir=runs/$(date +%Y-%m-%d_%H-%M-%S)")
    fi

    local attempt=0 rc=0 child="" signalled=0 sig seen status
    for sig in TERM INT HUP USR1 USR2; do
        # shellcheck disable=SC2064  # $sig now, $child when the signal comes
        trap "signalled=\$((signalled + 1)); [[ -n \"\$child\" ]] && kill -s $sig \"\$child\" 2>/dev/null" "$sig"
    done
    while :; do
        "${cmd[@]}" &
        child=$!
        # `wait` returns early (>128) when a trapped signal arrives, before the launcher has ended: wait again
        # while the traps keep firing. Bash keeps an interrupted job's status even once the launcher has exited
        # and been reaped, so the next wait still reports it (testing `kill -0` instead raced with that reaping).
        # A 127 means the previous wait had already returned the status and the signal came just after it.
        rc=""
        while :; do
            seen=$signalled
            wait "$child" && status=0 || status=$?
            [[ -n "$rc" && $status == 127 ]] || rc=$status
            ((signalled == seen)) && break
        done
        child=""
        if [[ -e "$MEGAEFF_STOP_MARKER" ]]; then
            echo "megaeff: stopped on request with a checkpoint saved ($(head -n 1 "$MEGAEFF_STOP_MARKER")); exit 75" >&2
            rc=75
            break
        fi
        if ((rc == 0 || signalled || attempt >= max_restarts)); then
            break
        fi
        attempt=$((attempt + 1))
        echo "megaeff: launcher failed (exit $rc); restart $attempt of $max_restarts with train.resume=auto" >&2
        sleep "${RESTART_DELAY:-3}"
        [[ -n "${MASTER_PORT:-}" ]] && export MASTER_PORT=$((MASTER_PORT + 1))
        [[ "${cmd[-1]}" == train.resume=auto ]] || cmd+=(train.resume=auto)
    done
    trap - TERM INT HUP USR1 USR2
    rm -f "$MEGAEFF_STOP_MARKER"
    [[ -n "$own_marker" ]] && rmdir "$own_marker" 2>/dev/null
    return "$rc"
}
