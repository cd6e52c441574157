# shellcheck shell=bash
# Shared helpers for kiln's scripts: readable step output, failing loudly, and
# polling with a deadline (never a fixed sleep to wait for something).
#
# Source it from a script: . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The Debian client: /usr/local/bin/docker may be a newer client that this
# engine (20.10) does not speak to by default.
KILN_DOCKER=${KILN_DOCKER:-/usr/bin/docker}
KILN_BASE_DIR=${KILN_BASE_DIR:-/var/lib/kiln/base}
export KILN_DOCKER KILN_BASE_DIR

if [ -t 1 ]; then
    _kiln_bold=$'\e[1m' _kiln_red=$'\e[31m' _kiln_reset=$'\e[0m'
else
    _kiln_bold='' _kiln_red='' _kiln_reset=''
fi

# step MESSAGE: announce what the script is about to do.
step() { printf '%s==> %s%s\n' "$_kiln_bold" "$*" "$_kiln_reset"; }

# step_failed MESSAGE: announce that a step failed.
step_failed() { printf '%s==> FAILED: %s%s\n' "$_kiln_red" "$*" "$_kiln_reset"; }

# note MESSAGE: a detail of the current step.
note() { printf '    %s\n' "$*"; }

# die MESSAGE: print an error to stderr and exit 1.
die() {
    printf '%serror:%s %s\n' "$_kiln_red" "$_kiln_reset" "$*" >&2
    exit 1
}

# have COMMAND: is COMMAND on PATH?
have() { command -v "$1" >/dev/null 2>&1; }

# now_ms: milliseconds since the epoch.
now_ms() { date +%s%3N; }

# wait_for SECONDS DESCRIPTION COMMAND...: run COMMAND until it succeeds, polling
# every 100 ms; die with DESCRIPTION if it has not succeeded after SECONDS.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$(($(now_ms) + seconds * 1000))
    until "$@" >/dev/null 2>&1; do
        if [ "$(now_ms)" -ge "$deadline" ]; then
            die "timed out after ${seconds}s waiting for $what (command: $*)"
        fi
        sleep 0.1
    done
}

# require_root: the environment scripts install packages and start daemons.
require_root() {
    [ "$(id -u)" -eq 0 ] || die "$0 must run as root (it installs packages and starts dockerd); try: sudo $0"
}
