# SPDX-License-Identifier: MIT
"""Two builds of the bypass's BPF object, A and B, side by side: what a change to bpf/bypass.bpf.c
costs or saves per message.

    sudo python3 -m evaluate.ab A.bpf.o B.bpf.o [--rounds N] [--placement same|cross] [--messages N]

Each round attaches A, then B (or B then A in every other round), to one child cgroup made here,
and runs the event-driven 1 KiB ping-pong on it with the kernel's run-time statistics on.
Reported per object: the sk_msg program's ns per message and the round trip's p50, medians over
the rounds [min-max], and B/A. Save A before rebuilding: cp src/netbpf/bpf/bypass.bpf.o /tmp/A.bpf.o.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from netbpf import cgroup
from netbpf.bypass import Bypass
from netbpf.loader import RunStats

PINGPONG = Path(__file__).resolve().parent / "pingpong"


def run_once(group, object_file, placement, messages):
    """(sk_msg ns per message, p50 round trip in µs) of one ping-pong on a bypass from object_file."""
    bypass = Bypass(str(group.path))
    bypass.object_file = object_file
    bypass.attach()
    try:
        with RunStats():
            before = bypass.send_program.run_stats
            proc = group.popen([str(PINGPONG), "-t", "tcp", "-m", "rtt", "-s", "1024", "-n", str(messages),
                                "-p", placement, "-j", "200", "-e"], stdout=subprocess.PIPE, text=True)
            out, _ = proc.communicate(timeout=600)
            ns, runs = (now - then for now, then in zip(bypass.send_program.run_stats, before))
    finally:
        bypass.close()
    if proc.returncode or not runs:
        raise RuntimeError(f"pingpong on {object_file} failed (status {proc.returncode}, {runs} sk_msg runs)")
    return ns / runs, json.loads(out)["p50_us"]


def summary(values, digits=1):
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main():
    parser = argparse.ArgumentParser(prog="python -m evaluate.ab", description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--placement", choices=("same", "cross"), default="same")
    parser.add_argument("--messages", type=int, default=30000)
    args = parser.parse_args()
    missing = [str(path) for path in (args.a, args.b) if not path.is_file()]
    if missing or args.rounds < 1 or args.messages < 1:
        print(f"evaluate.ab: {'no object file ' + missing[0] if missing else 'rounds and messages must be positive'}",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("evaluate.ab: must run as root (it loads BPF programs)", file=sys.stderr)
        return 2
    group = cgroup.Cgroup.create(f"netbpf-ab-{os.getpid()}")
    results = {"A": [], "B": []}
    try:
        for round_ in range(args.rounds):
            order = (("A", args.a), ("B", args.b)) if round_ % 2 == 0 else (("B", args.b), ("A", args.a))
            for name, path in order:
                results[name].append(run_once(group, path, args.placement, args.messages))
    finally:
        group.remove()
    print(f"kernel {platform.release()}, {args.placement} CPU, {args.rounds} rounds")
    for name, path in (("A", args.a), ("B", args.b)):
        ns, p50 = zip(*results[name])
        print(f"{name} {path}: sk_msg ns/msg {summary(ns)}, p50 µs {summary(p50)}")
    ratio = [b[0] / a[0] for a, b in zip(results["A"], results["B"])]
    print(f"B/A sk_msg ns: {summary(ratio, 3)} (per round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
