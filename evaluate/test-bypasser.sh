#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The original latency experiment: one connection, N echoed requests of SIZE bytes, average
# round-trip time without and then with the bypass. Both runs happen in a child cgroup this
# script creates; the bypass is attached to that cgroup only, and everything is detached and
# removed on exit, Ctrl-C included.
#
#   sudo evaluate/test-bypasser.sh [-m event|blocking] [-n REQUESTS] [-s SIZE] [-p same|cross|any] [--json FILE]
#
# -m event (default): client and server use non-blocking sockets and epoll, as redis or nginx do;
#    the bypass takes such sockets. -m blocking: blocking reads and writes, as the original
#    experiment did; the bypass keeps blocking readers on plain TCP (the kernel's sockmap path
#    would show them EAGAIN), so this mode attaches with --allow-blocking-readers, and says so.
set -euo pipefail

usage() {
    echo "usage: $0 [-m event|blocking] [-n REQUESTS] [-s SIZE] [-p same|cross|any] [--json FILE]" >&2
    exit 2
}

requests=250000 size=1024 placement=any json="" mode=event
while [ $# -gt 0 ]; do
    case "$1" in
        -m|--mode) mode=${2:?}; shift 2 ;;
        -n) requests=${2:?}; shift 2 ;;
        -s) size=${2:?}; shift 2 ;;
        -p|--placement) placement=${2:?}; shift 2 ;;
        --json) json=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "$0: unknown argument $1" >&2; usage ;;
    esac
done
[[ "$requests" =~ ^[1-9][0-9]*$ && "$size" =~ ^[1-9][0-9]*$ ]] || { echo "$0: -n and -s take positive numbers" >&2; exit 2; }
case "$placement" in same|cross|any) ;; *) echo "$0: -p takes same, cross or any" >&2; exit 2 ;; esac
case "$mode" in
    event) io=(-e) attach_opts=() described="event-driven (non-blocking sockets, epoll)" ;;
    blocking) io=() attach_opts=(--allow-blocking-readers)
              described="blocking reads and writes, bypassed with --allow-blocking-readers" ;;
    *) echo "$0: -m takes event or blocking" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "$0: must run as root (it loads BPF programs)" >&2; exit 2; }

cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
make -s >/dev/null

cg_root=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)
[ -n "$cg_root" ] || { echo "$0: no cgroup v2 mounted" >&2; exit 2; }
cgroup="$cg_root/netbpf-bypasser-$$"
pins="/sys/fs/bpf/netbpf-bypasser-$$"

out=$(mktemp)
cleanup() {
    if [ -d "$cgroup" ]; then  # only our ping-pong processes live there
        for pid in $(cat "$cgroup/cgroup.procs"); do kill -9 "$pid" 2>/dev/null || true; done
        while [ -s "$cgroup/cgroup.procs" ]; do sleep 0.05; done
    fi
    "$python" -m netbpf.bypass detach --pin-dir "$pins" >/dev/null 2>&1 || true
    [ -d "$cgroup" ] && rmdir "$cgroup" 2>/dev/null || true
    rm -f "$out"
}
trap cleanup EXIT
trap 'echo "$0: interrupted, cleaning up" >&2; exit 130' INT TERM
mkdir "$cgroup"

# Run the ping-pong client and server inside the child cgroup; print its JSON result. It runs in
# the background so that a signal reaches the trap at once.
run_pingpong() {
    sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$cgroup" \
        evaluate/pingpong -t tcp -m rtt "${io[@]}" -n "$requests" -s "$size" -p "$placement" > "$out" &
    wait $!
    cat "$out"
}

without=$(run_pingpong)
"$python" -m netbpf.bypass attach --cgroup "$cgroup" --pin-dir "$pins" "${attach_opts[@]}" >/dev/null ||
    { echo "$0: the bypass did not attach (the line above says why): nothing to compare" >&2; exit 2; }
with=$(run_pingpong)
redirected=$("$python" -m netbpf.bypass status --json --pin-dir "$pins" |
             "$python" -c 'import json, sys; print(json.load(sys.stdin)["redirected_msgs"])')
"$python" -m netbpf.bypass detach --pin-dir "$pins" >/dev/null

mean() { "$python" -c 'import json, sys; print(json.loads(sys.argv[1])["mean_us"])' "$1"; }
a=$(mean "$without") b=$(mean "$with")
echo "Mode: $described; $requests requests of $size bytes, placement $placement"
echo "Average RTT (without bypasser): $a microseconds"
echo "Average RTT (with bypasser): $b microseconds"
"$python" -c 'import sys; a, b = map(float, sys.argv[1:]); print(f"Change: {100 * (b - a) / a:+.1f}% ({a / b:.2f}x)")' "$a" "$b"
echo "Messages the bypass redirected: $redirected"

if [ -n "$json" ]; then
    "$python" -c 'import json, sys; print(json.dumps({"without": json.loads(sys.argv[1]), "with": json.loads(sys.argv[2])}, indent=2))' \
        "$without" "$with" > "$json"
fi
