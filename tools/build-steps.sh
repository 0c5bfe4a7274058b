# shellcheck shell=bash
# Sourced by tools/build-libfuse and tools/build-pyfuse3: steps that print their times,
# failures in one line that names the step, and a work directory that is removed on exit
# unless the variable named by KEEP_VAR is 1 (or the build failed: it is kept to look at).
# Set before sourcing: PROG (the script's name) and KEEP_VAR.
STEP=init
LOG=/dev/null
WORK=

say() { printf '[%s] %s\n' "$PROG" "$*"; }

keep_work() {
    if [[ -n "$WORK" ]]; then
        printf -v "$KEEP_VAR" 1
        KEEP_QUIET=1
    fi
}

die() {
    # ONE line naming the step and the remedy; always the last thing printed.
    keep_work
    printf '%s: FAILED at step "%s": %s\n' "$PROG" "$STEP" "$*" >&2
    exit 1
}

on_err() {
    local rc=$?
    if [[ -n "$LOG" && "$LOG" != /dev/null && -s "$LOG" ]]; then
        echo "---- last lines of $LOG ----" >&2
        tail -n 25 "$LOG" >&2 || true
        echo "----" >&2
    fi
    keep_work
    printf '%s: FAILED at step "%s" (exit %s); log: %s\n' "$PROG" "$STEP" "$rc" "$LOG" >&2
    exit "$rc"
}
trap on_err ERR

cleanup() {
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if [[ "${!KEEP_VAR:-0}" == 1 ]]; then
            [[ -n "${KEEP_QUIET:-}" ]] || say "work directory kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
}
trap cleanup EXIT

T_STEP=0
T_TOTAL0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}'; }
step_end() {
    if [[ "$T_STEP" != 0 ]]; then
        printf '[%s] step %-24s %7ss\n' "$PROG" "\"$STEP\"" "$(elapsed "$T_STEP")"
        T_STEP=0
    fi
}
step() {   # step NAME: end the previous step (print its time), start NAME
    step_end
    STEP=$1
    T_STEP=$(date +%s.%N)
}
