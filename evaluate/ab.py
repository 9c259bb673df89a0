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
import functools
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


def pingpong(group, program, placement, messages):
    """(sk_msg ns per message, p50 round trip in µs) of one event-driven 1 KiB ping-pong in group,
    the kernel counting the runs of program (an sk_msg program its connections go through)."""
    with RunStats():
        before = program.run_stats
        proc = group.popen([str(PINGPONG), "-t", "tcp", "-m", "rtt", "-s", "1024", "-n", str(messages),
                            "-p", placement, "-j", "200", "-e"], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=600)
        ns, runs = (now - then for now, then in zip(program.run_stats, before))
    if proc.returncode or not runs:
        raise RuntimeError(f"pingpong through {program.name} failed (status {proc.returncode}, {runs} sk_msg runs)")
    return ns / runs, json.loads(out)["p50_us"]


def run_once(group, placement, messages, object_file):
    """pingpong() on a bypass from object_file attached to group."""
    bypass = Bypass(str(group.path))
    bypass.object_file = object_file
    bypass.attach()
    try:
        return pingpong(group, bypass.send_program, placement, messages)
    finally:
        bypass.close()


def summary(values, digits=1):
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def add_run_arguments(parser):
    """The options of every side-by-side run here: rounds, placement, messages."""
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--placement", choices=("same", "cross"), default="same")
    parser.add_argument("--messages", type=int, default=30000)


def refusal(args, object_files):
    """One line that says why these arguments cannot run here, or None when they can."""
    missing = [str(path) for path in object_files if not path.is_file()]
    if missing:
        return f"no object file {missing[0]}"
    if args.rounds < 1 or args.messages < 1:
        return "rounds and messages must be positive"
    if os.geteuid() != 0:
        return "must run as root (it loads BPF programs)"
    return None


def compare(name, runners, args):
    """Each round runs every (label, run) of runners in turn on one child cgroup made here, in
    reverse order every other round; returns {label: [(ns per message, p50 µs), ...]}."""
    group = cgroup.Cgroup.create(f"netbpf-{name}-{os.getpid()}")
    results = {label: [] for label, _ in runners}
    try:
        for round_ in range(args.rounds):
            for label, run in (runners if round_ % 2 == 0 else runners[::-1]):
                results[label].append(run(group, args.placement, args.messages))
    finally:
        group.remove()
    print(f"kernel {platform.release()}, {args.placement} CPU, {args.rounds} rounds")
    for label, values in results.items():
        ns, p50 = zip(*values)
        print(f"{label}: sk_msg ns/msg {summary(ns)}, p50 µs {summary(p50)}")
    return results


def main():
    parser = argparse.ArgumentParser(prog="python -m evaluate.ab", description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    add_run_arguments(parser)
    args = parser.parse_args()
    why = refusal(args, (args.a, args.b))
    if why:
        print(f"evaluate.ab: {why}", file=sys.stderr)
        return 2
    results = compare("ab", [(f"{name} {path}", functools.partial(run_once, object_file=path))
                             for name, path in (("A", args.a), ("B", args.b))], args)
    a, b = results.values()
    ratio = [b_[0] / a_[0] for a_, b_ in zip(a, b)]
    print(f"B/A sk_msg ns: {summary(ratio, 3)} (per round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
